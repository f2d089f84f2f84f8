// Package agent runs one sandbox's network from start to end: it builds the
// parts in order from a plain Config (policy, decision log, published ports,
// link, rings and pump, gateway, metrics), runs until the sandbox goes away
// or a fatal violation stops it, and tears everything down.
package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/ask"
	"github.com/msbtap/msbtap/audit"
	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/intercept"
	"github.com/msbtap/msbtap/internal/fielderr"
	"github.com/msbtap/msbtap/netns"
	"github.com/msbtap/msbtap/plan"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/proxy"
	"github.com/msbtap/msbtap/rings"
	"github.com/msbtap/msbtap/sandbox"
	"github.com/msbtap/msbtap/secrets"
	"github.com/msbtap/msbtap/stack"
	"github.com/msbtap/msbtap/tap"
	"github.com/msbtap/msbtap/upstream"
	"github.com/msbtap/msbtap/wire"
)

// Config is everything an agent is told, in plain Go types. Field errors
// name the configuration key (see fielderr).
type Config struct {
	// Netns is the path of the network namespace to attach to. Empty
	// means a fresh namespace for Command, or none in VM mode.
	Netns string
	// VM creates TapName on the host for a VMM instead of a TAP inside a
	// namespace; TapOwner (≥ 0) is the user allowed to open it.
	VM       bool
	TapName  string
	TapOwner int
	// Plan is the sandbox's addresses and MTU.
	Plan plan.Plan
	// Offload puts virtio net headers with TSO and checksum offload on the
	// TAP.
	Offload bool
	// FastPath carries the TCP flows the agent need not read on the TCP
	// translator (stack.Options.FastPath).
	FastPath bool
	// Command runs in the sandbox (in VM mode: in msbtap's own namespace)
	// as CommandUID:CommandGID with CommandGroups, with no capabilities,
	// in a PID and mount namespace of its own; the agent ends with it.
	Command       []string
	CommandUID    int
	CommandGID    int
	CommandGroups []int
	// CommandEnv adds to the command's environment, which is built from an
	// allow-list (sandbox.Environ): NAME (its value in msbtap's
	// environment) or NAME=VALUE. A secret's source variable is refused.
	CommandEnv []string
	// CommandBinds are host paths the command sees at their own path over
	// its private /run, /tmp, /var/tmp and /dev/shm (not in VM mode,
	// where the command shares msbtap's namespaces but for PIDs and mounts).
	CommandBinds []sandbox.Bind
	// NoSeccomp leaves out the agent's seccomp allow-list (it still drops
	// its capabilities and sets no_new_privs once set up).
	NoSeccomp bool
	// MemoryLimit is Go's soft memory limit for the agent (0: none).
	MemoryLimit int64
	// ReadyFD (≥ 3) is written "ready" and closed once the network works;
	// -1 for none.
	ReadyFD int
	// TerminatedFD (≥ 3; lower: none) is written "terminated" the moment a fatal
	// violation fires, before the network is cut, so that a supervisor
	// (msbtap-cni's) never restarts a sandbox that must stay stopped
	// however the agent then ends.
	TerminatedFD int
	// PIDFile receives the agent's pid while it runs.
	PIDFile string

	// DNSUpstreams are the resolvers the sandbox's queries go to (default:
	// the host's /etc/resolv.conf).
	DNSUpstreams []string
	// MaxConnections caps concurrent relayed TCP connections.
	MaxConnections int
	// MetricsAddr serves Prometheus /metrics (and, with Pprof, Go's
	// profiler).
	MetricsAddr string
	Pprof       bool

	// Policy is in force from the start; PolicyPath (if any) is re-read on
	// SIGHUP.
	Policy     *policy.File
	PolicyPath string
	// Allow are rules put before the policy's own, at start and at every
	// reload of PolicyPath (--allow's presets); a policy set through the
	// control socket is taken whole, as given.
	Allow []policy.FileRule
	// Learn, if set, is learn mode: what only the policy's default would
	// refuse is allowed and recorded, and this file gets a policy that
	// allows exactly what the run used (at exit and on SIGUSR1), names
	// of more than LearnSuffixDepth labels (≥ 2; 0: none) as suffixes.
	Learn            string
	LearnSuffixDepth int
	// AskTimeout denies a flow an ask rule holds when no answer came
	// (default ask.DefaultTimeout); AskExec is a shell command that gets
	// each question as JSON on stdin and prints its answer, run as
	// AskExecUID:AskExecGID; AskSave writes "always" rules to PolicyPath.
	AskTimeout             time.Duration
	AskExec                string
	AskExecUID, AskExecGID int
	AskSave                bool
	DenyMode               stack.DenyMode
	// DenyIsFatal makes every deny a terminate.
	DenyIsFatal              bool
	DNSBlock, DNSBlockSuffix []string
	RebindProtection         bool
	// OnTerminate is a shell command run after a fatal violation stopped
	// the sandbox; GuestPID a process to kill then.
	OnTerminate string
	GuestPID    int
	// AuditLog is a file (or "-" for stdout) for one JSON line per
	// decision (repeats folded); it rotates past AuditLogMaxBytes (default
	// audit.DefaultMaxBytes).
	AuditLog         string
	AuditLogMaxBytes int64
	// Publish are host ports relayed into the sandbox.
	Publish []proxy.PortSpec
	// TLS: name checks and interception.
	TLS TLSConfig
	// Secrets are swapped in for their placeholders on the wire.
	Secrets SecretsConfig
	// Upstream, when set, is the proxy every allowed TCP flow leaves
	// through.
	Upstream upstream.Config

	// Control is the path of the control socket (none if empty), owned by
	// ControlUID:ControlGID (-1: root).
	Control                string
	ControlUID, ControlGID int
	// Pcap captures every frame into a file from the start, rotated past
	// PcapMaxBytes (default capture.DefaultMaxBytes); a capture the control
	// socket starts stops there.
	Pcap         string
	PcapMaxBytes int64
	// RateUp and RateDown cap what the sandbox sends and receives, bytes a
	// second; NewConnsPerSecond the TCP connections it opens (0: no limit).
	RateUp, RateDown, NewConnsPerSecond float64

	Log *slog.Logger
}

