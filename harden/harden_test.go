package harden

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"

	"github.com/elastic/go-seccomp-bpf/arch"
	"go.uber.org/goleak"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// runHardened builds internal/testkit/hardentest without cgo, as make build builds
// msbtap, and runs it as root: it hardens itself and tries what a hijacked
// agent would.
func runHardened(t *testing.T, env ...string) map[string]string {
	t.Helper()
	return runHardenedBuild(t, "0", env...)
}

// runHardenedBuild is runHardened for a build with CGO_ENABLED=cgo.
func runHardenedBuild(t *testing.T, cgo string, env ...string) map[string]string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root (capabilities and seccomp as the agent has them); run `make test` as root")
	}
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..")
	bin := filepath.Join(t.TempDir(), "hardentest")
	build := exec.Command("go", "build", "-o", bin, "./internal/testkit/hardentest")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED="+cgo)
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	cmd := exec.Command(bin)
	// As a supervisor starts the agent: SIGWINCH (ignored) if this thread
	// goes; it must survive the change of user.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGWINCH}
	cmd.Env = append(os.Environ(), append([]string{"TMP=" + t.TempDir()}, env...)...)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("the hardened process died: %v\n%s", err, out) // refused, never killed
	}
	res := map[string]string{}
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if res["apply"] != "" {
		t.Fatalf("Apply: %s", res["apply"])
	}
	return res
}

// testUID is an unprivileged uid and gid no one else uses, like the
// agent's own.
const testUID = "2130706431"

// TestForbiddenCallsAreRefused: after Apply, namespace, mount, ptrace and
// exec calls fail with EPERM and the process lives on; sockets work; only
// the kept capability remains, with no_new_privs.
func TestForbiddenCallsAreRefused(t *testing.T) {
	res := runHardened(t, "HARDEN_UID="+testUID, "HARDEN_GID="+testUID)
	for _, call := range []string{"unshare", "setns", "mount", "execve", "ptrace"} {
		if !strings.Contains(res[call], "operation not permitted") {
			t.Errorf("%s: %q, want it refused with EPERM", call, res[call])
		}
	}
	if res["tcp"] != "ok" {
		t.Errorf("a TCP connection on loopback: %s", res["tcp"])
	}
	netRaw := fmt.Sprintf("%016x", uint64(1)<<13)
	for k, want := range map[string]string{"NoNewPrivs": "1", "Seccomp": "2", "CapEff": netRaw, "CapPrm": netRaw,
		"CapInh": "0000000000000000", "CapAmb": "0000000000000000"} {
		if res[k] != want {
			t.Errorf("%s: %s, want %s", k, res[k], want)
		}
	}
}

// TestNotRootAfterApply: the hardened process is an unprivileged user with
// no groups and CAP_NET_RAW, and what a hijacked agent would do to the host
// fails: writing /etc/shadow, creating files (in /etc, or anywhere),
// chmod, signalling PID 1, becoming root again, making itself dumpable
// (ptrace-able and readable by its uid), packet sockets, raw TCP, Unix
// sockets, netfilter. What the agent does still works: TCP, raw ICMP
// sockets for the echo relay, route netlink, a file opened before, a
// supervisor's parent-death signal (which the change of user clears).
func TestNotRootAfterApply(t *testing.T) {
	res := runHardened(t, "HARDEN_UID="+testUID, "HARDEN_GID="+testUID)
	ids := strings.Repeat(testUID+" ", 4)
	for k, want := range map[string]string{"Uid": ids[:len(ids)-1], "Gid": ids[:len(ids)-1], "Groups": "",
		"getdumpable": "0", "pdeathsig": "28", "tcp": "ok", "icmp": "ok", "icmp6": "ok", "route": "ok", "write_before": "ok"} {
		if res[k] != want {
			t.Errorf("%s: %q, want %q", k, res[k], want)
		}
	}
	for _, k := range []string{"shadow", "create_etc", "create_tmp", "chmod", "kill1", "setuid0", "dumpable",
		"packet", "rawtcp", "unix", "netfilter"} {
		if res[k] == "ok" || res[k] == "" {
			t.Errorf("%s: %q, want it refused", k, res[k])
		}
	}
	if !strings.HasSuffix(res["threads"], " alike") {
		t.Errorf("threads: %s", res["threads"])
	}
}

