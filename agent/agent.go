// Package agent runs one sandbox's network from start to end: it builds the
// parts in order from a plain Config (policy, decision log, published ports,
// link, rings and pump, gateway, metrics), runs until the sandbox goes away
// or a fatal violation stops it, and tears everything down.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/msbtap/msbtap/ask"
	"github.com/msbtap/msbtap/audit"
	"github.com/msbtap/msbtap/dnsproxy"
	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/intercept"
	"github.com/msbtap/msbtap/internal/fielderr"
	"github.com/msbtap/msbtap/internal/portspec"
	"github.com/msbtap/msbtap/internal/safefile"
	"github.com/msbtap/msbtap/plan"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/publish"
	"github.com/msbtap/msbtap/rings"
	"github.com/msbtap/msbtap/secrets"
	"github.com/msbtap/msbtap/stack"
	"github.com/msbtap/msbtap/tap"
	"github.com/msbtap/msbtap/upstream"
	"github.com/msbtap/msbtap/wire"
)

// Config is everything the network is told, in plain Go types. Field
// errors name the configuration key (see fielderr).
type Config struct {
	// Link is the sandbox's end of the network, made by the caller (a TAP
	// in the sandbox's namespace or for a VMM; tap/taptest's in tests):
	// the agent reads and writes it from New to Close, and closes it.
	Link tap.Device
	// Plan is the sandbox's addresses and MTU.
	Plan plan.Plan
	// Offload says Link carries virtio net headers with TSO and checksum
	// offload.
	Offload bool
	// FastPath carries the TCP flows the agent need not read on the TCP
	// translator (stack.Options.FastPath).
	FastPath bool
	// ForCommand says a command runs in the sandbox behind this network:
	// its CA bundle is written (see BundleDir), and the environment it got
	// at the start bounds what a secrets reload may take as a source.
	ForCommand bool
	// CommandEnv is the command's --env (NAME or NAME=VALUE), checked so
	// that no secret's source variable reaches it.
	CommandEnv []string

	// DNSUpstreams are the resolvers the sandbox's queries go to (default:
	// the host's /etc/resolv.conf).
	DNSUpstreams []string
	// MaxConnections caps concurrent relayed TCP connections.
	MaxConnections int
	// MetricsAddr serves Prometheus /metrics (and, with Pprof, Go's
	// profiler).
	MetricsAddr string
	Pprof       bool

	// Policy is in force from the start (default: the default preset);
	// PolicyPath (if any) is where it came from, re-read on SIGHUP.
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
	// (default ask.DefaultTimeout); AskHook, if set, is asked each new
	// question too (--ask-exec's runner); AskSave writes "always" rules to
	// PolicyPath.
	AskTimeout time.Duration
	AskHook    func(context.Context, ask.Question) (ask.Answer, error)
	AskSave    bool
	DenyMode   stack.DenyMode
	// DenyIsFatal makes every deny a terminate.
	DenyIsFatal              bool
	DNSBlock, DNSBlockSuffix []string
	RebindProtection         bool
	// Halt is the process side of a termination: told before the network
	// is cut, then asked to stop the sandbox's processes.
	Halt Halt
	// AuditLog is a file (or "-" for stdout) for one JSON line per
	// decision (repeats folded); it rotates past AuditLogMaxBytes (default
	// audit.DefaultMaxBytes).
	AuditLog         string
	AuditLogMaxBytes int64
	// Publish are host ports relayed into the sandbox.
	Publish []portspec.Spec
	// TLS: name checks and interception.
	TLS TLSConfig
	// Secrets are swapped in for their placeholders on the wire.
	Secrets SecretsConfig
	// Upstream, when set, is the proxy every allowed TCP flow leaves
	// through.
	Upstream upstream.Config

	// Control is the path of the control socket (none if empty), owned by
	// ControlUID:ControlGID (-1: root); a peer InSandbox says runs in the
	// sandbox is refused (nil: none is).
	Control                string
	ControlUID, ControlGID int
	InSandbox              func(pid int) bool
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
	cfg    Config
	log    *slog.Logger
	popts  policy.Options
	holder *policy.Holder
	// policyFile is the policy in force, as written.
	policyFile atomic.Pointer[policy.File]
	ctl        *controller
	// files does the agent's file work once its process is no longer root
	// (see SetFiles); nil until then.
	files atomic.Pointer[Files]
	// fileValues are the values of secrets from files, as the keeper
	// last read them (see getenv).
	fileValues atomic.Pointer[map[string]string]
	ca         *intercept.CA
	l7         *intercept.Handler
	bundle     string // the CA bundle the command trusts
	secrets    *secrets.Store
	upstream   *upstreamRoute  // nil without --upstream-proxy
	learner    *policy.Learner // learn mode's record, or nil
	asker      *ask.Asker
	audit      *audit.Log
	counts     *decisionCounts
	term       *terminator
	pub        *publish.Ports
	shared     *rings.Shared
	pump       *tap.Pump
	gw         *stack.Stack
	gwRef      atomic.Pointer[stack.Stack] // gw, for the termination hook
	// sharedRef is shared, for the memory trimmer.
	sharedRef atomic.Pointer[rings.Shared]

	undo      []func() // teardown steps, run last to first
	closeOnce sync.Once
	closed    chan struct{}

	// secretSrc are the secrets' source variables in msbtap's environment,
	// which never reach the command.
	secretSrc []string
}

