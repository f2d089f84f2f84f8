package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/msbtap/msbtap/agent"
	"github.com/msbtap/msbtap/control"
	"github.com/msbtap/msbtap/intercept"
	"github.com/msbtap/msbtap/internal/fielderr"
	"github.com/msbtap/msbtap/internal/portspec"
	"github.com/msbtap/msbtap/internal/units"
	"github.com/msbtap/msbtap/netns"
	"github.com/msbtap/msbtap/plan"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/proxy"
	"github.com/msbtap/msbtap/sandbox"
	"github.com/msbtap/msbtap/secrets"
	"github.com/msbtap/msbtap/stack"
)

func runFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "config", Usage: "read settings from JSON `FILE` (keys are the flag names in snake_case; flags win)"},
		&cli.BoolFlag{Name: "vm", Usage: "VM mode: create a TAP named by --tap for the VMM to open (QEMU -netdev tap,ifname=NAME,script=no,downscript=no)"},
		&cli.StringFlag{Name: "offload", Value: "on", Usage: "on: virtio net headers with TCP segmentation and checksum offload on the TAP (64 KiB segments whatever the MTU); off: plain frames"},
		&cli.IntFlag{Name: "tap-owner", Value: -1, Usage: "VM mode: `UID` allowed to open the TAP (the VMM's user)"},
		&cli.StringFlag{Name: "user", Usage: "run -- COMMAND as `USER[:GROUP]` (default: the user who ran sudo, else root); always with no capabilities and no_new_privs"},
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
		&cli.StringFlag{Name: "pid-file", Usage: "write msbtap's pid to `FILE`"},
		&cli.StringFlag{Name: "log-format", Value: "text", Usage: "log format: text or json"},
		&cli.StringFlag{Name: "log-level", Value: "info", Usage: "log level: debug, info, warn or error"},
		&cli.StringSliceFlag{Name: "dns-upstream", Usage: "forward the sandbox's DNS queries to `ADDR[:PORT]` (repeatable; default: the host's /etc/resolv.conf)"},
		&cli.IntFlag{Name: "max-connections", Value: 256, Usage: "cap on concurrent relayed TCP connections"},
		&cli.StringFlag{Name: "metrics-addr", Usage: "serve Prometheus /metrics on `ADDR` (host:port, in msbtap's own namespace)"},
		&cli.BoolFlag{Name: "pprof", Usage: "also serve Go's /debug/pprof on --metrics-addr (profiling)"},
		&cli.StringFlag{Name: "policy", Value: policy.DefaultPreset, Usage: "policy: a preset (none, public-only, non-local, allow-all) or a JSON `FILE`"},
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
		// -p is its own flag rather than an alias so that -p and --publish
		// can be mixed on one command line.
		&cli.StringSliceFlag{Name: "p", Hidden: true},
	}
}

// settings reads each option from the command line, else the --config
// file, else the flag's default. The first value that fails to decode is
// kept in err.
type settings struct {
	c       *cli.Context
	cfg     map[string]json.RawMessage
	cfgPath string
	err     error
}

