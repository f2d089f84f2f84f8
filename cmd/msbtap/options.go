package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/msbtap/msbtap/plan"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/proxy"
	"github.com/msbtap/msbtap/stack"
	"github.com/msbtap/msbtap/tap"
)

// runOptions is everything `msbtap run` was told, validated.
type runOptions struct {
	netns     string // path of the target namespace; "" = fresh one for the command
	tapName   string
	plan      plan.Plan
	readyFD   int // -1 = none
	pidFile   string
	logFormat string
	logLevel  slog.Level
	command   []string

	dnsUpstreams   []string
	maxConnections int
	metricsAddr    string

	policy         *policy.File
	policyPath     string // the file to re-read on SIGHUP; "" for presets and inline policies
	denyMode       stack.DenyMode
	denyIsFatal    bool
	dnsBlock       []string
	dnsBlockSuffix []string
	rebind         bool
	onTerminate    string
	guestPID       int
	auditLog       string
	publish        []proxy.PortSpec
	vm             bool
	tapOwner       int
	offload        bool
	pprof          bool
}

func runFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "config", Usage: "read settings from JSON `FILE` (keys are the flag names in snake_case; flags win)"},
		&cli.BoolFlag{Name: "vm", Usage: "VM mode: create a TAP named by --tap for the VMM to open (QEMU -netdev tap,ifname=NAME,script=no,downscript=no)"},
		&cli.StringFlag{Name: "offload", Value: "on", Usage: "on: virtio net headers with TCP segmentation and checksum offload on the TAP (64 KiB segments whatever the MTU); off: plain frames"},
		&cli.IntFlag{Name: "tap-owner", Value: -1, Usage: "VM mode: `UID` allowed to open the TAP (the VMM's user)"},
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
		&cli.StringFlag{Name: "audit-log", Usage: "write one JSON line per flow decision to `FILE` (- for stdout)"},
		&cli.StringSliceFlag{Name: "publish", Usage: "publish a sandbox port on the host: `[HOSTIP:]HOSTPORT[-END]:GUESTPORT[-END][/tcp|/udp]` (repeatable, -p for short; HOSTIP defaults to 127.0.0.1)"},
		// -p is its own flag rather than an alias so that -p and --publish
		// can be mixed on one command line.
		&cli.StringSliceFlag{Name: "p", Hidden: true},
	}
}