// New builds the sandbox's network on cfg.Link in order — policy,
// decision log, published ports, rings and pump, gateway, control socket,
// metrics — and unwinds whatever it built if a step fails. It touches no
// process-wide state (signals, privileges, memory limits): two agents can
// live in one process, and a test can build one on taptest without root.
func New(cfg Config) (a *Agent, err error) {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Link == nil {
		return nil, errors.New("agent: no link")
	}
	if cfg.Policy == nil {
		cfg.Policy, _ = policy.Preset(policy.DefaultPreset)
	}
	a = &Agent{cfg: cfg, log: cfg.Log, counts: &decisionCounts{}, closed: make(chan struct{})}
	a.ctl = &controller{a: a, reg: prometheus.NewRegistry()}
	defer func() {
		if err != nil {
			a.Close()
			a = nil
		}
	}()
	a.onClose(func() { cfg.Link.Close() })
	if err := a.buildPolicy(); err != nil {
		return a, err
	}
	if err := a.buildUpstream(); err != nil {
		return a, err
	}
	// Published ports are bound before anything else exists, so a port in
	// use fails start-up with nothing half-made.
	if len(cfg.Publish) > 0 {
		if a.pub, err = publish.Listen(cfg.Publish); err != nil {
			return a, err
		}
		a.onClose(a.pub.Close)
	}
	if err := a.buildGateway(cfg.Link); err != nil {
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
	return a, nil
}

func (a *Agent) onClose(f func()) { a.undo = append(a.undo, f) }

// Files does the network's file work once its process is no longer root
// (the keeper): the audit log's and the capture's next files, the policy
// file and the secrets file (with its values) read again, a policy file
// written.
type Files interface {
	Rotate(what string) (*os.File, error)
	ReadPolicy() ([]byte, error)
	ReadSecrets() (*SecretsRead, error)
	WritePolicy(which string, b []byte) error
}

// SecretsRead is the secrets file and the files its secrets' values come
// from, as read for a reload.
type SecretsRead struct {
	File   []byte            `json:"file"`
	Values map[string][]byte `json:"values"`
}

// SetFiles hands the network's file work to f from now on: the process
// is about to stop being root. Until then the agent does it itself.
func (a *Agent) SetFiles(f Files) { a.files.Store(&f) }

// filesOr is the Files set, or nil.
func (a *Agent) filesOr() Files {
	if f := a.files.Load(); f != nil {
		return *f
	}
	return nil
}

// rotator rotates path (what: "audit" or "pcap"): here until SetFiles,
// then by Files.
func (a *Agent) rotator(what, path string, flag int) func() (*os.File, error) {
	return func() (*os.File, error) {
		if f := a.filesOr(); f != nil {
			return f.Rotate(what)
		}
		return safefile.Rotate(path, flag, 0o600)
	}
}

// Activity counts the frames the network moved so far (for a memory
// trimmer: it releases pages once this stops moving).
func (a *Agent) Activity() uint64 {
	if sh := a.sharedRef.Load(); sh != nil {
		return sh.Counters.TxFrames() + sh.Counters.RxFrames()
	}
	return 0
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
	a.term = newTerminator(a.cutNetwork, a.cfg.Halt)
	return nil
}

// buildGateway starts the rings and pump on dev, then the gateway, and
// connects the published ports to it.
func (a *Agent) buildGateway(dev tap.Device) error {
	cfg := a.cfg
	sizes := wire.SizesFor(cfg.Plan.MTU, cfg.Offload)
	a.shared = rings.NewShared(rings.DefaultCapacity, sizes.Buffer)
	a.sharedRef.Store(a.shared)
	// The pump's reader starts once the gateway is up, unless the fast
	// path's loop took the reads.
	pump := tap.NewPump(dev, a.shared, sizes.MaxFrame, a.log.With("component", "tap"))
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
	if !a.gw.ReadsTAP() {
		pump.StartReader()
	}
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
		ups = dnsproxy.HostUpstreams(dnsproxy.DefaultResolvConf)
		if len(ups) == 0 {
			a.log.Warn("no DNS upstream: none given and none in " + dnsproxy.DefaultResolvConf + "; the sandbox's queries will get SERVFAIL")
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
		FastPath: cfg.FastPath && a.upstream == nil, WriteNow: a.pump.WriteNow, Link: a.pump,
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
	a.pub.Start(publish.Options{
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

// DNSUpstreams returns the resolvers in use.
func (a *Agent) DNSUpstreams() []string { return a.gw.DNSUpstreams() }

// Terminated delivers the violation that stopped the sandbox, once the
// network is cut and the processes were told to stop (see Halt).
func (a *Agent) Terminated() <-chan Terminated { return a.term.fired }

// Terminating reports whether a termination has begun.
func (a *Agent) Terminating() bool { return a.term.firing.Load() }

// SetPolicy compiles f and puts it in force for new flows (from says where
// it came from, for the log).
func (a *Agent) SetPolicy(f *policy.File, from string) error {
	a.ctl.mu.Lock()
	defer a.ctl.mu.Unlock()
	return a.setPolicy(f, from)
}

// setPolicy is SetPolicy, ctl.mu held.
func (a *Agent) setPolicy(f *policy.File, from string) error {
	e, err := policy.Compile(f, a.popts)
	if err != nil {
		return err
	}
	a.holder.Store(e)
	a.policyFile.Store(f)
	a.log.Info("policy reloaded", "from", from, "rules", len(f.Rules), "default_action", f.DefaultAction)
	return nil
}

// Private are the host files that hold what the command must never
// reach, to mask in its mount namespace: the control socket, the secrets
// file and the files secrets are read from, the CA's key, the upstream
// proxy's credentials file. (Run as --user root, the command could read
// root's 0600 files otherwise.)
func (a *Agent) Private() []string {
	var hide []string
	add := func(p string) {
		if p == "" {
			return
		}
		if abs, err := filepath.Abs(p); err == nil {
			hide = append(hide, abs)
		}
	}
	add(a.cfg.Control)
	add(a.cfg.Secrets.File)
	add(a.cfg.TLS.CAKey)
	if a.cfg.Upstream.Enabled() {
		add(a.cfg.Upstream.CredentialsFile)
	}
	if specs, err := a.cfg.Secrets.specs(); err == nil {
		for _, sp := range specs {
			add(sp.FromFile)
		}
	}
	return hide
}

// LoadPolicy reads the policy file at path: through Files once the process
// is no longer root (the file may be root's only).
func (a *Agent) LoadPolicy(path string) (*policy.File, error) {
	files := a.filesOr()
	if files == nil {
		return policy.LoadFile(path)
	}
	b, err := files.ReadPolicy()
	if err != nil {
		return nil, fmt.Errorf("policy file: %w", err)
	}
	f, err := policy.ParseFile(b)
	if err != nil {
		var errs policy.Errors
		if errors.As(err, &errs) {
			for i := range errs {
				errs[i] = fmt.Errorf("%s: %w", path, errs[i])
			}
			return nil, errs
		}
		return nil, err
	}
	return f, nil
}