// Agent is one running sandbox network.
type Agent struct {
	cfg Config
	log *slog.Logger
	// terminatedOut is Config.TerminatedFD, told of a fatal violation.
	terminatedOut *os.File
	popts         policy.Options
	holder        *policy.Holder
	// policyFile is the policy in force, as written.
	policyFile atomic.Pointer[policy.File]
	ctl        *controller
	sandboxPID atomic.Int32 // the -- COMMAND's init
	// keeper does the agent's file work once it is no longer root (nil
	// when there is none to do); armed once it has its paths.
	keeper *keeper
	armed  atomic.Bool
	// fileValues are the values of secrets from files, as the keeper
	// last read them (see getenv).
	fileValues atomic.Pointer[map[string]string]
	// links are the network devices the keeper removes at the end.
	links    []string
	ca       *intercept.CA
	l7       *intercept.Handler
	bundle   string // the CA bundle the command trusts
	secrets  *secrets.Store
	upstream *upstreamRoute  // nil without --upstream-proxy
	learner  *policy.Learner // learn mode's record, or nil
	asker    *ask.Asker
	// askRunner runs --ask-exec; started in Run, before privileges drop.
	askRunner atomic.Pointer[askRunner]
	audit     *audit.Log
	counts    *decisionCounts
	term      *terminator
	pub       *proxy.Publisher
	ns        netns.Handle
	shared    *rings.Shared
	pump      *tap.Pump
	gw        *stack.Stack
	gwRef     atomic.Pointer[stack.Stack] // gw, for the termination hook
	// sharedRef is shared, for the memory trimmer.
	sharedRef atomic.Pointer[rings.Shared]

	undo      []func() // teardown steps, run last to first
	closeOnce sync.Once
	closed    chan struct{}

	// secretSrc are the secrets' source variables in msbtap's environment,
	// which never reach the command.
	secretSrc []string
}