// TestCgoBuild: built with cgo (as go install builds on a machine with a
// C compiler), the process drops all the same, on every thread.
func TestCgoBuild(t *testing.T) {
	if _, err := exec.LookPath("gcc"); err != nil {
		t.Skip("skipping: no gcc for a cgo build (make deps installs it)")
	}
	res := runHardenedBuild(t, "1", "HARDEN_UID="+testUID, "HARDEN_GID="+testUID)
	netRaw := fmt.Sprintf("%016x", uint64(1)<<13)
	for k, want := range map[string]string{"Uid": strings.TrimSpace(strings.Repeat(testUID+" ", 4)), "Groups": "",
		"CapEff": netRaw, "CapPrm": netRaw, "NoNewPrivs": "1", "Seccomp": "2", "tcp": "ok", "icmp": "ok"} {
		if res[k] != want {
			t.Errorf("%s: %q, want %q", k, res[k], want)
		}
	}
	for _, k := range []string{"shadow", "kill1", "setuid0", "dumpable", "packet", "execve"} {
		if res[k] == "ok" || res[k] == "" {
			t.Errorf("%s: %q, want it refused", k, res[k])
		}
	}
	if !strings.HasSuffix(res["threads"], " alike") {
		t.Errorf("threads: %s", res["threads"])
	}
}

// TestNotRootWithoutSeccomp: without the filter the uid alone keeps the
// host's files and PID 1 out of reach, and a program the process runs
// gets no capability (CAP_NET_RAW stays with the process).
func TestNotRootWithoutSeccomp(t *testing.T) {
	res := runHardened(t, "HARDEN_UID="+testUID, "HARDEN_GID="+testUID, "SECCOMP=off")
	for _, k := range []string{"shadow", "create_etc", "chmod", "kill1", "setuid0"} {
		if res[k] == "ok" || res[k] == "" {
			t.Errorf("%s: %q, want it refused", k, res[k])
		}
	}
	if res["exec"] != "ok" || res["childCapEff"] != "0000000000000000" || res["childCapPrm"] != "0000000000000000" {
		t.Errorf("a program run after: %s, CapEff %s CapPrm %s, want no capability", res["exec"], res["childCapEff"], res["childCapPrm"])
	}
	if res["icmp"] != "ok" {
		t.Errorf("raw ICMP socket: %s", res["icmp"])
	}
}

// TestStayRoot: without a uid (the keeper's case) only the kept
// capability remains; without the seccomp list (where a program it runs
// could be root again) the bounding set is emptied too.
func TestStayRoot(t *testing.T) {
	netRaw := fmt.Sprintf("%016x", uint64(1)<<13)
	res := runHardened(t)
	if res["CapEff"] != netRaw || res["CapPrm"] != netRaw || !strings.HasPrefix(res["Uid"], "0 ") {
		t.Errorf("CapEff %s CapPrm %s Uid %s, want %s, %s, root", res["CapEff"], res["CapPrm"], res["Uid"], netRaw, netRaw)
	}
	if !strings.Contains(res["mount"], "operation not permitted") {
		t.Errorf("mount: %q", res["mount"])
	}
	res = runHardened(t, "SECCOMP=off")
	if res["CapBnd"] != netRaw || res["childCapEff"] != netRaw {
		t.Errorf("without seccomp: CapBnd %s, a program run after has CapEff %s, want %s", res["CapBnd"], res["childCapEff"], netRaw)
	}
}