func loadSettings(c *cli.Context) (*settings, error) {
	s := &settings{c: c}
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
func get[T any](s *settings, name string, v *T, def func(string) T) {
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

func (s *settings) str(name string) (v string)    { get(s, name, &v, s.c.String); return }
func (s *settings) int(name string) (v int)       { get(s, name, &v, s.c.Int); return }
func (s *settings) bool(name string) (v bool)     { get(s, name, &v, s.c.Bool); return }
func (s *settings) strs(name string) (v []string) { get(s, name, &v, s.c.StringSlice); return }

// given reports whether the option came from the command line or config.
func (s *settings) given(name string) bool {
	_, ok := s.cfg[key(name)]
	return s.c.IsSet(name) || ok
}

// flagError names the flag (or config key) in a library's field error.
func (s *settings) flagError(err error) error {
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

func oneOf[T any](flag, v string, choices map[string]T) (T, error) {
	if c, ok := choices[v]; ok {
		return c, nil
	}
	var zero T
	names := make([]string, 0, len(choices))
	for k := range choices {
		names = append(names, k)
	}
	return zero, fielderr.Bad(key(flag), v, "want one of %s", strings.Join(names, ", "))
}

// agentConfig turns the settings into the agent's Config, validated.
func (s *settings) agentConfig() (cfg agent.Config, err error) {
	c := s.c
	cfg.TapName, cfg.ReadyFD, cfg.PIDFile, cfg.Command = s.str("tap"), s.int("ready-fd"), s.str("pid-file"), c.Args().Slice()
	cfg.VM, cfg.TapOwner = s.bool("vm"), s.int("tap-owner")
	offload, logFormat, level := s.str("offload"), s.str("log-format"), s.str("log-level")
	if s.given("netns") {
		if ns := s.str("netns"); ns == "" {
			return cfg, errors.New("--netns: empty namespace name")
		} else {
			cfg.Netns = netns.Resolve(ns)
		}
	}
	slot, mtu := s.int("slot"), 0
	if s.given("mtu") {
		if mtu = s.int("mtu"); mtu == 0 {
			return cfg, fielderr.Bad("mtu", 0, "out of range 1280..65520")
		}
	}
	ov := plan.Overrides{GuestIPv4: s.str("guest-ipv4"), GuestIPv6: s.str("guest-ipv6"), GuestMAC: s.str("guest-mac"), MTU: mtu}
	ups := s.strs("dns-upstream")
	cfg.MaxConnections, cfg.MetricsAddr, cfg.Pprof = s.int("max-connections"), s.str("metrics-addr"), s.bool("pprof")
	denyMode, onViolation := s.str("deny-mode"), s.str("on-violation")
	cfg.DNSBlock, cfg.DNSBlockSuffix, cfg.RebindProtection = s.strs("dns-block"), s.strs("dns-block-suffix"), !s.bool("no-rebind-protection")
	cfg.OnTerminate, cfg.GuestPID, cfg.AuditLog = s.str("on-terminate"), s.int("guest-pid"), s.str("audit-log")
	auditMax := s.str("audit-log-max-size")
	userSpec, seccompMode, memLimit := s.str("user"), s.str("seccomp"), s.str("memory-limit")
	pubs := append(s.strs("publish"), c.StringSlice("p")...)
	cfg.Control, cfg.Pcap = s.str("control"), s.str("pcap")
	ctlOwner, pcapMax, rateUp, rateDown := s.str("control-owner"), s.str("pcap-max-size"), s.str("rate-up"), s.str("rate-down")
	get(s, "max-new-connections-per-second", &cfg.NewConnsPerSecond, c.Float64)
	tlsMode := s.str("tls-intercept")
	cfg.TLS.CACert, cfg.TLS.CAKey, cfg.TLS.CAOut = s.str("tls-ca-cert"), s.str("tls-ca-key"), s.str("tls-ca-out")
	cfg.TLS.UpstreamCA, cfg.TLS.Bypass = s.strs("tls-upstream-ca"), s.strs("tls-bypass")
	secretFlags := s.strs("secret")
	cfg.Secrets.File, cfg.Secrets.EnvOut = s.str("secrets"), s.str("secrets-env-out")
	if s.err != nil {
		return cfg, s.err
	}

	if cfg.Offload, err = oneOf("offload", offload, map[string]bool{"on": true, "off": false}); err != nil {
		return cfg, err
	}
	if cfg.NoSeccomp, err = oneOf("seccomp", seccompMode, map[string]bool{"on": false, "off": true}); err != nil {
		return cfg, err
	}
	if userSpec != "" && len(cfg.Command) == 0 {
		return cfg, errors.New("--user: only with -- COMMAND")
	}
	if len(cfg.Command) > 0 {
		if cfg.CommandUID, cfg.CommandGID, cfg.CommandGroups, err = sandbox.Credentials(userSpec); err != nil {
			return cfg, fielderr.Bad("user", userSpec, "%w", err)
		}
	}
	if cfg.VM {
		if cfg.Netns != "" {
			return cfg, errors.New("--vm and --netns: a VM's TAP lives on the host; give one or the other")
		}
		if !s.given("tap") {
			cfg.TapName = fmt.Sprintf("msbtap%d", slot)
		}
	} else {
		if cfg.Netns == "" && len(cfg.Command) == 0 {
			return cfg, errors.New("nothing to attach: give --netns NAME|PATH, --vm --tap NAME, or a command after --")
		}
		if s.given("tap-owner") {
			return cfg, errors.New("--tap-owner: only for --vm")
		}
	}
	if cfg.TapOwner < -1 {
		return cfg, fielderr.Bad("tap_owner", cfg.TapOwner, "not a user id")
	}
	if n := len(cfg.TapName); n == 0 || n > 15 || strings.ContainsAny(cfg.TapName, "/ \t\n:") {
		return cfg, fielderr.Bad("tap", cfg.TapName, "not a valid interface name (1 to 15 characters, no '/', ':' or spaces)")
	}
	p, err := plan.ForSlot(slot)
	if err != nil {
		return cfg, err
	}
	if cfg.Plan, err = p.Apply(ov); err != nil {
		return cfg, err
	}
	if cfg.ReadyFD == 0 || cfg.ReadyFD == 1 || cfg.ReadyFD == 2 || cfg.ReadyFD < -1 {
		return cfg, fielderr.Bad("ready_fd", cfg.ReadyFD, "must be an inherited descriptor above 2")
	}
	if _, err := oneOf("log-format", logFormat, map[string]bool{"text": true, "json": true}); err != nil {
		return cfg, err
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		return cfg, fielderr.Bad("log_level", level, "want debug, info, warn or error")
	}
	cfg.Log = newLogger(os.Stderr, logFormat, lvl)
	for _, u := range ups {
		p, err := proxy.ParseUpstream(u)
		if err != nil {
			return cfg, fielderr.Wrap("dns_upstream", err)
		}
		cfg.DNSUpstreams = append(cfg.DNSUpstreams, p)
	}
	if cfg.MaxConnections < 1 {
		return cfg, fielderr.Bad("max_connections", cfg.MaxConnections, "must be at least 1")
	}
	if cfg.Pprof && cfg.MetricsAddr == "" {
		return cfg, errors.New("--pprof: needs --metrics-addr")
	}
	if cfg.MetricsAddr != "" {
		if _, _, err := net.SplitHostPort(cfg.MetricsAddr); err != nil {
			return cfg, fielderr.Bad("metrics_addr", cfg.MetricsAddr, "want HOST:PORT")
		}
	}
	if cfg.DenyMode, err = oneOf("deny-mode", denyMode, map[string]stack.DenyMode{"reject": stack.DenyReject, "drop": stack.DenyDrop}); err != nil {
		return cfg, err
	}
	if cfg.DenyIsFatal, err = oneOf("on-violation", onViolation, map[string]bool{"deny": false, "terminate": true}); err != nil {
		return cfg, err
	}
	if cfg.AuditLogMaxBytes, err = units.ParseSize(auditMax); err != nil || cfg.AuditLogMaxBytes < 4096 {
		return cfg, fielderr.Bad("audit_log_max_size", auditMax, "want a size of at least 4KiB, like 64MiB or 1GB")
	}
	if memLimit != "off" {
		if cfg.MemoryLimit, err = units.ParseSize(memLimit); err != nil || cfg.MemoryLimit < 16<<20 {
			return cfg, fielderr.Bad("memory_limit", memLimit, "want a size of at least 16MiB, like 64MiB, or off")
		}
	}
	if cfg.GuestPID < 0 {
		return cfg, fielderr.Bad("guest_pid", cfg.GuestPID, "not a process id")
	}
	if _, err := policy.NewDNSGuard(policy.DNSGuardOptions{Block: cfg.DNSBlock, BlockSuffix: cfg.DNSBlockSuffix}); err != nil {
		return cfg, fielderr.Wrap("dns_block", err)
	}
	if cfg.Publish, err = portspec.ParseAll(pubs); err != nil {
		return cfg, err
	}
	if err := controlConfig(&cfg, ctlOwner, pcapMax, rateUp, rateDown); err != nil {
		return cfg, err
	}
	if cfg.TLS.Mode, err = intercept.ParseMode(tlsMode); err != nil {
		return cfg, fielderr.Bad("tls_intercept", tlsMode, "want off, auto or all")
	}
	for _, f := range secretFlags {
		sp, err := secrets.ParseFlag(f)
		if err != nil {
			return cfg, fielderr.Bad("secret", f, "%v", err)
		}
		cfg.Secrets.Flags = append(cfg.Secrets.Flags, sp)
	}
	for _, b := range cfg.TLS.Bypass {
		if strings.Trim(b, "*.") == "" || strings.Contains(strings.TrimPrefix(b, "*."), "*") {
			return cfg, fielderr.Bad("tls_bypass", b, "want a name, or *.suffix")
		}
	}
	return cfg, s.loadPolicy(&cfg)
}

// loadPolicy reads --policy (or the config's "policy": a preset, a file
// name, or an inline policy object).
func (s *settings) loadPolicy(cfg *agent.Config) error {
	name := s.c.String("policy")
	if raw, ok := s.cfg["policy"]; ok && !s.c.IsSet("policy") {
		if json.Unmarshal(raw, &name) != nil {
			f, err := policy.ParseFile(raw)
			if err != nil {
				return fmt.Errorf("--config %s: %w", s.cfgPath, err)
			}
			cfg.Policy = f
			return nil
		}
	}
	f, err := policy.Load(name)
	if err != nil {
		return fielderr.Wrap("policy", err)
	}
	cfg.Policy = f
	if _, preset := policy.Preset(name); !preset {
		cfg.PolicyPath = name
	}
	return nil
}

// controlConfig checks the control socket, capture and rate settings.
func controlConfig(cfg *agent.Config, owner, pcapMax, up, down string) (err error) {
	cfg.ControlUID, cfg.ControlGID = -1, -1
	if owner != "" && cfg.Control == "" {
		return errors.New("--control-owner: only with --control")
	}
	if cfg.Control != "" {
		if cfg.Control, err = filepath.Abs(cfg.Control); err != nil {
			return fielderr.Bad("control", cfg.Control, "%w", err)
		}
		if cfg.ControlUID, cfg.ControlGID, _, err = sandbox.Credentials(owner); err != nil {
			return fielderr.Bad("control_owner", owner, "%w", err)
		}
	}
	if cfg.PcapMaxBytes, err = units.ParseSize(pcapMax); err != nil || cfg.PcapMaxBytes < 64<<10 {
		return fielderr.Bad("pcap_max_size", pcapMax, "want a size of at least 64KiB, like 100MiB")
	}
	if cfg.RateUp, err = control.ParseRate(up); err != nil {
		return fielderr.Bad("rate_up", up, "want a rate like 100mbit, 20MB (bytes a second) or off")
	}
	if cfg.RateDown, err = control.ParseRate(down); err != nil {
		return fielderr.Bad("rate_down", down, "want a rate like 100mbit, 20MB (bytes a second) or off")
	}
	if cfg.NewConnsPerSecond < 0 {
		return fielderr.Bad("max_new_connections_per_second", cfg.NewConnsPerSecond, "must be 0 (no limit) or more")
	}
	return nil
}