// New builds the sandbox's network in order — policy, decision log,
// published ports, link, rings and pump, gateway, metrics, pid file — and
// unwinds whatever it built if a step fails.
func New(cfg Config) (a *Agent, err error) {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	a = &Agent{cfg: cfg, log: cfg.Log, ns: netns.None(), counts: &decisionCounts{}, closed: make(chan struct{})}
	a.ctl = &controller{a: a, reg: prometheus.NewRegistry()}
	defer func() {
		if err != nil {
			a.Close()
			a = nil
		}
	}()
	if err := checkPrivileges(); err != nil {
		return a, err
	}
	if cfg.ReadyFD >= 0 {
		if _, err := unix.FcntlInt(uintptr(cfg.ReadyFD), unix.F_GETFD, 0); err != nil {
			return a, fielderr.Bad("ready_fd", cfg.ReadyFD, "not an open file descriptor")
		}
	}
	if cfg.TerminatedFD > 2 {
		if _, err := unix.FcntlInt(uintptr(cfg.TerminatedFD), unix.F_GETFD, 0); err != nil {
			return a, fielderr.Bad("terminated_fd", cfg.TerminatedFD, "not an open file descriptor")
		}
		unix.CloseOnExec(cfg.TerminatedFD)
		a.terminatedOut = os.NewFile(uintptr(cfg.TerminatedFD), "terminated-fd")
	}
	if cfg.needsKeeper() {
		// Started first, so that it starts while the rest is built, and
		// ends last: it removes the pid file and the control socket.
		if a.keeper, err = startKeeper(cfg.VM); err != nil {
			return a, err
		}
		a.onClose(a.keeper.finish)
	}
	a.onClose(startTrimmer(cfg.MemoryLimit, a.activity))
	if err := a.buildPolicy(); err != nil {
		return a, err
	}
	if err := a.buildUpstream(); err != nil {
		return a, err
	}
	// Published ports are bound before anything else exists, so a port in
	// use fails start-up with nothing half-made.
	if len(cfg.Publish) > 0 {
		if a.pub, err = proxy.ListenPublished(cfg.Publish); err != nil {
			return a, err
		}
		a.onClose(a.pub.Close)
	}
	dev, err := a.buildLink()
	if err != nil {
		return a, err
	}
	if err := a.buildGateway(dev); err != nil {
		return a, err
	}
	a.ctl.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		newCollector(a.shared, a.gw, a.pub, a.audit, a.counts, a.l7, a.secrets))
	if err := a.startControl(a.pump); err != nil {
		return a, err
	}
	if cfg.MetricsAddr != "" {
		m, err := startMetrics(cfg.MetricsAddr, cfg.Pprof, a.ctl.reg, a.log)
		if err != nil {
			return a, err
		}
		a.onClose(func() { m.Close() })
	}
	if cfg.PIDFile != "" {
		if err := writePIDFile(cfg.PIDFile); err != nil {
			return a, fielderr.Wrap("pid_file", err)
		}
		a.onClose(func() { os.Remove(cfg.PIDFile) })
	}
	return a, nil
}

func (a *Agent) onClose(f func()) { a.undo = append(a.undo, f) }

// needsKeeper says whether the agent has file work left once it is no
// longer root: files to rotate, to read again, or to remove at the end.
func (cfg *Config) needsKeeper() bool {
	return cfg.VM || cfg.PIDFile != "" || cfg.Control != "" || cfg.PolicyPath != "" || cfg.Learn != "" || cfg.Secrets.File != "" || (cfg.AuditLog != "" && cfg.AuditLog != "-") || cfg.Pcap != "" ||
		(cfg.TLS.Mode != intercept.Off && len(cfg.Command) > 0) // the CA bundle's directory
}

// rotator rotates path (what: "audit" or "pcap"): here while the agent is
// root, by the keeper once armed (nil without a keeper: the owner rotates
// it itself).
func (a *Agent) rotator(what, path string, flag int) func() (*os.File, error) {
	if a.keeper == nil {
		return nil
	}
	return func() (*os.File, error) {
		if a.armed.Load() {
			return a.keeper.rotate(what)
		}
		return keeperRotate(path, flag)
	}
}

// activity counts the frames the agent moved so far (0 before the rings
// exist).
func (a *Agent) activity() uint64 {
	if sh := a.sharedRef.Load(); sh != nil {
		return sh.Counters.TxFrames() + sh.Counters.RxFrames()
	}
	return 0
}

// writePIDFile writes the agent's pid without following a symbolic link.
func writePIDFile(path string) error {
	f, err := audit.OpenPrivate(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	_, err = f.WriteString(strconv.Itoa(os.Getpid()) + "\n")
	return errors.Join(err, f.Close())
}

// checkPrivileges fails early, with a clear message, when the agent lacks
// what creating and attaching a TAP needs.
func checkPrivileges() error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("read capabilities: %w", err)
	}
	has := func(c uint) bool { return data[c/32].Effective&(1<<(c%32)) != 0 }
	if !has(unix.CAP_NET_ADMIN) {
		return errors.New("missing CAP_NET_ADMIN: msbtap creates a TAP device and must run as root (or with sudo)")
	}
	if !has(unix.CAP_SYS_ADMIN) {
		return errors.New("missing CAP_SYS_ADMIN: msbtap enters the sandbox's network namespace and must run as root (or with sudo)")
	}
	return nil
}

