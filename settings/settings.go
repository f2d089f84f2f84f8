// Package settings turns the settings of msbtap run — strings, numbers
// and lists by name, from the command line or a --config file — into the
// agent's Config, validated. Errors name the setting (see fielderr); the
// command line names the flag.
package settings

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/msbtap/msbtap/control"
	"github.com/msbtap/msbtap/dnsproxy"
	"github.com/msbtap/msbtap/intercept"
	"github.com/msbtap/msbtap/internal/fielderr"
	"github.com/msbtap/msbtap/internal/portspec"
	"github.com/msbtap/msbtap/internal/units"
	"github.com/msbtap/msbtap/netns"
	"github.com/msbtap/msbtap/plan"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/process"

	"github.com/msbtap/msbtap/sandbox"
	"github.com/msbtap/msbtap/secrets"
	"github.com/msbtap/msbtap/stack"
	"github.com/msbtap/msbtap/upstream"
)

// Source holds the settings, by the run flags' names (dns-upstream):
// the command line's, else a config file's, else the defaults.
type Source interface {
	String(name string) string
	Int(name string) int
	Bool(name string) bool
	Float(name string) float64
	Strings(name string) []string
	// IsGiven reports whether the setting was given at all.
	IsGiven(name string) bool
	// InlinePolicy is a policy object given in a config file, if any.
	InlinePolicy() (json.RawMessage, bool)
	// Args is the command to run.
	Args() []string
	// Err is the first setting that could not be read.
	Err() error
}

// ErrNothingToAttach: no namespace, no VM, no command.
var ErrNothingToAttach = errors.New("nothing to attach: give a network namespace, VM mode with a TAP name, or a command to run")

// key is a setting's name as errors give it.
func key(name string) string { return strings.ReplaceAll(name, "-", "_") }

// NewLogger makes the agent's logger.
func NewLogger(w io.Writer, format string, level slog.Level) *slog.Logger {
	ho := &slog.HandlerOptions{Level: level}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, ho))
	}
	return slog.New(slog.NewTextHandler(w, ho))
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

