package settings

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/msbtap/msbtap/ask"
	"github.com/msbtap/msbtap/audit"
	"github.com/msbtap/msbtap/capture"
	"github.com/msbtap/msbtap/control"
	"github.com/msbtap/msbtap/dnsproxy"
	"github.com/msbtap/msbtap/intercept"
	"github.com/msbtap/msbtap/internal/portspec"
	"github.com/msbtap/msbtap/internal/units"
	"github.com/msbtap/msbtap/netns"
	"github.com/msbtap/msbtap/plan"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/sandbox"
	"github.com/msbtap/msbtap/secrets"
	"github.com/msbtap/msbtap/stack"
	"github.com/msbtap/msbtap/upstream"
)

// table is every setting of msbtap run, in the order the help lists them.
// Each one's value func checks the value alone and sets the Config; its
// check, run once all are set, holds the rules that join it to others.
// Errors need not name the setting: Build does (see named).
var table = []Setting{
	{Name: "vm",
		Usage: "VM mode: create a TAP named by --tap for the VMM to open (QEMU -netdev tap,ifname=NAME,script=no,downscript=no)",
		value: boolean(func(b *build, v bool) error { b.VM = v; return nil }),
	},
	{Name: "offload", Default: "on",
		Usage: "on: virtio net headers with TCP segmentation and checksum offload on the TAP (64 KiB segments whatever the MTU); off: plain frames",
		value: text(func(b *build, v string) (err error) {
			b.Offload, err = choice(v, onOff)
			return err
		}),
	},
	{Name: "fast-path", Default: "off",
		Usage: "on: TCP flows the agent need not read (no name check, HTTP rule, secret or interception; no rate limit) go through the TCP translator, straight onto host sockets; off: every TCP flow through the userspace stack",
		value: text(func(b *build, v string) (err error) {
			b.FastPath, err = choice(v, onOff)
			return err
		}),
	},
	{Name: "tap-owner", Default: -1,
		Usage: "VM mode: `UID` allowed to open the TAP (the VMM's user)",
		value: integer(func(b *build, v int) error {
			if v < -1 {
				return errors.New("not a user id")
			}
			b.TapOwner = v
			return nil
		}),
		check: func(b *build, given bool) error {
			if given && !b.VM {
				return errors.New("only in VM mode")
			}
			return nil
		},
	},
	{Name: "user",
		Usage: "run -- COMMAND as `USER[:GROUP]` (default: the user who ran sudo unless that is root, else nobody:nogroup); always with no capabilities and no_new_privs. --user root is an explicit opt-in: uid 0 without capabilities still owns the host's root-owned files (/etc, /etc/cron.d, /root), so the command can change them",
		value: text(func(b *build, v string) (err error) {
			if v != "" && len(b.Command) == 0 {
				return errors.New("only with a command to run")
			}
			if len(b.Command) > 0 {
				b.CommandUID, b.CommandGID, b.CommandGroups, err = sandbox.CommandCredentials(v)
			}
			return err
		}),
	},
	{Name: "env",
		Usage: "give -- COMMAND the variable `NAME` (its value in msbtap's environment) or NAME=VALUE (repeatable); it gets only PATH, TERM, LANG, LC_ALL and the locale's LC_ categories, TZ, its user's HOME, USER, LOGNAME, SHELL and msbtap's own otherwise. A secret's source variable is refused",
		value: list(func(b *build, v []string) error {
			if err := needCommand(b, v); err != nil {
				return err
			}
			for _, e := range v {
				if err := sandbox.CheckEnvName(sandbox.EnvName(e)); err != nil {
					return bad(e, "%w", err)
				}
				if strings.IndexByte(e, 0) >= 0 {
					return bad(e, "holds a NUL byte")
				}
			}
			b.CommandEnv = v
			return nil
		}),
	},
	{Name: "bind",
		Usage: "share host `PATH` with -- COMMAND, read-write, at the same path (over its private /run, /tmp, /var/tmp, /dev/shm; repeatable)",
		value: list(func(b *build, v []string) error { return addBinds(b, v, false) }),
		check: func(b *build, _ bool) error { return notInVM(b, false) },
	},
	{Name: "bind-ro",
		Usage: "share host `PATH` with -- COMMAND read-only, at the same path (repeatable)",
		value: list(func(b *build, v []string) error { return addBinds(b, v, true) }),
		check: func(b *build, _ bool) error { return notInVM(b, true) },
	},
	{Name: "memory-limit", Default: "48MiB",
		Usage: "Go's soft memory limit for the agent, `SIZE` (off for none): the garbage collector works harder near it, so floods stay small; raise it for sandboxes with many busy connections",
		value: text(func(b *build, v string) (err error) {
			if v == "off" {
				return nil
			}
			if b.MemoryLimit, err = units.ParseSize(v); err != nil || b.MemoryLimit < 16<<20 {
				return errors.New("want a size of at least 16MiB, like 64MiB, or off")
			}
			return nil
		}),
	},
	{Name: "seccomp", Default: "on",
		Usage: "on: once set up, msbtap refuses (EPERM) every system call off its allow-list; off: only drop capabilities",
		value: text(func(b *build, v string) (err error) {
			b.NoSeccomp, err = choice(v, map[string]bool{"on": false, "off": true})
			return err
		}),
	},
	{Name: "netns", ifGiven: true,
		Usage: "attach to network namespace `NAME|PATH` (a name is looked up in /run/netns)",
		value: text(func(b *build, v string) error {
			if v == "" {
				return errors.New("empty namespace name")
			}
			b.Netns = netns.Resolve(v)
			return nil
		}),
		check: func(b *build, _ bool) error {
			if b.VM && b.Netns != "" {
				return bad(b.Netns, "not in VM mode: a VM's TAP lives on the host")
			}
			return nil
		},
	},
	{Name: "tap", Default: "eth0",
		Usage: "`NAME` of the TAP interface (in VM mode: on the host; default msbtap<slot>)",
		value: text(func(b *build, v string) error { b.TapName = v; return nil }),
		check: func(b *build, given bool) error {
			if b.VM && !given {
				b.TapName = fmt.Sprintf("msbtap%d", b.slot)
			}
			if n := len(b.TapName); n == 0 || n > 15 || strings.ContainsAny(b.TapName, "/ \t\n:") {
				return bad(b.TapName, "not a valid interface name (1 to 15 characters, no '/', ':' or spaces)")
			}
			return nil
		},
	},
	{Name: "slot",
		Usage: "sandbox slot `N` (0..65535) the default addresses derive from",
		value: integer(func(b *build, v int) error { b.slot = v; return nil }),
	},
	{Name: "mtu", Default: plan.DefaultMTU, ifGiven: true,
		Usage: "MTU of the sandbox's link",
		value: integer(func(b *build, v int) error {
			if v == 0 {
				return errors.New("out of range 1280..65520")
			}
			b.overrides.MTU = v
			return nil
		}),
	},
	{Name: "guest-ipv4",
		Usage: "guest IPv4 address `A[/LEN]` (gateway = A-1)",
		value: text(func(b *build, v string) error { b.overrides.GuestIPv4 = v; return nil }),
	},
	{Name: "guest-ipv6",
		Usage: "guest IPv6 address `A[/LEN]` (gateway = A-1)",
		value: text(func(b *build, v string) error { b.overrides.GuestIPv6 = v; return nil }),
	},
	{Name: "guest-mac",
		Usage: "guest MAC address `M`",
		value: text(func(b *build, v string) error { b.overrides.GuestMAC = v; return nil }),
	},
	{Name: "ready-fd", Default: -1,
		Usage: "write a line to file descriptor `N` and close it once ready",
		value: integer(func(b *build, v int) error {
			if !inheritedFD(v) {
				return errors.New("must be an inherited descriptor above 2")
			}
			b.ReadyFD = v
			return nil
		}),
	},
	{Name: "terminated-fd", Default: -1,
		Usage: "write \"terminated\" to file descriptor `N` the moment a fatal violation fires, before the network is cut (for a supervisor that must not restart a stopped sandbox)",
		value: integer(func(b *build, v int) error {
			if !inheritedFD(v) {
				return errors.New("must be an inherited descriptor above 2, not the ready one")
			}
			b.TerminatedFD = v
			return nil
		}),
		check: func(b *build, _ bool) error {
			if b.TerminatedFD >= 0 && b.TerminatedFD == b.ReadyFD {
				return errors.New("must be an inherited descriptor above 2, not the ready one")
			}
			return nil
		},
	},
	{Name: "pid-file",
		Usage: "write msbtap's pid to `FILE`",
		value: text(func(b *build, v string) error { b.PIDFile = v; return nil }),
	},
	{Name: "log-format", Default: "text",
		Usage: "log format: text or json",
		value: text(func(b *build, v string) error {
			if _, err := choice(v, map[string]bool{"text": true, "json": true}); err != nil {
				return err
			}
			b.logFormat = v
			return nil
		}),
	},
	{Name: "log-level", Default: "info",
		Usage: "log level: debug, info, warn or error",
		value: text(func(b *build, v string) error {
			if err := b.logLevel.UnmarshalText([]byte(v)); err != nil {
				return errors.New("want debug, info, warn or error")
			}
			return nil
		}),
	},
	{Name: "dns-upstream",
		Usage: "forward the sandbox's DNS queries to `ADDR[:PORT]` (repeatable; default: the host's /etc/resolv.conf)",
		value: list(func(b *build, v []string) error {
			for _, u := range v {
				p, err := dnsproxy.ParseUpstream(u)
				if err != nil {
					return err
				}
				b.DNSUpstreams = append(b.DNSUpstreams, p)
			}
			return nil
		}),
	},
	{Name: "max-connections", Default: stack.DefaultMaxConnections,
		Usage: "cap on concurrent relayed TCP connections",
		value: integer(func(b *build, v int) error {
			if v < 1 {
				return errors.New("must be at least 1")
			}
			b.MaxConnections = v
			return nil
		}),
	},
	{Name: "metrics-addr",
		Usage: "serve Prometheus /metrics on `ADDR` (host:port, in msbtap's own namespace)",
		value: text(func(b *build, v string) error {
			if v != "" {
				if _, _, err := net.SplitHostPort(v); err != nil {
					return errors.New("want HOST:PORT")
				}
			}
			b.MetricsAddr = v
			return nil
		}),
	},
	{Name: "pprof",
		Usage: "also serve Go's /debug/pprof on --metrics-addr (profiling)",
		value: boolean(func(b *build, v bool) error { b.Pprof = v; return nil }),
		check: func(b *build, _ bool) error {
			if b.Pprof && b.MetricsAddr == "" {
				return errors.New("needs a metrics address")
			}
			return nil
		},
	},
	{Name: "policy", Default: policy.DefaultPreset,
		Usage: "policy: a preset (none, public-only, non-local, allow-all) or a JSON `FILE`",
		value: text(func(b *build, v string) error {
			f, err := policy.Load(v)
			if err != nil {
				return unnamed(err)
			}
			b.Policy, b.PolicyPath = f, ""
			if _, preset := policy.Preset(v); !preset {
				b.PolicyPath = v
			}
			return nil
		}),
		object: func(b *build, raw json.RawMessage) error {
			f, err := policy.ParseFile(raw)
			b.Policy = f
			return unnamed(err)
		},
	},
	{Name: "allow",
		Usage: "allow the names of these presets (`PRESET[,PRESET…]`: pypi, npm, github, …; see msbtap policy explain --preset) before the policy's own rules (repeatable)",
		value: list(func(b *build, v []string) (err error) {
			b.Allow, err = policy.AllowRules(v)
			return err
		}),
	},
	{Name: "learn",
		Usage: "learn mode: allow what only the policy's default would refuse (never metadata, the host, or an explicit deny) and write a policy allowing exactly what the run used to `FILE` (at exit and on SIGUSR1, atomically)",
		value: text(func(b *build, v string) (err error) {
			if v == "" {
				return nil
			}
			p, err := filepath.Abs(v)
			if err != nil {
				return err
			}
			if st, err := os.Stat(filepath.Dir(p)); err != nil || !st.IsDir() {
				return errors.New("its directory does not exist")
			}
			if st, err := os.Stat(p); err == nil && st.IsDir() {
				return errors.New("is a directory")
			}
			b.Learn = p
			return nil
		}),
	},
	{Name: "learn-suffix-depth",
		Usage: "with --learn: write names of more than `N` labels (N ≥ 2) as domain_suffix rules on their last N labels (0: exact names only)",
		value: integer(func(b *build, v int) error { b.LearnSuffixDepth = v; return nil }),
		check: func(b *build, _ bool) error {
			switch {
			case b.Learn == "" && b.LearnSuffixDepth != 0:
				return errors.New("only with a learn file")
			case b.LearnSuffixDepth < 0 || b.LearnSuffixDepth == 1:
				return errors.New("want 0 (exact names) or 2 and more labels")
			}
			return nil
		},
	},
	{Name: "ask-timeout", Default: ask.DefaultTimeout.String(),
		Usage: "deny a flow an ask rule holds after `DURATION` without an answer",
		value: text(func(b *build, v string) (err error) {
			if v == "" {
				return nil
			}
			if b.AskTimeout, err = time.ParseDuration(v); err != nil || b.AskTimeout < 100*time.Millisecond || b.AskTimeout > time.Hour {
				return errors.New("want a duration from 100ms to 1h, like 30s")
			}
			return nil
		}),
	},
	{Name: "ask-exec",
		Usage: "ask shell `CMD` about each new question of an ask rule: the question as JSON on its stdin, it prints allow, allow always, deny or deny always (run as the user who ran sudo, else root)",
		value: text(func(b *build, v string) (err error) {
			if v != "" {
				b.AskExecUID, b.AskExecGID, _, err = sandbox.Credentials("")
			}
			b.AskExec = v
			return err
		}),
	},
	{Name: "ask-save",
		Usage: "write the rules that \"always\" answers add to the policy file too (atomically)",
		value: boolean(func(b *build, v bool) error { b.AskSave = v; return nil }),
	},
	{Name: "deny-mode", Default: "reject",
		Usage: "how denied flows are refused: reject (TCP RST, ICMP unreachable) or drop",
		value: text(func(b *build, v string) (err error) {
			b.DenyMode, err = choice(v, map[string]stack.DenyMode{"reject": stack.DenyReject, "drop": stack.DenyDrop})
			return err
		}),
	},
	{Name: "on-violation", Default: "deny",
		Usage: "deny, or terminate: every denied flow stops the sandbox",
		value: text(func(b *build, v string) (err error) {
			b.DenyIsFatal, err = choice(v, map[string]bool{"deny": false, "terminate": true})
			return err
		}),
	},
	{Name: "dns-block",
		Usage: "answer NXDOMAIN for `NAME` (repeatable)",
		value: list(func(b *build, v []string) error { b.DNSBlock = v; return nil }),
		check: func(b *build, _ bool) error {
			_, err := policy.NewDNSGuard(policy.DNSGuardOptions{Block: b.DNSBlock, BlockSuffix: b.DNSBlockSuffix})
			return err
		},
	},
	{Name: "dns-block-suffix",
		Usage: "answer NXDOMAIN for `SUFFIX` and every name under it (repeatable)",
		value: list(func(b *build, v []string) error { b.DNSBlockSuffix = v; return nil }),
	},
	{Name: "no-rebind-protection",
		Usage: "let public names resolve to private, loopback, link-local or metadata addresses",
		value: boolean(func(b *build, v bool) error { b.RebindProtection = !v; return nil }),
	},
	{Name: "on-terminate",
		Usage: "run shell `CMD` after a fatal violation stopped the sandbox (MSBTAP_VIOLATION_* in its environment)",
		value: text(func(b *build, v string) error { b.OnTerminate = v; return nil }),
	},
	{Name: "guest-pid",
		Usage: "`PID` to kill on a fatal violation (the VMM, say); with -- COMMAND its process group is killed",
		value: integer(func(b *build, v int) error {
			if v < 0 {
				return errors.New("not a process id")
			}
			b.GuestPID = v
			return nil
		}),
	},
	{Name: "audit-log",
		Usage: "write one JSON line per flow decision to `FILE` (- for stdout); repeats within a second fold into one line",
		value: text(func(b *build, v string) error { b.AuditLog = v; return nil }),
	},
	{Name: "audit-log-max-size", Default: units.FormatSize(audit.DefaultMaxBytes),
		Usage: "rotate the audit log past `SIZE` (it becomes FILE.1): the log takes at most twice SIZE on disk",
		value: text(func(b *build, v string) (err error) {
			if b.AuditLogMaxBytes, err = units.ParseSize(v); err != nil || b.AuditLogMaxBytes < 4096 {
				return errors.New("want a size of at least 4KiB, like 64MiB or 1GB")
			}
			return nil
		}),
	},
	{Name: "publish", Short: "p",
		Usage: "publish a sandbox port on the host: `[HOSTIP:]HOSTPORT[-END]:GUESTPORT[-END][/tcp|/udp]` (repeatable, -p for short; HOSTIP defaults to 127.0.0.1)",
		value: list(func(b *build, v []string) (err error) {
			b.Publish, err = portspec.ParseAll(v)
			return err
		}),
	},
	{Name: "control",
		Usage: "serve the control socket (HTTP+JSON; see msbtap ctl) at `PATH`, mode 0600",
		value: text(func(b *build, v string) (err error) {
			if v != "" {
				v, err = filepath.Abs(v)
			}
			b.Control = v
			return err
		}),
	},
	{Name: "control-owner",
		Usage: "`USER[:GROUP]` who owns the control socket (default: the user who ran sudo, else root)",
		value: text(func(b *build, v string) error { b.controlOwner = v; return nil }),
		check: func(b *build, _ bool) error {
			if b.Control == "" {
				b.ControlUID, b.ControlGID = -1, -1
				if b.controlOwner != "" {
					return errors.New("only with a control socket")
				}
				return nil
			}
			var err error
			b.ControlUID, b.ControlGID, _, err = sandbox.Credentials(b.controlOwner)
			return err
		},
	},
	{Name: "pcap",
		Usage: "capture every frame on the TAP, both ways, into pcap `FILE` (rotated to FILE.1 past --pcap-max-size)",
		value: text(func(b *build, v string) error { b.Pcap = v; return nil }),
	},
	{Name: "pcap-max-size", Default: units.FormatSize(capture.DefaultMaxBytes),
		Usage: "`SIZE` a capture file grows to: --pcap rotates, a capture started by msbtap ctl stops",
		value: text(func(b *build, v string) (err error) {
			if b.PcapMaxBytes, err = units.ParseSize(v); err != nil || b.PcapMaxBytes < 64<<10 {
				return errors.New("want a size of at least 64KiB, like 100MiB")
			}
			return nil
		}),
	},
	{Name: "rate-up", Default: "off",
		Usage: "cap what the sandbox sends at `RATE` (100mbit, 20MB = bytes a second, off); paced, not dropped",
		value: text(func(b *build, v string) (err error) {
			if b.RateUp, err = control.ParseRate(v); err != nil {
				return errors.New(wantRate)
			}
			return nil
		}),
	},
	{Name: "rate-down", Default: "off",
		Usage: "cap what the sandbox receives at `RATE` (as --rate-up)",
		value: text(func(b *build, v string) (err error) {
			if b.RateDown, err = control.ParseRate(v); err != nil {
				return errors.New(wantRate)
			}
			return nil
		}),
	},
	{Name: "max-new-connections-per-second",
		Usage: "TCP connections the sandbox may open a second, `N` (0: no limit); beyond, SYNs are reset",
		value: float(func(b *build, v float64) error {
			if v < 0 {
				return errors.New("must be 0 (no limit) or more")
			}
			b.NewConnsPerSecond = v
			return nil
		}),
	},
	{Name: "tls-intercept", Default: "auto",
		Usage: "which TLS connections msbtap terminates: off, auto (those an HTTP rule or a secret needs) or all",
		value: text(func(b *build, v string) (err error) {
			if b.TLS.Mode, err = intercept.ParseMode(v); err != nil {
				return errors.New("want off, auto or all")
			}
			return nil
		}),
	},
	{Name: "tls-ca-cert",
		Usage: "issue intercepted hosts' certificates from this CA certificate `FILE` (PEM; default: a CA made for the run, in memory)",
		value: text(func(b *build, v string) error { b.TLS.CACert = v; return nil }),
	},
	{Name: "tls-ca-key",
		Usage: "the CA's private key `FILE` (PEM, mode 0600)",
		value: text(func(b *build, v string) error { b.TLS.CAKey = v; return nil }),
	},
	{Name: "tls-ca-out",
		Usage: "write the CA certificate to `FILE` for the guest to trust",
		value: text(func(b *build, v string) error { b.TLS.CAOut = v; return nil }),
	},
	{Name: "tls-upstream-ca",
		Usage: "also trust this CA `FILE` (PEM) upstream, besides the host's roots (repeatable)",
		value: list(func(b *build, v []string) error { b.TLS.UpstreamCA = v; return nil }),
	},
	{Name: "tls-bypass",
		Usage: "never intercept `NAME` (exact, or *.suffix): hosts that pin their certificates (repeatable)",
		value: list(func(b *build, v []string) error {
			for _, n := range v {
				if strings.Trim(n, "*.") == "" || strings.Contains(strings.TrimPrefix(n, "*."), "*") {
					return bad(n, "want a name, or *.suffix")
				}
			}
			b.TLS.Bypass = v
			return nil
		}),
	},
	{Name: "secret",
		Usage: "a secret `NAME@HOST[,HOST…]`: the value is msbtap's environment variable NAME, the sandbox gets a placeholder in NAME, and msbtap swaps the value in on intercepted HTTPS to HOST (exact or *.suffix) only (repeatable)",
		value: list(func(b *build, v []string) error {
			for _, f := range v {
				sp, err := secrets.ParseFlag(f)
				if err != nil {
					return bad(f, "%v", err)
				}
				b.Secrets.Flags = append(b.Secrets.Flags, sp)
			}
			return nil
		}),
	},
	{Name: "secrets",
		Usage: "secrets `FILE` (JSON, mode 0600; see README), re-read on SIGHUP",
		value: text(func(b *build, v string) error { b.Secrets.File = v; return nil }),
	},
	{Name: "secrets-env-out",
		Usage: "write the secrets' NAME=placeholder lines to `FILE` (for a VM or a namespace msbtap did not start)",
		value: text(func(b *build, v string) error { b.Secrets.EnvOut = v; return nil }),
	},
	{Name: "upstream-proxy",
		Usage: "send every allowed TCP flow through this proxy, `socks5://HOST:PORT` or http://HOST:PORT (CONNECT), after the policy decided; never with credentials in it",
		value: text(func(b *build, v string) error { b.Upstream.URL = v; return nil }),
		check: func(b *build, _ bool) error {
			if !b.Upstream.Enabled() {
				return nil
			}
			return upstream.Validate(b.Upstream)
		},
	},
	{Name: "upstream-proxy-credentials-file",
		Usage: "the upstream proxy's `FILE` holding USER:PASSWORD on one line (mode 0600)",
		value: text(func(b *build, v string) error { b.Upstream.CredentialsFile = v; return nil }),
		check: func(b *build, given bool) error { return needUpstream(b, given) },
	},
	{Name: "upstream-proxy-credentials-env",
		Usage: "the environment variable `NAME` holding the upstream proxy's USER:PASSWORD",
		value: text(func(b *build, v string) error { b.Upstream.CredentialsEnv = v; return nil }),
		check: func(b *build, given bool) error { return needUpstream(b, given) },
	},
	{Name: "upstream-proxy-bypass",
		Usage: "reach `CIDR|NAME` directly, not through the upstream proxy (an address, a CIDR, a name or *.suffix; repeatable)",
		value: list(func(b *build, v []string) error { b.Upstream.Bypass = v; return nil }),
		check: func(b *build, given bool) error { return needUpstream(b, given) },
	},
}