// buildPolicy compiles the policy and opens the decision log: a bad
// audit-log path fails before anything is created.
func (a *Agent) buildPolicy() error {
	a.popts = policy.Options{Host: HostAddrs(a.cfg.Plan), Pins: policy.NewPins(0), DenyIsFatal: a.cfg.DenyIsFatal,
		RefuseQUIC: a.cfg.TLS.Mode == intercept.All || len(a.cfg.Secrets.Flags) > 0 || a.cfg.Secrets.File != ""}
	if a.cfg.Learn != "" {
		a.learner = policy.NewLearner()
		a.popts.Learn = a.learner
		// Registered first, so it runs last: every flow is over by then.
		a.onClose(a.writeLearned)
	}
	a.onClose(watchHostAddrs(a.cfg.Plan, a.popts.Host, a.log))
	a.buildAsk()
	f := policy.WithRulesFirst(a.cfg.Policy, a.cfg.Allow)
	engine, err := policy.Compile(f, a.popts)
	if err != nil {
		return fielderr.Wrap("policy", err)
	}
	a.holder = policy.NewHolder(engine)
	a.policyFile.Store(f)
	// The control socket streams the decision log: it runs (writing
	// nowhere) without --audit-log too.
	if a.cfg.AuditLog != "" || a.cfg.Control != "" {
		pins := a.popts.Pins
		a.audit, err = audit.Open(audit.Options{
			Path:     a.cfg.AuditLog,
			MaxBytes: a.cfg.AuditLogMaxBytes,
			Describe: func(d policy.Decision) string { return ruleLabel(d, a.holder.Load()) },
			Domain: func(ip netip.Addr) string {
				if names := pins.Lookup(ip); len(names) > 0 {
					return names[0]
				}
				return ""
			},
			Rotate: a.rotator("audit", a.cfg.AuditLog, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND),
			Log:    a.log.With("component", "audit"),
		})
		if err != nil {
			return fielderr.Wrap("audit_log", err)
		}
		a.onClose(func() { a.audit.Close() })
	}
	a.term = newTerminator(a.cutNetwork, a.cfg.OnTerminate, a.log)
	h := a.halt()
	a.term.halt.Store(&h)
	return nil
}

// buildLink creates the sandbox's link: a TAP inside its namespace (the
// user's, or a fresh one for the command), or a TAP on the host for a VMM.
func (a *Agent) buildLink() (*tap.File, error) {
	cfg := a.cfg
	if cfg.VM {
		vt, err := tap.CreateVMTap(cfg.TapName, cfg.TapOwner, cfg.Plan.MTU, cfg.Offload)
		if err != nil {
			return nil, err
		}
		a.onClose(func() { vt.Close() })
		a.links = vt.Created() // the keeper removes them in the end: the running agent cannot
		return vt.Agent, nil
	}
	var err error
	if cfg.Netns != "" {
		a.ns, err = netns.Open(cfg.Netns)
	} else {
		a.ns, err = netns.New()
	}
	if err != nil {
		return nil, err
	}
	a.onClose(func() { a.ns.Close() })
	if cfg.Netns == "" {
		// The command runs unprivileged: let it ping (ICMP datagram
		// sockets) and bind any port, in its own namespace only.
		for _, kv := range [][2]string{{"net.ipv4.ping_group_range", "0 2147483647"}, {"net.ipv4.ip_unprivileged_port_start", "0"}} {
			if err := netns.SetSysctl(a.ns, kv[0], kv[1]); err != nil {
				return nil, err
			}
		}
	}
	dev, err := tap.CreateInNetns(a.ns, cfg.TapName, cfg.Offload)
	if err != nil {
		return nil, err
	}
	a.onClose(func() { dev.Close() })
	if err := tap.ConfigureGuest(a.ns, dev.Name(), cfg.Plan); err != nil {
		return nil, fmt.Errorf("configure %s in the sandbox: %w", dev.Name(), err)
	}
	return dev, nil
}