// Build turns the settings into the agent's Config, validated; the agent
// logs to logTo.
func Build(s Source, logTo io.Writer) (cfg process.Config, err error) {
	cfg.TapName, cfg.ReadyFD, cfg.PIDFile, cfg.Command = s.String("tap"), s.Int("ready-fd"), s.String("pid-file"), s.Args()
	cfg.TerminatedFD = s.Int("terminated-fd")
	cfg.VM, cfg.TapOwner = s.Bool("vm"), s.Int("tap-owner")
	offload, logFormat, level := s.String("offload"), s.String("log-format"), s.String("log-level")
	fastPath := s.String("fast-path")
	if s.IsGiven("netns") {
		if ns := s.String("netns"); ns == "" {
			return cfg, fielderr.Bad("netns", ns, "empty namespace name")
		} else {
			cfg.Netns = netns.Resolve(ns)
		}
	}
	slot, mtu := s.Int("slot"), 0
	if s.IsGiven("mtu") {
		if mtu = s.Int("mtu"); mtu == 0 {
			return cfg, fielderr.Bad("mtu", 0, "out of range 1280..65520")
		}
	}
	ov := plan.Overrides{GuestIPv4: s.String("guest-ipv4"), GuestIPv6: s.String("guest-ipv6"), GuestMAC: s.String("guest-mac"), MTU: mtu}
	ups := s.Strings("dns-upstream")
	cfg.MaxConnections, cfg.MetricsAddr, cfg.Pprof = s.Int("max-connections"), s.String("metrics-addr"), s.Bool("pprof")
	denyMode, onViolation := s.String("deny-mode"), s.String("on-violation")
	cfg.DNSBlock, cfg.DNSBlockSuffix, cfg.RebindProtection = s.Strings("dns-block"), s.Strings("dns-block-suffix"), !s.Bool("no-rebind-protection")
	cfg.OnTerminate, cfg.GuestPID, cfg.AuditLog = s.String("on-terminate"), s.Int("guest-pid"), s.String("audit-log")
	auditMax := s.String("audit-log-max-size")
	userSpec, seccompMode, memLimit := s.String("user"), s.String("seccomp"), s.String("memory-limit")
	cfg.CommandEnv = s.Strings("env")
	binds, bindsRO := s.Strings("bind"), s.Strings("bind-ro")
	pubs := s.Strings("publish")
	cfg.Control, cfg.Pcap = s.String("control"), s.String("pcap")
	ctlOwner, pcapMax, rateUp, rateDown := s.String("control-owner"), s.String("pcap-max-size"), s.String("rate-up"), s.String("rate-down")
	cfg.NewConnsPerSecond = s.Float("max-new-connections-per-second")
	tlsMode := s.String("tls-intercept")
	cfg.TLS.CACert, cfg.TLS.CAKey, cfg.TLS.CAOut = s.String("tls-ca-cert"), s.String("tls-ca-key"), s.String("tls-ca-out")
	cfg.TLS.UpstreamCA, cfg.TLS.Bypass = s.Strings("tls-upstream-ca"), s.Strings("tls-bypass")
	cfg.Upstream.URL, cfg.Upstream.Bypass = s.String("upstream-proxy"), s.Strings("upstream-proxy-bypass")
	cfg.Upstream.CredentialsFile, cfg.Upstream.CredentialsEnv = s.String("upstream-proxy-credentials-file"), s.String("upstream-proxy-credentials-env")
	secretFlags := s.Strings("secret")
	cfg.Learn, cfg.LearnSuffixDepth = s.String("learn"), s.Int("learn-suffix-depth")
	askTimeout := s.String("ask-timeout")
	cfg.AskExec, cfg.AskSave = s.String("ask-exec"), s.Bool("ask-save")
	cfg.Secrets.File, cfg.Secrets.EnvOut = s.String("secrets"), s.String("secrets-env-out")
	if err := s.Err(); err != nil {
		return cfg, err
	}

	if cfg.Offload, err = oneOf("offload", offload, map[string]bool{"on": true, "off": false}); err != nil {
		return cfg, err
	}
	if cfg.FastPath, err = oneOf("fast-path", fastPath, map[string]bool{"on": true, "off": false}); err != nil {
		return cfg, err
	}
	if cfg.NoSeccomp, err = oneOf("seccomp", seccompMode, map[string]bool{"on": false, "off": true}); err != nil {
		return cfg, err
	}
	if userSpec != "" && len(cfg.Command) == 0 {
		return cfg, fielderr.Bad("user", userSpec, "only with a command to run")
	}
	if len(cfg.Command) > 0 {
		if cfg.CommandUID, cfg.CommandGID, cfg.CommandGroups, err = sandbox.CommandCredentials(userSpec); err != nil {
			return cfg, fielderr.Bad("user", userSpec, "%w", err)
		}
	}
	if err := commandConfig(&cfg, binds, bindsRO); err != nil {
		return cfg, err
	}
	if cfg.VM {
		if cfg.Netns != "" {
			return cfg, fielderr.Bad("netns", cfg.Netns, "not in VM mode: a VM's TAP lives on the host")
		}
		if !s.IsGiven("tap") {
			cfg.TapName = fmt.Sprintf("msbtap%d", slot)
		}
	} else {
		if cfg.Netns == "" && len(cfg.Command) == 0 {
			return cfg, ErrNothingToAttach
		}
		if s.IsGiven("tap-owner") {
			return cfg, fielderr.Bad("tap_owner", cfg.TapOwner, "only in VM mode")
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
	if cfg.TerminatedFD == 0 || cfg.TerminatedFD == 1 || cfg.TerminatedFD == 2 || cfg.TerminatedFD < -1 || (cfg.TerminatedFD >= 0 && cfg.TerminatedFD == cfg.ReadyFD) {
		return cfg, fielderr.Bad("terminated_fd", cfg.TerminatedFD, "must be an inherited descriptor above 2, not the ready one")
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
	cfg.Log = NewLogger(logTo, logFormat, lvl)
	for _, u := range ups {
		p, err := dnsproxy.ParseUpstream(u)
		if err != nil {
			return cfg, fielderr.Wrap("dns_upstream", err)
		}
		cfg.DNSUpstreams = append(cfg.DNSUpstreams, p)
	}
	if cfg.MaxConnections < 1 {
		return cfg, fielderr.Bad("max_connections", cfg.MaxConnections, "must be at least 1")
	}
	if cfg.Pprof && cfg.MetricsAddr == "" {
		return cfg, fielderr.Bad("pprof", true, "needs a metrics address")
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
	if cfg.Upstream.Enabled() {
		if err := upstream.Validate(cfg.Upstream); err != nil {
			return cfg, err
		}
	} else {
		for _, k := range []string{"upstream-proxy-bypass", "upstream-proxy-credentials-file", "upstream-proxy-credentials-env"} {
			if s.IsGiven(k) {
				return cfg, fielderr.Bad(key(k), "…", "only with an upstream proxy")
			}
		}
	}
	if err := learnConfig(&cfg); err != nil {
		return cfg, err
	}
	if askTimeout != "" {
		if cfg.AskTimeout, err = time.ParseDuration(askTimeout); err != nil || cfg.AskTimeout < 100*time.Millisecond || cfg.AskTimeout > time.Hour {
			return cfg, fielderr.Bad("ask_timeout", askTimeout, "want a duration from 100ms to 1h, like 30s")
		}
	}
	if cfg.AskExec != "" {
		if cfg.AskExecUID, cfg.AskExecGID, _, err = sandbox.Credentials(""); err != nil {
			return cfg, fielderr.Bad("ask_exec", cfg.AskExec, "%w", err)
		}
	}
	return cfg, loadPolicy(s, &cfg)
}

// learnConfig checks the learn mode settings: the file's directory must
// exist (the file is written through a temporary file beside it).
func learnConfig(cfg *process.Config) error {
	if cfg.Learn == "" {
		if cfg.LearnSuffixDepth != 0 {
			return fielderr.Bad("learn_suffix_depth", cfg.LearnSuffixDepth, "only with a learn file")
		}
		return nil
	}
	if cfg.LearnSuffixDepth < 0 || cfg.LearnSuffixDepth == 1 {
		return fielderr.Bad("learn_suffix_depth", cfg.LearnSuffixDepth, "want 0 (exact names) or 2 and more labels")
	}
	p, err := filepath.Abs(cfg.Learn)
	if err != nil {
		return fielderr.Bad("learn", cfg.Learn, "%w", err)
	}
	if st, err := os.Stat(filepath.Dir(p)); err != nil || !st.IsDir() {
		return fielderr.Bad("learn", cfg.Learn, "its directory does not exist")
	}
	if st, err := os.Stat(p); err == nil && st.IsDir() {
		return fielderr.Bad("learn", cfg.Learn, "is a directory")
	}
	cfg.Learn = p
	return nil
}

// loadPolicy reads the policy setting: a preset, a file name, or (from a
// config file) an inline policy object; and the presets --allow adds.
func loadPolicy(s Source, cfg *process.Config) error {
	rules, err := policy.AllowRules(s.Strings("allow"))
	if err != nil {
		return fielderr.Wrap("allow", err)
	}
	cfg.Allow = rules
	if raw, ok := s.InlinePolicy(); ok {
		f, err := policy.ParseFile(raw)
		if err != nil {
			return fielderr.Wrap("policy", err)
		}
		cfg.Policy = f
		return nil
	}
	name := s.String("policy")
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

// commandConfig checks --env, --bind and --bind-ro.
func commandConfig(cfg *process.Config, binds, bindsRO []string) error {
	for i, list := range [][]string{cfg.CommandEnv, binds, bindsRO} {
		name := []string{"env", "bind", "bind-ro"}[i]
		if len(list) > 0 && len(cfg.Command) == 0 {
			return fielderr.Bad(key(name), list[0], "only with a command to run")
		}
		if len(list) > 0 && cfg.VM && name != "env" {
			return fielderr.Bad(key(name), list[0], "not in VM mode: the VMM shares the host's file system")
		}
	}
	for _, e := range cfg.CommandEnv {
		if err := sandbox.CheckEnvName(sandbox.EnvName(e)); err != nil {
			return fielderr.Bad("env", e, "%w", err)
		}
		if strings.IndexByte(e, 0) >= 0 {
			return fielderr.Bad("env", e, "holds a NUL byte")
		}
	}
	for i, list := range [][]string{binds, bindsRO} {
		for _, b := range list {
			p, err := sandbox.CheckBind(b)
			if err != nil {
				return fielderr.Bad(key([]string{"bind", "bind-ro"}[i]), b, "%w", err)
			}
			cfg.CommandBinds = append(cfg.CommandBinds, sandbox.Bind{Path: p, ReadOnly: i == 1})
		}
	}
	return nil
}

// controlConfig checks the control socket, capture and rate settings.
func controlConfig(cfg *process.Config, owner, pcapMax, up, down string) (err error) {
	cfg.ControlUID, cfg.ControlGID = -1, -1
	if owner != "" && cfg.Control == "" {
		return fielderr.Bad("control_owner", owner, "only with a control socket")
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
