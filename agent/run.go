package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/ask"
	"github.com/msbtap/msbtap/harden"
	"github.com/msbtap/msbtap/internal/fielderr"
	"github.com/msbtap/msbtap/netns"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/sandbox"
)

// ExitStatus is the command's own exit status (128+signal when a signal
// killed it), which msbtap passes on.
type ExitStatus struct{ Code int }

func (e *ExitStatus) Error() string { return fmt.Sprintf("command exited with status %d", e.Code) }

// Run starts the command (if any), reports readiness, and serves until the
// sandbox goes away: SIGINT or SIGTERM, ctx cancelled, the command ending
// (its status comes back as *ExitStatus), the namespace deleted, or a fatal
// violation (a *Terminated error). SIGHUP re-reads the policy file. The
// caller then calls Close.
func (a *Agent) Run(ctx context.Context) error {
	cfg := a.cfg
	sigc := make(chan os.Signal, 4)
	signal.Notify(sigc, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGUSR1)
	defer signal.Stop(sigc)

	if cfg.OnTerminate != "" {
		r, err := startHookRunner()
		if err != nil {
			return err
		}
		a.term.runner = r
		a.onClose(func() {
			if a.term.runner != nil {
				a.term.runner.close()
			}
		})
	}
	if cfg.AskExec != "" {
		timeout := cfg.AskTimeout
		if timeout <= 0 {
			timeout = ask.DefaultTimeout
		}
		r, err := startAskRunner(cfg.AskExec, cfg.AskExecUID, cfg.AskExecGID, timeout)
		if err != nil {
			return err
		}
		a.askRunner.Store(r)
		a.onClose(r.close)
	}
	var cmdDone chan error
	if len(cfg.Command) > 0 {
		cmd, err := a.startCommand()
		if err != nil {
			return err
		}
		cmdDone = make(chan error, 1)
		go func() { cmdDone <- cmd.Wait() }()
		a.onClose(func() { stopCommand(cmd, cmdDone) })
	}
	// Set-up is over: hand the keeper its files, then become an
	// unprivileged user that keeps only what the data path needs.
	if a.keeper != nil {
		if err := a.keeper.arm(keeperPaths{Audit: cfg.AuditLog, Pcap: cfg.Pcap, PIDFile: cfg.PIDFile,
			Control: cfg.Control, Bundle: a.bundleDir(), Policy: cfg.PolicyPath, Secrets: cfg.Secrets.File, Links: a.links,
			Learn: cfg.Learn, SavePolicy: cfg.AskSave}); err != nil {
			return fmt.Errorf("drop privileges: %w", err)
		}
		a.armed.Store(true)
	}
	id := AgentID()
	if err := harden.Apply(harden.Options{Keep: a.keepCaps(), UID: id, GID: id, Seccomp: !cfg.NoSeccomp,
		Signal: a.signalTargets()}); err != nil {
		return fmt.Errorf("drop privileges: %w", err)
	}

	p := cfg.Plan
	a.log.Info("ready", "tap", cfg.TapName, "netns", a.nsLabel(), "mode", a.modeLabel(), "guest_ipv4", p.GuestIPv4,
		"guest_ipv6", p.GuestIPv6, "gateway_ipv4", p.GatewayV4, "gateway_ipv6", p.GatewayV6,
		"mtu", p.MTU, "policy", a.policyLabel(), "dns_upstreams", a.gw.DNSUpstreams(), "tls_intercept", cfg.TLS.Mode.String())
	if cfg.ReadyFD >= 0 {
		f := os.NewFile(uintptr(cfg.ReadyFD), "ready-fd")
		if _, err := f.WriteString("ready\n"); err != nil {
			a.log.Warn("write ready fd", "fd", cfg.ReadyFD, "err", err)
		}
		f.Close()
	}
	releaseImage() // after ready: 1-2 ms that start-up need not wait for

	var nsGone <-chan time.Time
	if cfg.Netns != "" {
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		nsGone = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case sig := <-sigc:
			if sig == syscall.SIGHUP {
				a.reloadPolicy()
				a.reloadSecrets()
				continue
			}
			if sig == syscall.SIGUSR1 {
				if a.learner == nil {
					a.log.Warn("SIGUSR1: not in learn mode (--learn), nothing to write")
				} else {
					a.writeLearned()
				}
				continue
			}
			a.log.Info("stopping", "signal", sig.String())
			return nil
		case werr := <-cmdDone:
			cmdDone <- werr // for stopCommand
			if a.term.firing.Load() {
				// The command died because the termination hook killed it.
				return a.term.finish(<-a.term.fired)
			}
			return commandStatus(werr)
		case v := <-a.term.fired:
			return a.term.finish(v)
		case <-nsGone:
			if !netns.Same(cfg.Netns, a.ns) {
				a.log.Info("stopping: the sandbox's network namespace is gone", "netns", cfg.Netns)
				return nil
			}
		}
	}
}