// buildGateway starts the rings and pump on dev, then the gateway, and
// connects the published ports to it.
func (a *Agent) buildGateway(dev tap.Device) error {
	cfg := a.cfg
	sizes := wire.SizesFor(cfg.Plan.MTU, cfg.Offload)
	a.shared = rings.NewShared(rings.DefaultCapacity, sizes.Buffer)
	a.sharedRef.Store(a.shared)
	pump := tap.StartPump(dev, a.shared, sizes.MaxFrame, a.log.With("component", "tap"))
	a.pump = pump
	a.onClose(func() { pump.Close(); pump.Wait() })

	if err := a.buildSecrets(); err != nil {
		return err
	}
	if err := a.buildIntercept(); err != nil {
		return err
	}
	opts, err := a.stackOptions()
	if err != nil {
		return err
	}
	if a.gw, err = stack.New(opts); err != nil {
		return err
	}
	a.gwRef.Store(a.gw)
	a.onClose(func() { a.gw.Close(); a.gw.Wait() })
	a.onClose(a.asker.Close) // first: held flows are refused, then the gateway goes
	a.startPublished()
	return nil
}

// stackOptions are the gateway's options: the policy and its DNS guard,
// the resolvers, the hooks by which the agent logs, asks, dials, looks
// inside and terminates.
func (a *Agent) stackOptions() (stack.Options, error) {
	cfg := a.cfg
	guard, err := policy.NewDNSGuard(policy.DNSGuardOptions{
		Policy: a.holder, Pins: a.popts.Pins, Block: cfg.DNSBlock, BlockSuffix: cfg.DNSBlockSuffix, Ask: a.askDNS,
		RebindProtection: cfg.RebindProtection, StripECH: cfg.TLS.Mode == intercept.All || a.secrets != nil,
	})
	if err != nil {
		return stack.Options{}, fielderr.Wrap("dns_block", err)
	}
	ups := cfg.DNSUpstreams
	if len(ups) == 0 {
		ups = proxy.HostUpstreams(proxy.DefaultResolvConf)
		if len(ups) == 0 {
			a.log.Warn("no DNS upstream: none given and none in " + proxy.DefaultResolvConf + "; the sandbox's queries will get SERVFAIL")
		}
	}
	routes := newLocalRoutes()
	return stack.Options{
		Plan: cfg.Plan, Shared: a.shared, Policy: a.holder, DenyMode: cfg.DenyMode,
		OnDecision: a.onDecision, Terminate: a.terminateFlow, Ask: a.askFlow,
		DNSUpstreams: ups, DNSFilter: a.dnsFilter(guard), DNSHolds: guard.Holds,
		MaxConnections: cfg.MaxConnections, Offload: cfg.Offload,
		// The translator connects on its own: with an upstream proxy every
		// flow goes through the relay, whose dial the proxy takes.
		FastPath: cfg.FastPath && a.upstream == nil, WriteNow: a.pump.WriteNow,
		IsLocal: routes.IsLocal, IsBroadcast: routes.IsBroadcast,
		RateUp: cfg.RateUp, RateDown: cfg.RateDown, NewConnsPerSecond: cfg.NewConnsPerSecond,
		Dial: a.dialTCP, HandleTCP: a.l7.Handle, WantsTCP: a.l7.Wants,
		Log: a.log.With("component", "stack"),
	}, nil
}

// startPublished connects the published ports to the gateway.
func (a *Agent) startPublished() {
	if a.pub == nil {
		return
	}
	a.gw.SetIngressUDP(a.pub)
	a.pub.Start(proxy.PublishOptions{
		DialGuest:   a.gw.DialGuest,
		SendToGuest: a.gw.SendUDPToGuest,
		Allow:       a.gw.AllowIngress,
		Log:         a.log.With("component", "publish"),
	})
	for _, p := range a.cfg.Publish {
		a.log.Info("published", "host", p.Host, "guest_port", p.GuestPort, "proto", p.Proto)
	}
}

// cutNetwork cuts the sandbox off: the gateway refuses everything from now
// on and resets every open flow, published-port clients included.
func (a *Agent) cutNetwork() {
	if gw := a.gwRef.Load(); gw != nil {
		gw.Cut()
	}
	a.pub.ResetAll()
}

// onDecision is told of every flow decision: counted and logged (a
// terminate goes on to terminateFlow).
func (a *Agent) onDecision(fl *flow.Flow) {
	a.counts.add(fl.Decision.Action)
	a.audit.Decision(fl)
}

// Close tears the sandbox's network down, last part first: the command,
// the metrics, the gateway (every relayed flow reset), the pump, the link
// (the TAP disappears), the decision log. It is safe to call more than once.
func (a *Agent) Close() error {
	a.closeOnce.Do(func() {
		for i := len(a.undo) - 1; i >= 0; i-- {
			a.undo[i]()
		}
		close(a.closed)
	})
	return nil
}

// Wait blocks until Close has finished.
func (a *Agent) Wait() { <-a.closed }
