// Package doctor checks a host for what msbtap needs and for the settings
// that bite when many sandboxes run on it: each check gives a verdict (ok,
// warn, fail), what it found, and the fix. The host is reached through an
// Env, so every check runs on fakes in the unit tests.
package doctor

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strconv"
	"strings"
)

// Verdict is a check's outcome.
type Verdict int

// Verdicts, from good to bad.
const (
	OK Verdict = iota
	Warn
	Fail
)

func (v Verdict) String() string {
	switch v {
	case OK:
		return "ok"
	case Warn:
		return "warn"
	}
	return "fail"
}

// Result is one check's verdict: Detail says what was found, Fix what to
// do about it (empty when there is nothing to do).
type Result struct {
	Name    string
	Verdict Verdict
	Detail  string
	Fix     string
}

// Env is the host as the checks see it. Every field must be set (Host
// gives the real ones).
type Env struct {
	// ReadFile reads a file (sysctls under /proc/sys, /proc/self/status).
	ReadFile func(path string) ([]byte, error)
	// Stat describes a path without opening it.
	Stat func(path string) (fs.FileInfo, error)
	// LookPath finds an executable on PATH.
	LookPath func(name string) (string, error)
	// NoFile returns the soft and hard limits on open descriptors.
	NoFile func() (soft, hard uint64, err error)
	// Root says the checks run as root (probes that need it run then).
	Root bool
	// OpenTUN opens and closes /dev/net/tun.
	OpenTUN func() error
	// ProbeTC makes two TAPs in a scratch namespace and joins them with an
	// ingress qdisc, u32 filters and mirred redirects, as VM mode does.
	ProbeTC func() error
}

// Options say what the agents on this host will be asked to do.
type Options struct {
	// MaxConnections is msbtap run's --max-connections (default
	// stack.DefaultMaxConnections).
	MaxConnections int
	// VM says the host runs VM-mode agents: tc u32 and mirred are needed.
	VM bool
}

// Run runs every check, in a fixed order.
func Run(env *Env, o Options) []Result {
	if o.MaxConnections <= 0 {
		o.MaxConnections = 256
	}
	return []Result{
		checkTUN(env),
		checkTC(env, o),
		checkSeccomp(env),
		checkPIDNS(env),
		checkUserNS(env),
		checkPingGroup(env),
		checkPorts(env),
		checkTWReuse(env),
		checkNoFile(env, o),
		checkSystemd(env),
	}
}

// Print writes one line per check, a fix line under each that needs one,
// and a summary; it returns the worst verdict.
func Print(w io.Writer, rs []Result) Verdict {
	worst := OK
	counts := [3]int{}
	for _, r := range rs {
		fmt.Fprintf(w, "%-4s  %-16s %s\n", r.Verdict, r.Name, r.Detail)
		if r.Fix != "" && r.Verdict != OK {
			fmt.Fprintf(w, "%-4s  %-16s fix: %s\n", "", "", r.Fix)
		}
		counts[r.Verdict]++
		worst = max(worst, r.Verdict)
	}
	fmt.Fprintf(w, "%d ok, %d warn, %d fail\n", counts[OK], counts[Warn], counts[Fail])
	return worst
}

// sysctl reads /proc/sys/KEY (key with dots).
func sysctl(env *Env, key string) (string, error) {
	b, err := env.ReadFile("/proc/sys/" + strings.ReplaceAll(key, ".", "/"))
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

// sysctlInt reads an integer sysctl.
func sysctlInt(env *Env, key string) (int64, error) {
	s, err := sysctl(env, key)
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s: %q is not a number", key, s)
	}
	return n, nil
}

// sysctlPair reads a sysctl of two integers ("32768\t60999").
func sysctlPair(env *Env, key string) (a, b int64, err error) {
	s, err := sysctl(env, key)
	if err != nil {
		return 0, 0, err
	}
	f := strings.Fields(s)
	if len(f) != 2 {
		return 0, 0, fmt.Errorf("%s: %q is not two numbers", key, s)
	}
	if a, err = strconv.ParseInt(f[0], 10, 64); err == nil {
		b, err = strconv.ParseInt(f[1], 10, 64)
	}
	if err != nil {
		return 0, 0, fmt.Errorf("%s: %q is not two numbers", key, s)
	}
	return a, b, nil
}