// AgentIDBase is where the agent's own uids and gids start: once set up,
// the agent runs as uid and gid AgentIDBase + its pid, a user of its own
// that owns no file and no other process (pids are below 2^22, so the ids
// stay below 0x7f400000, clear of the ranges systemd and subuid files
// hand out, and of the 2^31 and up that some tools mishandle).
const AgentIDBase = 0x7f000000

// AgentID is the uid and gid this agent runs as once set up.
func AgentID() int { return AgentIDBase + os.Getpid() }

// keepCaps are the capabilities the running agent keeps: CAP_NET_RAW for
// raw ICMP sockets (the echo relay, where the host's ping_group_range
// allows no datagram ones); and CAP_KILL, when there is a command, a
// --guest-pid or an --on-terminate runner, to stop those (root's, or
// another user's; the seccomp list lets kill reach only them). In VM mode
// the keeper, not the agent, removes the TAPs at the end: the agent keeps
// no CAP_NET_ADMIN on the host.
func (a *Agent) keepCaps() []uintptr {
	keep := []uintptr{unix.CAP_NET_RAW}
	if len(a.signalTargets()) > 0 {
		keep = append(keep, unix.CAP_KILL)
	}
	return keep
}

// signalTargets are the processes the running agent signals: the
// command's init and its process group, the --guest-pid, the
// --on-terminate runner.
func (a *Agent) signalTargets() []int {
	var pids []int
	if p := int(a.sandboxPID.Load()); p > 0 {
		pids = append(pids, p, -p)
	}
	if a.cfg.GuestPID > 0 {
		pids = append(pids, a.cfg.GuestPID)
	}
	if a.term != nil && a.term.runner != nil {
		pids = append(pids, a.term.runner.cmd.Process.Pid)
	}
	return pids
}

// startCommand starts the command in the sandbox's namespace (in VM mode,
// in msbtap's own: it is the VMM), behind the sandbox's init.
func (a *Agent) startCommand() (*exec.Cmd, error) {
	cfg := a.cfg
	wd, _ := os.Getwd()
	env, err := a.commandEnv()
	if err != nil {
		return nil, err
	}
	spec := sandbox.Spec{Argv: cfg.Command, Env: env, Dir: wd,
		UID: cfg.CommandUID, GID: cfg.CommandGID, Groups: cfg.CommandGroups,
		Hide: a.hiddenFromCommand(), Private: !cfg.VM, Binds: cfg.CommandBinds}
	if a.bundle != "" && !cfg.VM {
		// The CA bundle lives in msbtap's temporary directory, which the
		// command's private /tmp hides.
		spec.Binds = append(spec.Binds, sandbox.Bind{Path: filepath.Dir(a.bundle), ReadOnly: true})
	}
	p, err := sandbox.Start(a.ns, spec)
	if err != nil {
		return nil, err
	}
	a.sandboxPID.Store(int32(p.Process.Pid))
	return p.Cmd, nil
}

