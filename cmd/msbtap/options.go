package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/msbtap/msbtap/internal/fielderr"
	"github.com/msbtap/msbtap/plan"
	"github.com/msbtap/msbtap/policy"
)

func runFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "config", Usage: "read settings from JSON `FILE` (keys are the flag names in snake_case; flags win)"},
		&cli.BoolFlag{Name: "vm", Usage: "VM mode: create a TAP named by --tap for the VMM to open (QEMU -netdev tap,ifname=NAME,script=no,downscript=no)"},
		&cli.StringFlag{Name: "offload", Value: "on", Usage: "on: virtio net headers with TCP segmentation and checksum offload on the TAP (64 KiB segments whatever the MTU); off: plain frames"},
		&cli.StringFlag{Name: "fast-path", Value: "off", Usage: "on: TCP flows the agent need not read (no name check, HTTP rule, secret or interception; no rate limit) go through the TCP translator, straight onto host sockets; off: every TCP flow through the userspace stack"},
		&cli.IntFlag{Name: "tap-owner", Value: -1, Usage: "VM mode: `UID` allowed to open the TAP (the VMM's user)"},
		&cli.StringFlag{Name: "user", Usage: "run -- COMMAND as `USER[:GROUP]` (default: the user who ran sudo unless that is root, else nobody:nogroup); always with no capabilities and no_new_privs. --user root is an explicit opt-in: uid 0 without capabilities still owns the host's root-owned files (/etc, /etc/cron.d, /root), so the command can change them"},
		&cli.StringSliceFlag{Name: "env", Usage: "give -- COMMAND the variable `NAME` (its value in msbtap's environment) or NAME=VALUE (repeatable); it gets only PATH, TERM, LANG, LC_ALL and the locale's LC_ categories, TZ, its user's HOME, USER, LOGNAME, SHELL and msbtap's own otherwise. A secret's source variable is refused"},
		&cli.StringSliceFlag{Name: "bind", Usage: "share host `PATH` with -- COMMAND, read-write, at the same path (over its private /run, /tmp, /var/tmp, /dev/shm; repeatable)"},
		&cli.StringSliceFlag{Name: "bind-ro", Usage: "share host `PATH` with -- COMMAND read-only, at the same path (repeatable)"},
		&cli.StringFlag{Name: "memory-limit", Value: "48MiB", Usage: "Go's soft memory limit for the agent, `SIZE` (off for none): the garbage collector works harder near it, so floods stay small; raise it for sandboxes with many busy connections"},
		&cli.StringFlag{Name: "seccomp", Value: "on", Usage: "on: once set up, msbtap refuses (EPERM) every system call off its allow-list; off: only drop capabilities"},
		&cli.StringFlag{Name: "netns", Usage: "attach to network namespace `NAME|PATH` (a name is looked up in /run/netns)"},
		&cli.StringFlag{Name: "tap", Value: "eth0", Usage: "`NAME` of the TAP interface (in VM mode: on the host; default msbtap<slot>)"},
		&cli.IntFlag{Name: "slot", Value: 0, Usage: "sandbox slot `N` (0..65535) the default addresses derive from"},
		&cli.IntFlag{Name: "mtu", Value: plan.DefaultMTU, Usage: "MTU of the sandbox's link"},
		&cli.StringFlag{Name: "guest-ipv4", Usage: "guest IPv4 address `A[/LEN]` (gateway = A-1)"},
		&cli.StringFlag{Name: "guest-ipv6", Usage: "guest IPv6 address `A[/LEN]` (gateway = A-1)"},
		&cli.StringFlag{Name: "guest-mac", Usage: "guest MAC address `M`"},
		&cli.IntFlag{Name: "ready-fd", Value: -1, Usage: "write a line to file descriptor `N` and close it once ready"},
		&cli.IntFlag{Name: "terminated-fd", Value: -1, Usage: "write \"terminated\" to file descriptor `N` the moment a fatal violation fires, before the network is cut (for a supervisor that must not restart a stopped sandbox)"},
		&cli.StringFlag{Name: "pid-file", Usage: "write msbtap's pid to `FILE`"},
		&cli.StringFlag{Name: "log-format", Value: "text", Usage: "log format: text or json"},
		&cli.StringFlag{Name: "log-level", Value: "info", Usage: "log level: debug, info, warn or error"},
		&cli.StringSliceFlag{Name: "dns-upstream", Usage: "forward the sandbox's DNS queries to `ADDR[:PORT]` (repeatable; default: the host's /etc/resolv.conf)"},
		&cli.IntFlag{Name: "max-connections", Value: 256, Usage: "cap on concurrent relayed TCP connections"},
		&cli.StringFlag{Name: "metrics-addr", Usage: "serve Prometheus /metrics on `ADDR` (host:port, in msbtap's own namespace)"},
		&cli.BoolFlag{Name: "pprof", Usage: "also serve Go's /debug/pprof on --metrics-addr (profiling)"},
		&cli.StringFlag{Name: "policy", Value: policy.DefaultPreset, Usage: "policy: a preset (none, public-only, non-local, allow-all) or a JSON `FILE`"},
		&cli.StringSliceFlag{Name: "allow", Usage: "allow the names of these presets (`PRESET[,PRESET…]`: pypi, npm, github, …; see msbtap policy explain --preset) before the policy's own rules (repeatable)"},
		&cli.StringFlag{Name: "learn", Usage: "learn mode: allow what only the policy's default would refuse (never metadata, the host, or an explicit deny) and write a policy allowing exactly what the run used to `FILE` (at exit and on SIGUSR1, atomically)"},
		&cli.IntFlag{Name: "learn-suffix-depth", Usage: "with --learn: write names of more than `N` labels (N ≥ 2) as domain_suffix rules on their last N labels (0: exact names only)"},
		&cli.StringFlag{Name: "ask-timeout", Value: "30s", Usage: "deny a flow an ask rule holds after `DURATION` without an answer"},
		&cli.StringFlag{Name: "ask-exec", Usage: "ask shell `CMD` about each new question of an ask rule: the question as JSON on its stdin, it prints allow, allow always, deny or deny always (run as the user who ran sudo, else root)"},
		&cli.BoolFlag{Name: "ask-save", Usage: "write the rules that \"always\" answers add to the policy file too (atomically)"},
		&cli.StringFlag{Name: "deny-mode", Value: "reject", Usage: "how denied flows are refused: reject (TCP RST, ICMP unreachable) or drop"},
		&cli.StringFlag{Name: "on-violation", Value: "deny", Usage: "deny, or terminate: every denied flow stops the sandbox"},
		&cli.StringSliceFlag{Name: "dns-block", Usage: "answer NXDOMAIN for `NAME` (repeatable)"},
		&cli.StringSliceFlag{Name: "dns-block-suffix", Usage: "answer NXDOMAIN for `SUFFIX` and every name under it (repeatable)"},
		&cli.BoolFlag{Name: "no-rebind-protection", Usage: "let public names resolve to private, loopback, link-local or metadata addresses"},
		&cli.StringFlag{Name: "on-terminate", Usage: "run shell `CMD` after a fatal violation stopped the sandbox (MSBTAP_VIOLATION_* in its environment)"},
		&cli.IntFlag{Name: "guest-pid", Usage: "`PID` to kill on a fatal violation (the VMM, say); with -- COMMAND its process group is killed"},
		&cli.StringFlag{Name: "audit-log", Usage: "write one JSON line per flow decision to `FILE` (- for stdout); repeats within a second fold into one line"},
		&cli.StringFlag{Name: "audit-log-max-size", Value: "64MiB", Usage: "rotate the audit log past `SIZE` (it becomes FILE.1): the log takes at most twice SIZE on disk"},
		&cli.StringSliceFlag{Name: "publish", Usage: "publish a sandbox port on the host: `[HOSTIP:]HOSTPORT[-END]:GUESTPORT[-END][/tcp|/udp]` (repeatable, -p for short; HOSTIP defaults to 127.0.0.1)"},
		&cli.StringFlag{Name: "control", Usage: "serve the control socket (HTTP+JSON; see msbtap ctl) at `PATH`, mode 0600"},
		&cli.StringFlag{Name: "control-owner", Usage: "`USER[:GROUP]` who owns the control socket (default: the user who ran sudo, else root)"},
		&cli.StringFlag{Name: "pcap", Usage: "capture every frame on the TAP, both ways, into pcap `FILE` (rotated to FILE.1 past --pcap-max-size)"},
		&cli.StringFlag{Name: "pcap-max-size", Value: "100MiB", Usage: "`SIZE` a capture file grows to: --pcap rotates, a capture started by msbtap ctl stops"},
		&cli.StringFlag{Name: "rate-up", Value: "off", Usage: "cap what the sandbox sends at `RATE` (100mbit, 20MB = bytes a second, off); paced, not dropped"},
		&cli.StringFlag{Name: "rate-down", Value: "off", Usage: "cap what the sandbox receives at `RATE` (as --rate-up)"},
		&cli.Float64Flag{Name: "max-new-connections-per-second", Usage: "TCP connections the sandbox may open a second, `N` (0: no limit); beyond, SYNs are reset"},
		&cli.StringFlag{Name: "tls-intercept", Value: "auto", Usage: "which TLS connections msbtap terminates: off, auto (those an HTTP rule or a secret needs) or all"},
		&cli.StringFlag{Name: "tls-ca-cert", Usage: "issue intercepted hosts' certificates from this CA certificate `FILE` (PEM; default: a CA made for the run, in memory)"},
		&cli.StringFlag{Name: "tls-ca-key", Usage: "the CA's private key `FILE` (PEM, mode 0600)"},
		&cli.StringFlag{Name: "tls-ca-out", Usage: "write the CA certificate to `FILE` for the guest to trust"},
		&cli.StringSliceFlag{Name: "tls-upstream-ca", Usage: "also trust this CA `FILE` (PEM) upstream, besides the host's roots (repeatable)"},
		&cli.StringSliceFlag{Name: "tls-bypass", Usage: "never intercept `NAME` (exact, or *.suffix): hosts that pin their certificates (repeatable)"},
		&cli.StringSliceFlag{Name: "secret", Usage: "a secret `NAME@HOST[,HOST…]`: the value is msbtap's environment variable NAME, the sandbox gets a placeholder in NAME, and msbtap swaps the value in on intercepted HTTPS to HOST (exact or *.suffix) only (repeatable)"},
		&cli.StringFlag{Name: "secrets", Usage: "secrets `FILE` (JSON, mode 0600; see README), re-read on SIGHUP"},
		&cli.StringFlag{Name: "secrets-env-out", Usage: "write the secrets' NAME=placeholder lines to `FILE` (for a VM or a namespace msbtap did not start)"},
		&cli.StringFlag{Name: "upstream-proxy", Usage: "send every allowed TCP flow through this proxy, `socks5://HOST:PORT` or http://HOST:PORT (CONNECT), after the policy decided; never with credentials in it"},
		&cli.StringFlag{Name: "upstream-proxy-credentials-file", Usage: "the upstream proxy's `FILE` holding USER:PASSWORD on one line (mode 0600)"},
		&cli.StringFlag{Name: "upstream-proxy-credentials-env", Usage: "the environment variable `NAME` holding the upstream proxy's USER:PASSWORD"},
		&cli.StringSliceFlag{Name: "upstream-proxy-bypass", Usage: "reach `CIDR|NAME` directly, not through the upstream proxy (an address, a CIDR, a name or *.suffix; repeatable)"},
		// -p is its own flag rather than an alias so that -p and --publish
		// can be mixed on one command line.
		&cli.StringSliceFlag{Name: "p", Hidden: true},
	}
}