func checkTUN(env *Env) Result {
	r := Result{Name: "tun"}
	fi, err := env.Stat("/dev/net/tun")
	if err != nil {
		r.Verdict, r.Detail = Fail, "/dev/net/tun: "+errText(err)+": msbtap cannot create its TAP"
		r.Fix = "load the tun driver (modprobe tun) and create the node: mkdir -p /dev/net && mknod /dev/net/tun c 10 200; in a container, pass the device in (--device /dev/net/tun)"
		return r
	}
	if fi.Mode()&fs.ModeCharDevice == 0 {
		r.Verdict, r.Detail = Fail, "/dev/net/tun is not a character device"
		r.Fix = "rm /dev/net/tun && mknod /dev/net/tun c 10 200"
		return r
	}
	if !env.Root {
		r.Verdict, r.Detail = Warn, "/dev/net/tun exists (not root: not opened)"
		r.Fix = "run msbtap doctor as root to open it"
		return r
	}
	if err := env.OpenTUN(); err != nil {
		r.Verdict, r.Detail = Fail, "/dev/net/tun exists but does not open: "+errText(err)
		r.Fix = "allow the device (a container's device cgroup: --device /dev/net/tun; a systemd unit: DeviceAllow=/dev/net/tun rw)"
		return r
	}
	r.Detail = "/dev/net/tun opens"
	return r
}

func checkTC(env *Env, o Options) Result {
	r := Result{Name: "tc u32 (VM mode)"}
	bad := Warn
	if o.VM {
		bad = Fail
	}
	if !env.Root {
		r.Verdict, r.Detail = bad, "not root: cannot probe the ingress qdisc, u32 filter and mirred action VM mode joins its TAPs with"
		r.Fix = "run msbtap doctor as root"
		return r
	}
	if err := env.ProbeTC(); err != nil {
		r.Verdict, r.Detail = bad, "msbtap run --vm cannot join its TAPs: "+errText(err)
		r.Fix = "a kernel with CONFIG_NET_SCH_INGRESS, CONFIG_NET_CLS_U32 and CONFIG_NET_ACT_MIRRED (modprobe sch_ingress cls_u32 act_mirred); namespace mode does not need them"
		return r
	}
	r.Detail = "ingress qdisc, u32 filter and mirred redirect work (msbtap run --vm can join its TAPs)"
	return r
}

func checkSeccomp(env *Env) Result {
	r := Result{Name: "seccomp"}
	fix := "a kernel with CONFIG_SECCOMP_FILTER; until then msbtap run needs --seccomp off (the agent then runs without its system call allow-list)"
	st, err := env.ReadFile("/proc/self/status")
	if err != nil || !strings.Contains(string(st), "\nSeccomp:") {
		r.Verdict, r.Detail, r.Fix = Fail, "the kernel has no seccomp (no Seccomp: line in /proc/self/status)", fix
		return r
	}
	acts, err := sysctl(env, "kernel.seccomp.actions_avail")
	if err != nil {
		r.Verdict, r.Detail, r.Fix = Fail, "no seccomp filters (kernel.seccomp.actions_avail: "+errText(err)+")", fix
		return r
	}
	if !hasWord(acts, "errno") || !hasWord(acts, "allow") {
		r.Verdict, r.Detail, r.Fix = Fail, "seccomp filters lack the errno action msbtap's allow-list returns: "+acts, fix
		return r
	}
	r.Detail = "seccomp filters with the errno action (msbtap's allow-list)"
	return r
}

func checkPIDNS(env *Env) Result {
	r := Result{Name: "pid namespaces"}
	fix := "a kernel with CONFIG_PID_NS and user.max_pid_namespaces > 0 (sysctl -w user.max_pid_namespaces=65536); msbtap run --netns does not need them"
	if _, err := env.Stat("/proc/self/ns/pid"); err != nil {
		r.Verdict, r.Detail, r.Fix = Fail, "no PID namespaces (/proc/self/ns/pid: "+errText(err)+"): msbtap run -- COMMAND cannot start its sandbox", fix
		return r
	}
	n, err := sysctlInt(env, "user.max_pid_namespaces")
	if err == nil && n == 0 {
		r.Verdict, r.Detail, r.Fix = Fail, "user.max_pid_namespaces is 0: msbtap run -- COMMAND cannot start its sandbox", fix
		return r
	}
	if _, err := env.Stat("/proc/self/ns/mnt"); err != nil {
		r.Verdict, r.Detail, r.Fix = Fail, "no mount namespaces (/proc/self/ns/mnt): msbtap run -- COMMAND cannot give its sandbox a private /proc", "a kernel with mount namespaces"
		return r
	}
	r.Detail = "PID and mount namespaces (msbtap run -- COMMAND)"
	if err == nil {
		r.Detail += fmt.Sprintf(", user.max_pid_namespaces %d", n)
	}
	return r
}