// halt is the process side of a termination: the supervisor told on
// --terminated-fd, then the command's process group and --guest-pid
// killed.
func (a *Agent) halt() Halt {
	return Halt{
		Notify: func() {
			if a.terminatedOut != nil {
				a.terminatedOut.WriteString("terminated\n")
			}
		},
		Kill: func() {
			if pg := a.sandboxPID.Load(); pg > 0 {
				_ = syscall.Kill(-int(pg), syscall.SIGKILL)
			}
			if a.cfg.GuestPID > 0 {
				_ = syscall.Kill(a.cfg.GuestPID, syscall.SIGKILL)
			}
		},
	}
}

// commandEnv is the command's environment: the allow-list of msbtap's own
// (sandbox.Environ), its user's HOME, USER, LOGNAME and SHELL, the CA
// bundle's variables, --env, and the secrets' placeholders; never a
// secret's source variable.
func (a *Agent) commandEnv() ([]string, error) {
	env, err := sandbox.Environ(sandbox.EnvOptions{
		Host: os.Environ(), User: sandbox.LookupAccount(a.cfg.CommandUID),
		Own: a.caEnv(), Extra: a.cfg.CommandEnv, Final: a.secretsEnv(), Forbidden: a.secretSources(),
	})
	if err != nil {
		return nil, fielderr.Wrap("env", err)
	}
	return env, nil
}

// hiddenFromCommand are the host files that hold what the command must
// never reach, masked in its mount namespace: the control socket, the
// secrets file and the files secrets are read from, the CA's key, the
// upstream proxy's credentials file. (Run as
// --user root, the command could read root's 0600 files otherwise.)
func (a *Agent) hiddenFromCommand() []string {
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

// reloadPolicy re-reads the policy file on SIGHUP: validated first, then
// swapped in for new flows; an invalid file leaves the old policy in force.
func (a *Agent) reloadPolicy() {
	path := a.cfg.PolicyPath
	if path == "" {
		a.log.Warn("SIGHUP: the policy is a preset or inline, nothing to reload")
		return
	}
	f, err := a.loadPolicy(path)
	if err == nil {
		a.ctl.mu.Lock()
		err = a.setPolicy(policy.WithRulesFirst(f, a.cfg.Allow), path)
		a.ctl.mu.Unlock()
	}
	if err != nil {
		a.log.Error("policy reload failed; the old policy stays in force", "file", path, "err", err)
	}
}

// loadPolicy reads the policy file: through the keeper once the agent is
// no longer root (the file may be root's only).
func (a *Agent) loadPolicy(path string) (*policy.File, error) {
	if !a.armed.Load() {
		return policy.LoadFile(path)
	}
	b, err := a.keeper.readPolicy()
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

// setPolicy compiles f and puts it in force for new flows.
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

func (a *Agent) policyLabel() string {
	if a.cfg.PolicyPath != "" {
		return a.cfg.PolicyPath
	}
	for _, n := range policy.PresetNames() {
		if f, _ := policy.Preset(n); f == a.cfg.Policy {
			return n
		}
	}
	return "inline"
}

func (a *Agent) nsLabel() string {
	switch {
	case a.cfg.VM:
		return "(host)"
	case a.cfg.Netns == "":
		return "(new)"
	}
	return a.cfg.Netns
}

func (a *Agent) modeLabel() string {
	if a.cfg.VM {
		return "vm"
	}
	return "netns"
}

// commandStatus turns the command's end into msbtap's exit status: its own
// status, or 128+signal as a shell reports it.
func commandStatus(err error) error {
	if err == nil {
		return nil
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return &ExitStatus{Code: 128 + int(ws.Signal())}
		}
		return &ExitStatus{Code: ee.ExitCode()}
	}
	return fmt.Errorf("wait for command: %w", err)
}

// stopCommand ends the command's whole process group: SIGTERM, then SIGKILL
// after a grace period.
func stopCommand(cmd *exec.Cmd, done chan error) {
	pgid := cmd.Process.Pid
	select {
	case err := <-done:
		done <- err
		_ = syscall.Kill(-pgid, syscall.SIGKILL) // stragglers in the group
		return
	default:
	}
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case err := <-done:
		done <- err
	case <-time.After(5 * time.Second):
	}
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
}