// runOptions reads each option from the command line, else the --config
// file, else the flag's default. The first value that fails to decode is
// kept in err.
type runOptions struct {
	c       *cli.Context
	cfg     map[string]json.RawMessage
	cfgPath string
	err     error
}

func loadSettings(c *cli.Context) (*runOptions, error) {
	s := &runOptions{c: c}
	path := c.String("config")
	if path == "" {
		return s, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--config: %w", err)
	}
	if err := json.NewDecoder(bytes.NewReader(b)).Decode(&s.cfg); err != nil {
		return nil, fmt.Errorf("--config %s: %v", path, err)
	}
	known := map[string]bool{}
	for _, f := range c.Command.Flags {
		known[key(f.Names()[0])] = true
	}
	delete(known, "config")
	delete(known, "p")
	for k := range s.cfg {
		if !known[k] {
			return nil, fmt.Errorf("--config %s: unknown key %q (keys are the run flags in snake_case, e.g. dns_upstream)", path, k)
		}
	}
	s.cfgPath = path
	return s, nil
}

// key is a flag's configuration key, and the field name library errors use.
func key(flag string) string { return strings.ReplaceAll(flag, "-", "_") }

// get sets *v from the command line, else the config file, else the flag's
// default (via def).
func get[T any](s *runOptions, name string, v *T, def func(string) T) {
	if !s.c.IsSet(name) && s.cfg != nil {
		if raw, ok := s.cfg[key(name)]; ok {
			if err := json.Unmarshal(raw, v); err != nil && s.err == nil {
				s.err = fmt.Errorf("--config %s: %s: want %T", s.cfgPath, key(name), *v)
			}
			return
		}
	}
	*v = def(name)
}