func checkUserNS(env *Env) Result {
	r := Result{Name: "user namespaces"}
	why := ": msbtap does not need them, but tools in a sandbox that do (unshare -r, rootless podman, Chrome's sandbox) fail"
	if _, err := env.Stat("/proc/self/ns/user"); err != nil {
		r.Verdict, r.Detail, r.Fix = Warn, "no user namespaces"+why, "a kernel with CONFIG_USER_NS"
		return r
	}
	if n, err := sysctlInt(env, "user.max_user_namespaces"); err == nil && n == 0 {
		r.Verdict, r.Detail, r.Fix = Warn, "user.max_user_namespaces is 0"+why, "sysctl -w user.max_user_namespaces=65536"
		return r
	}
	if n, err := sysctlInt(env, "kernel.unprivileged_userns_clone"); err == nil && n == 0 {
		r.Verdict, r.Detail, r.Fix = Warn, "kernel.unprivileged_userns_clone is 0 (unprivileged users cannot create them)"+why, "sysctl -w kernel.unprivileged_userns_clone=1"
		return r
	}
	if n, err := sysctlInt(env, "kernel.apparmor_restrict_unprivileged_userns"); err == nil && n != 0 {
		r.Verdict, r.Detail, r.Fix = Warn, "AppArmor restricts unprivileged user namespaces"+why, "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or an AppArmor profile for the tools that need them"
		return r
	}
	r.Detail = "user namespaces available (to tools inside a sandbox; msbtap does not need them)"
	return r
}

func checkPingGroup(env *Env) Result {
	r := Result{Name: "ping_group_range"}
	lo, hi, err := sysctlPair(env, "net.ipv4.ping_group_range")
	if err != nil {
		r.Verdict, r.Detail = Warn, "net.ipv4.ping_group_range: "+errText(err)
		return r
	}
	if lo <= 0 && 0 <= hi {
		r.Detail = fmt.Sprintf("%d %d: the echo relay uses datagram ICMP sockets", lo, hi)
		return r
	}
	r.Verdict = Warn
	r.Detail = fmt.Sprintf("%d %d leaves out root's group: each agent's echo relay falls back to raw ICMP sockets (it keeps CAP_NET_RAW for them), and every raw socket gets a copy of every ICMP packet the host receives, which costs CPU with many sandboxes", lo, hi)
	r.Fix = "sysctl -w net.ipv4.ping_group_range='0 0' (or a range that holds 0; in /etc/sysctl.d/ to keep it)"
	return r
}

// timeWait is how long Linux keeps a closed connection's port in TIME_WAIT.
const timeWait = 60

// connectRate is how many new connections a second to one destination the
// port range sustains before connect() has to scan for a free port: since
// Linux 4.6 connect() takes ports of one parity (bind() the other), and a
// port stays in TIME_WAIT for 60 s after each connection the host closes.
func connectRate(lo, hi int64) int64 { return (hi - lo + 1) / 2 / timeWait }

func checkPorts(env *Env) Result {
	r := Result{Name: "ephemeral ports"}
	lo, hi, err := sysctlPair(env, "net.ipv4.ip_local_port_range")
	if err != nil {
		r.Verdict, r.Detail = Warn, "net.ipv4.ip_local_port_range: "+errText(err)
		return r
	}
	rate := connectRate(lo, hi)
	reuse, rerr := sysctlInt(env, "net.ipv4.tcp_tw_reuse")
	r.Detail = fmt.Sprintf("%d-%d: every sandbox's connections leave from the host's ports; about %d new connections a second to one destination fill connect()'s half of the range with TIME_WAIT", lo, hi, rate)
	r.Fix = "sysctl -w net.ipv4.ip_local_port_range='1024 65535' (keep published and listening ports out of it: net.ipv4.ip_local_reserved_ports)"
	if rate < 500 && (rerr != nil || reuse != 1) {
		r.Verdict = Warn
		r.Detail += ", past which each connect() scans the range for a free port and the rate collapses (measured: ~1000/s fell to ~80/s)"
		return r
	}
	if rerr == nil && reuse == 1 {
		r.Detail += " (tcp_tw_reuse=1 lets new connections take TIME_WAIT ports)"
	}
	return r
}