// settings reads each option from the command line, else the --config
// file, else the flag's default.
type settings struct {
	c       *cli.Context
	cfg     map[string]json.RawMessage
	cfgPath string
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
	d := json.NewDecoder(bytes.NewReader(b))
	if err := d.Decode(&s.cfg); err != nil {
		return nil, fmt.Errorf("--config %s: %v", path, err)
	}
	known := map[string]bool{}
	for _, f := range c.Command.Flags {
		known[strings.ReplaceAll(f.Names()[0], "-", "_")] = true
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

// fromConfig decodes the config value of flag name into v; it reports
// whether the config supplied it (the command line wins).
func (s *settings) fromConfig(name string, v any) (bool, error) {
	if s.c.IsSet(name) || s.cfg == nil {
		return false, nil
	}
	raw, ok := s.cfg[strings.ReplaceAll(name, "-", "_")]
	if !ok {
		return false, nil
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return false, fmt.Errorf("--config %s: %s: want %T", s.cfgPath, strings.ReplaceAll(name, "-", "_"), v)
	}
	return true, nil
}

func (s *settings) str(name string) (string, error) {
	var v string
	if ok, err := s.fromConfig(name, &v); ok || err != nil {
		return v, err
	}
	return s.c.String(name), nil
}

func (s *settings) int(name string) (int, error) {
	var v int
	if ok, err := s.fromConfig(name, &v); ok || err != nil {
		return v, err
	}
	return s.c.Int(name), nil
}

func (s *settings) bool(name string) (bool, error) {
	var v bool
	if ok, err := s.fromConfig(name, &v); ok || err != nil {
		return v, err
	}
	return s.c.Bool(name), nil
}

func (s *settings) strs(name string) ([]string, error) {
	var v []string
	if ok, err := s.fromConfig(name, &v); ok || err != nil {
		return v, err
	}
	return s.c.StringSlice(name), nil
}

// given reports whether the option came from the command line or config.
func (s *settings) given(name string) bool {
	if s.c.IsSet(name) {
		return true
	}
	_, ok := s.cfg[strings.ReplaceAll(name, "-", "_")]
	return ok
}

func parseRunOptions(c *cli.Context) (o runOptions, err error) {
	s, err := loadSettings(c)
	if err != nil {
		return o, err
	}
	// Collect the first decoding error; each option is then validated.
	var first error
	str := func(n string) string {
		v, err := s.str(n)
		if err != nil && first == nil {
			first = err
		}
		return v
	}
	num := func(n string) int {
		v, err := s.int(n)
		if err != nil && first == nil {
			first = err
		}
		return v
	}
	strs := func(n string) []string {
		v, err := s.strs(n)
		if err != nil && first == nil {
			first = err
		}
		return v
	}

	o.tapName, o.readyFD, o.pidFile, o.command = str("tap"), num("ready-fd"), str("pid-file"), c.Args().Slice()
	vm, err := s.bool("vm")
	if err != nil {
		return o, err
	}
	o.vm, o.tapOwner = vm, num("tap-owner")
	switch off := str("offload"); off {
	case "on":
		o.offload = true
	case "off":
	default:
		return o, fmt.Errorf("--offload %q: want on or off", off)
	}
	if s.given("netns") {
		ns := str("netns")
		if ns == "" {
			return o, errors.New("--netns: empty namespace name")
		}
		o.netns = tap.ResolveNetns(ns)
	}
	slot, mtu := num("slot"), 0
	if s.given("mtu") {
		if mtu = num("mtu"); mtu == 0 {
			return o, errors.New("--mtu 0: out of range 1280..65520")
		}
	}
	ov := plan.Overrides{GuestIPv4: str("guest-ipv4"), GuestIPv6: str("guest-ipv6"), GuestMAC: str("guest-mac"), MTU: mtu}
	o.logFormat = str("log-format")
	level := str("log-level")
	ups := strs("dns-upstream")
	o.maxConnections = num("max-connections")
	o.metricsAddr = str("metrics-addr")
	if o.pprof, err = s.bool("pprof"); err != nil {
		return o, err
	}
	if o.pprof && o.metricsAddr == "" {
		return o, errors.New("--pprof: needs --metrics-addr")
	}
	denyMode, onViolation := str("deny-mode"), str("on-violation")
	o.dnsBlock, o.dnsBlockSuffix = strs("dns-block"), strs("dns-block-suffix")
	noRebind, err := s.bool("no-rebind-protection")
	if err != nil && first == nil {
		first = err
	}
	o.rebind = !noRebind
	o.onTerminate, o.guestPID, o.auditLog = str("on-terminate"), num("guest-pid"), str("audit-log")
	pubs := append(strs("publish"), c.StringSlice("p")...)
	if first != nil {
		return o, first
	}

	if o.vm {
		if o.netns != "" {
			return o, errors.New("--vm and --netns: a VM's TAP lives on the host; give one or the other")
		}
		if !s.given("tap") {
			o.tapName = fmt.Sprintf("msbtap%d", slot)
		}
	} else {
		if o.netns == "" && len(o.command) == 0 {
			return o, errors.New("nothing to attach: give --netns NAME|PATH, --vm --tap NAME, or a command after --")
		}
		if s.given("tap-owner") {
			return o, errors.New("--tap-owner: only for --vm")
		}
	}
	if o.tapOwner < -1 {
		return o, fmt.Errorf("--tap-owner %d: not a user id", o.tapOwner)
	}
	if n := len(o.tapName); n == 0 || n > 15 || strings.ContainsAny(o.tapName, "/ \t\n:") {
		return o, fmt.Errorf("--tap %q: not a valid interface name (1 to 15 characters, no '/', ':' or spaces)", o.tapName)
	}
	p, err := plan.ForSlot(slot)
	if err != nil {
		return o, fmt.Errorf("--slot: %w", err)
	}
	if o.plan, err = p.Apply(ov); err != nil {
		return o, err
	}
	if o.readyFD == 0 || o.readyFD == 1 || o.readyFD == 2 || o.readyFD < -1 {
		return o, fmt.Errorf("--ready-fd %d: must be an inherited descriptor above 2", o.readyFD)
	}
	switch o.logFormat {
	case "text", "json":
	default:
		return o, fmt.Errorf("--log-format %q: want text or json", o.logFormat)
	}
	if err := o.logLevel.UnmarshalText([]byte(level)); err != nil {
		return o, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	for _, u := range ups {
		p, err := proxy.ParseUpstream(u)
		if err != nil {
			return o, fmt.Errorf("--dns-upstream: %w", err)
		}
		o.dnsUpstreams = append(o.dnsUpstreams, p)
	}
	if o.maxConnections < 1 {
		return o, fmt.Errorf("--max-connections %d: must be at least 1", o.maxConnections)
	}
	if o.metricsAddr != "" {
		if _, _, err := net.SplitHostPort(o.metricsAddr); err != nil {
			return o, fmt.Errorf("--metrics-addr %q: want HOST:PORT", o.metricsAddr)
		}
	}
	switch denyMode {
	case "reject":
		o.denyMode = stack.DenyReject
	case "drop":
		o.denyMode = stack.DenyDrop
	default:
		return o, fmt.Errorf("--deny-mode %q: want reject or drop", denyMode)
	}
	switch onViolation {
	case "deny":
	case "terminate":
		o.denyIsFatal = true
	default:
		return o, fmt.Errorf("--on-violation %q: want deny or terminate", onViolation)
	}
	if o.guestPID < 0 {
		return o, fmt.Errorf("--guest-pid %d: not a process id", o.guestPID)
	}
	if _, err := policy.NewDNSGuard(policy.DNSGuardOptions{Block: o.dnsBlock, BlockSuffix: o.dnsBlockSuffix}); err != nil {
		return o, fmt.Errorf("--dns-block: %w", err)
	}
	seen := map[string]string{}
	for _, spec := range pubs {
		ps, err := proxy.ParsePublish(spec)
		if err != nil {
			return o, err
		}
		for _, p := range ps {
			k := p.Proto + " " + p.Host.String()
			if prev, dup := seen[k]; dup {
				return o, fmt.Errorf("--publish %q: host port %s/%s is already published by %q", spec, p.Host, p.Proto, prev)
			}
			seen[k] = spec
		}
		o.publish = append(o.publish, ps...)
	}
	if err := s.loadPolicy(&o); err != nil {
		return o, err
	}
	return o, nil
}

// loadPolicy reads --policy (or the config's "policy": a preset, a file
// name, or an inline policy object).
func (s *settings) loadPolicy(o *runOptions) error {
	if !s.c.IsSet("policy") && s.cfg != nil {
		if raw, ok := s.cfg["policy"]; ok {
			var name string
			if json.Unmarshal(raw, &name) != nil {
				f, err := policy.ParseFile(raw)
				if err != nil {
					return fmt.Errorf("--config %s: %w", s.cfgPath, err)
				}
				o.policy = f
				return nil
			}
			return o.setPolicy(name)
		}
	}
	return o.setPolicy(s.c.String("policy"))
}

func (o *runOptions) setPolicy(name string) error {
	f, err := policy.Load(name)
	if err != nil {
		return fmt.Errorf("--policy: %w", err)
	}
	o.policy = f
	if _, preset := policy.Preset(name); !preset {
		o.policyPath = name
	}
	return nil
}