// runOptions implements settings.Source.
func (s *runOptions) String(name string) (v string) { get(s, name, &v, s.c.String); return }
func (s *runOptions) Int(name string) (v int)       { get(s, name, &v, s.c.Int); return }
func (s *runOptions) Bool(name string) (v bool)     { get(s, name, &v, s.c.Bool); return }
func (s *runOptions) Float(name string) (v float64) { get(s, name, &v, s.c.Float64); return }
func (s *runOptions) Args() []string                { return s.c.Args().Slice() }
func (s *runOptions) Err() error                    { return s.err }

// Strings is a list setting; --publish takes -p's values too.
func (s *runOptions) Strings(name string) (v []string) {
	get(s, name, &v, s.c.StringSlice)
	if name == "publish" {
		v = append(v, s.c.StringSlice("p")...)
	}
	return v
}

// IsGiven reports whether the option came from the command line or config.
func (s *runOptions) IsGiven(name string) bool {
	_, ok := s.cfg[key(name)]
	return s.c.IsSet(name) || ok
}

// InlinePolicy is a config file's "policy" when it is an object.
func (s *runOptions) InlinePolicy() (json.RawMessage, bool) {
	raw, ok := s.cfg["policy"]
	var name string
	if !ok || s.c.IsSet("policy") || json.Unmarshal(raw, &name) == nil {
		return nil, false
	}
	return raw, true
}

// flagError names the flag (or config key) in a library's field error.
func (s *runOptions) flagError(err error) error {
	return asFlagError(err, func(field string) string {
		if _, fromCfg := s.cfg[field]; fromCfg && !s.c.IsSet(strings.ReplaceAll(field, "_", "-")) {
			return fmt.Sprintf("%s (in --config %s)", field, s.cfgPath)
		}
		return ""
	})
}

// asFlagError turns the field a library's error names into its flag (or
// what name gives, when it gives one).
func asFlagError(err error, name func(field string) string) error {
	var fe *fielderr.Error
	if err == nil || !errors.As(err, &fe) {
		return err
	}
	n := "--" + strings.ReplaceAll(fe.Field, "_", "-")
	if name != nil {
		if m := name(fe.Field); m != "" {
			n = m
		}
	}
	msg := strings.Replace(err.Error(), fe.Field, n, 1)
	var ee *exitError
	if errors.As(err, &ee) {
		return withStatus(ee.code, errors.New(msg))
	}
	return errors.New(msg)
}