func checkTWReuse(env *Env) Result {
	r := Result{Name: "tcp_tw_reuse"}
	n, err := sysctlInt(env, "net.ipv4.tcp_tw_reuse")
	if err != nil {
		r.Verdict, r.Detail = Warn, "net.ipv4.tcp_tw_reuse: "+errText(err)
		return r
	}
	fix := "sysctl -w net.ipv4.tcp_tw_reuse=1 (and net.ipv4.tcp_timestamps=1, which it relies on; in /etc/sysctl.d/ to keep it)"
	if ts, err := sysctlInt(env, "net.ipv4.tcp_timestamps"); err == nil && ts == 0 {
		r.Verdict, r.Detail, r.Fix = Warn, "net.ipv4.tcp_timestamps is 0: TIME_WAIT ports can never be reused, whatever tcp_tw_reuse says", fix
		return r
	}
	switch n {
	case 1:
		r.Detail = "1: new outbound connections reuse ports in TIME_WAIT (timestamps keep old segments apart)"
		return r
	case 2:
		r.Detail = "2 (the default: loopback only): a destination reached at hundreds of connections a second exhausts the ports toward it with TIME_WAIT"
	default:
		r.Detail = fmt.Sprintf("%d (off): a destination reached at hundreds of connections a second exhausts the ports toward it with TIME_WAIT", n)
	}
	r.Verdict, r.Fix = Warn, fix
	return r
}

// fdOverhead are the descriptors an agent holds besides its TCP relays:
// UDP sessions (1024 at most), DNS upstream queries (256), the TAP, logs,
// the control socket, epoll and the runtime's own.
const fdOverhead = 1024 + 256 + 64

func checkNoFile(env *Env, o Options) Result {
	r := Result{Name: "open files"}
	soft, hard, err := env.NoFile()
	if err != nil {
		r.Verdict, r.Detail = Warn, "RLIMIT_NOFILE: "+errText(err)
		return r
	}
	need := uint64(o.MaxConnections) + fdOverhead
	// Go raises the soft limit to the hard one at start-up: the hard limit
	// is what an agent gets.
	r.Detail = fmt.Sprintf("limit %d (soft %d, raised to the hard limit at start); an agent at --max-connections %d with full UDP and DNS tables holds about %d", hard, soft, o.MaxConnections, need)
	r.Fix = fmt.Sprintf("ulimit -Hn %d before msbtap run (LimitNOFILE=%d in a systemd unit), or a lower --max-connections", need, need)
	switch {
	case hard < uint64(o.MaxConnections)+64:
		r.Verdict = Fail
		r.Detail += ": connections past the limit fail (EMFILE) long before the cap"
	case hard < need:
		r.Verdict = Warn
		r.Detail += ": a busy agent runs out of descriptors and refuses flows"
	}
	if max, err := sysctlInt(env, "fs.file-max"); err == nil && max > 0 && uint64(max) < need*64 {
		if r.Verdict == OK {
			r.Verdict = Warn
			r.Fix = fmt.Sprintf("sysctl -w fs.file-max=%d", need*1024)
		}
		r.Detail += fmt.Sprintf("; fs.file-max %d holds fewer than 64 such agents", max)
	}
	return r
}

func checkSystemd(env *Env) Result {
	r := Result{Name: "systemd (CNI)"}
	if _, err := env.Stat("/run/systemd/system"); err != nil {
		r.Verdict = Warn
		r.Detail = "systemd is not running: msbtap-cni's agents run detached in a session of their own, inside the container runtime's cgroup (a restart of its service that kills the cgroup stops every pod's network)"
		r.Fix = "run the container runtime under systemd, or KillMode=process for its service; only the CNI plugin cares"
		return r
	}
	if _, err := env.LookPath("systemd-run"); err != nil {
		r.Verdict = Warn
		r.Detail = "systemd runs but systemd-run is not on PATH: msbtap-cni cannot give each agent a scope of its own"
		r.Fix = "apt-get install systemd (systemd-run), or add its directory to the runtime's PATH"
		return r
	}
	r.Detail = "systemd runs: msbtap-cni puts each agent in a scope of its own (msbtap-cni-<id>.scope)"
	return r
}

func hasWord(s, w string) bool {
	for _, f := range strings.Fields(s) {
		if f == w {
			return true
		}
	}
	return false
}

// errText is an error without the path fs errors repeat.
func errText(err error) string {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	return err.Error()
}