// TestSeccompOff: without the filter the same calls are refused by missing
// capabilities instead, and no filter is loaded.
func TestSeccompOff(t *testing.T) {
	res := runHardened(t, "SECCOMP=off")
	if res["Seccomp"] != "0" || res["NoNewPrivs"] != "1" {
		t.Errorf("Seccomp %s NoNewPrivs %s, want 0 and 1", res["Seccomp"], res["NoNewPrivs"])
	}
	if res["unshare"] == "ok" || res["mount"] == "ok" {
		t.Errorf("unshare %q, mount %q: refused by capabilities", res["unshare"], res["mount"])
	}
}

// TestFilterDecides runs the filter in a BPF interpreter: what it allows
// and refuses, by call and argument, and that every jump lands forward
// inside the program (the kernel refuses anything else).
func TestFilterDecides(t *testing.T) {
	info, err := arch.GetInfo("")
	if err != nil {
		t.Skip(err)
	}
	ins, err := program(Options{Signal: []int{4242, -4242}})
	if err != nil {
		t.Fatal(err)
	}
	for i, in := range ins {
		if j, ok := in.(bpf.JumpIf); ok && (i+1+int(j.SkipTrue) >= len(ins) || i+1+int(j.SkipFalse) >= len(ins)) {
			t.Fatalf("instruction %d (%v) jumps outside the program", i, in)
		}
	}
	if len(ins) > 4096 {
		t.Fatalf("%d instructions, more than the kernel takes", len(ins))
	}
	vm, err := bpf.NewVM(ins)
	if err != nil {
		t.Fatal(err)
	}
	// The interpreter reads 32-bit words big endian; the kernel reads
	// them in the host's order: store each word as the kernel sees it.
	call := func(name string, args ...uint64) bool {
		b := make([]byte, 64)
		put := func(off int, v uint32) {
			b[off], b[off+1], b[off+2], b[off+3] = byte(v>>24), byte(v>>16), byte(v>>8), byte(v)
		}
		put(0, uint32(info.SyscallNames[name]))
		put(4, auditArches[runtime.GOARCH])
		for i, a := range args {
			put(16+8*i, uint32(a))
			put(20+8*i, uint32(a>>32))
		}
		r, err := vm.Run(b)
		if err != nil {
			t.Fatal(err)
		}
		return uint32(r) == unix.SECCOMP_RET_ALLOW
	}
	neg := func(v int) uint64 { return uint64(int64(v)) }
	self := uint64(os.Getpid())
	for _, c := range []struct {
		name string
		args []uint64
		want bool
	}{
		{"read", nil, true},
		{"socket", []uint64{unix.AF_INET, unix.SOCK_STREAM | unix.SOCK_NONBLOCK | unix.SOCK_CLOEXEC, 0}, true},
		{"socket", []uint64{unix.AF_INET6, unix.SOCK_DGRAM | unix.SOCK_CLOEXEC, 0}, true},
		{"socket", []uint64{unix.AF_INET, unix.SOCK_RAW | unix.SOCK_NONBLOCK | unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP}, true},
		{"socket", []uint64{unix.AF_INET6, unix.SOCK_RAW, unix.IPPROTO_ICMPV6}, true},
		{"socket", []uint64{unix.AF_NETLINK, unix.SOCK_RAW | unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE}, true},
		{"socket", []uint64{unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_TCP}, false},
		{"socket", []uint64{unix.AF_INET6, unix.SOCK_RAW, unix.IPPROTO_UDP}, false},
		{"socket", []uint64{unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_RAW}, false},
		{"socket", []uint64{unix.AF_PACKET, unix.SOCK_RAW, 0x300}, false},
		{"socket", []uint64{unix.AF_UNIX, unix.SOCK_STREAM, 0}, false},
		{"socket", []uint64{unix.AF_NETLINK, unix.SOCK_RAW, unix.NETLINK_NETFILTER}, false},
		{"socket", []uint64{unix.AF_INET, unix.SOCK_STREAM, unix.IPPROTO_TCP}, true},
		{"clone", []uint64{unix.CLONE_VM | unix.CLONE_FS | unix.CLONE_FILES | unix.CLONE_SIGHAND | unix.CLONE_SYSVSEM | unix.CLONE_THREAD}, true},
		{"clone", []uint64{unix.CLONE_NEWUSER | unix.CLONE_NEWNET | unix.CLONE_NEWNS}, false},
		{"clone", []uint64{unix.CLONE_NEWPID | uint64(unix.SIGCHLD)}, false},
		{"clone3", []uint64{0, 88}, false},
		{"ioctl", []uint64{0, unix.TIOCSTI}, false},
		{"ioctl", []uint64{0, unix.TIOCLINUX}, false},
		{"ioctl", []uint64{0, unix.TCGETS}, true},
		{"ioctl", []uint64{5, unix.SIOCINQ}, true},
		{"socket", []uint64{unix.AF_INET6, unix.SOCK_DGRAM | unix.SOCK_CLOEXEC, unix.IPPROTO_UDP}, true},
		{"socket", []uint64{unix.AF_INET, unix.SOCK_DGRAM | unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP}, true},
		{"socket", []uint64{unix.AF_INET6, unix.SOCK_DGRAM, unix.IPPROTO_ICMPV6}, true},
		{"socket", []uint64{unix.AF_INET, unix.SOCK_STREAM, unix.IPPROTO_SCTP}, false},
		{"socket", []uint64{unix.AF_INET6, unix.SOCK_STREAM, 262}, false}, // IPPROTO_MPTCP
		{"socket", []uint64{unix.AF_INET, unix.SOCK_DGRAM, 115}, false},   // IPPROTO_L2TP
		{"socket", []uint64{unix.AF_INET, unix.SOCK_DGRAM, unix.IPPROTO_UDPLITE}, false},
		{"openat", []uint64{neg(unix.AT_FDCWD), 0, unix.O_RDONLY | unix.O_CLOEXEC}, true},
		{"openat", []uint64{neg(unix.AT_FDCWD), 0, unix.O_WRONLY | unix.O_APPEND}, true},
		{"openat", []uint64{neg(unix.AT_FDCWD), 0, unix.O_RDONLY | unix.O_DIRECTORY}, true},
		{"openat", []uint64{neg(unix.AT_FDCWD), 0, unix.O_WRONLY | unix.O_CREAT}, false},
		{"openat", []uint64{neg(unix.AT_FDCWD), 0, unix.O_RDWR | unix.O_TMPFILE}, false},
		{"prctl", []uint64{unix.PR_GET_DUMPABLE}, true},
		{"prctl", []uint64{unix.PR_SET_DUMPABLE, 1}, false},
		{"prctl", []uint64{unix.PR_SET_PTRACER, neg(-1)}, false},
		{"prctl", []uint64{unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_RAISE}, false},
		{"kill", []uint64{self, 0}, true},
		{"kill", []uint64{4242, 9}, true},
		{"kill", []uint64{neg(-4242), 9}, true},
		{"kill", []uint64{1, 0}, false},
		{"kill", []uint64{neg(-1), 9}, false},
		{"tgkill", []uint64{self, 7, 23}, true},
		{"tgkill", []uint64{1, 1, 9}, false},
		{"execve", nil, false},
		{"setresuid", []uint64{0, 0, 0}, false},
		{"capset", nil, false},
		{"fchmodat", nil, false},
		{"fchownat", nil, false},
		{"mknodat", nil, false},
		{"linkat", nil, false},
		{"symlinkat", nil, false},
		{"unlinkat", nil, false},
		{"renameat", nil, false},
		{"pidfd_open", nil, false},
		{"pidfd_send_signal", nil, false},
		{"ptrace", nil, false},
		{"setns", nil, false},
	} {
		if got := call(c.name, c.args...); got != c.want {
			t.Errorf("%s%v: allowed %v, want %v", c.name, c.args, got, c.want)
		}
	}
	// A keeper's filter lets it create, rename and remove files.
	if ins, err = program(Options{Files: true}); err != nil {
		t.Fatal(err)
	}
	if vm, err = bpf.NewVM(ins); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"unlinkat", "renameat", "openat"} {
		if !call(n, 0, 0, unix.O_CREAT) {
			t.Errorf("with Files: %s refused", n)
		}
	}
}
