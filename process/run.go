package process

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/agent"
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
// violation (a *agent.Terminated error). SIGHUP re-reads the policy file
// and the secrets, SIGUSR1 writes the learned policy. The caller then
// calls Close.
func (p *Process) Run(ctx context.Context) error {
	sigc := make(chan os.Signal, 4)
	signal.Notify(sigc, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGUSR1)
	defer signal.Stop(sigc)
	cmdDone, err := p.start()
	if err != nil {
		return err
	}
	if err := p.dropPrivileges(); err != nil {
		return err
	}
	p.ready()
	var nsGone <-chan time.Time
	if p.cfg.Netns != "" {
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		nsGone = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case sig := <-sigc:
			if stop := p.signal(sig); stop {
				return nil
			}
		case werr := <-cmdDone:
			cmdDone <- werr // for stopCommand
			if p.net.Terminating() {
				// The command died because the termination killed it.
				return p.finish(<-p.net.Terminated())
			}
			return commandStatus(werr)
		case v := <-p.net.Terminated():
			return p.finish(v)
		case <-nsGone:
			if !netns.Same(p.cfg.Netns, p.ns) {
				p.cfg.Log.Info("stopping: the sandbox's network namespace is gone", "netns", p.cfg.Netns)
				return nil
			}
		}
	}
}

// signal handles one signal; it reports whether the agent should stop.
func (p *Process) signal(sig os.Signal) (stop bool) {
	switch sig {
	case syscall.SIGHUP:
		p.reloadPolicy()
		p.net.ReloadSecrets()
	case syscall.SIGUSR1:
		p.net.WriteLearned()
	default:
		p.cfg.Log.Info("stopping", "signal", sig.String())
		return true
	}
	return false
}

// start starts the runners and the command, while msbtap is still root;
// cmdDone gets the command's end (nil without a command).
func (p *Process) start() (cmdDone chan error, err error) {
	cfg := p.cfg
	if cfg.OnTerminate != "" {
		if p.hook, err = startHookRunner(); err != nil {
			return nil, err
		}
		p.onClose(func() {
			if p.hook != nil {
				p.hook.close()
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
			return nil, err
		}
		p.askRunner.Store(r)
		p.onClose(r.close)
	}
	if len(cfg.Command) > 0 {
		cmd, err := p.startCommand()
		if err != nil {
			return nil, err
		}
		cmdDone = make(chan error, 1)
		go func() { cmdDone <- cmd.Wait() }()
		p.onClose(func() { stopCommand(cmd, cmdDone) })
	}
	return cmdDone, nil
}

// dropPrivileges ends set-up: it hands the keeper its files, then makes
// the process an unprivileged user that keeps only what the data path
// needs.
func (p *Process) dropPrivileges() error {
	cfg := p.cfg
	if p.keeper != nil {
		if err := p.keeper.arm(keeperPaths{Audit: cfg.AuditLog, Pcap: cfg.Pcap, PIDFile: cfg.PIDFile,
			Control: cfg.Control, Bundle: p.net.BundleDir(), Policy: cfg.PolicyPath, Secrets: cfg.Secrets.File, Links: p.links,
			Learn: cfg.Learn, SavePolicy: cfg.AskSave}); err != nil {
			return fmt.Errorf("drop privileges: %w", err)
		}
		p.net.SetFiles(p.keeper)
	}
	id := AgentID()
	if err := harden.Apply(harden.Options{Keep: p.keepCaps(), UID: id, GID: id, Seccomp: !cfg.NoSeccomp,
		Signal: p.signalTargets()}); err != nil {
		return fmt.Errorf("drop privileges: %w", err)
	}
	return nil
}

// ready logs the network's addresses and writes --ready-fd.
func (p *Process) ready() {
	cfg := p.cfg
	pl := cfg.Plan
	cfg.Log.Info("ready", "tap", cfg.TapName, "netns", p.nsLabel(), "mode", p.modeLabel(), "guest_ipv4", pl.GuestIPv4,
		"guest_ipv6", pl.GuestIPv6, "gateway_ipv4", pl.GatewayV4, "gateway_ipv6", pl.GatewayV6,
		"mtu", pl.MTU, "policy", p.policyLabel(), "dns_upstreams", p.net.DNSUpstreams(), "tls_intercept", cfg.TLS.Mode.String())
	if cfg.ReadyFD >= 0 {
		f := os.NewFile(uintptr(cfg.ReadyFD), "ready-fd")
		if _, err := f.WriteString("ready\n"); err != nil {
			cfg.Log.Warn("write ready fd", "fd", cfg.ReadyFD, "err", err)
		}
		f.Close()
	}
	releaseImage() // after ready: 1-2 ms that start-up need not wait for
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
func (p *Process) keepCaps() []uintptr {
	keep := []uintptr{unix.CAP_NET_RAW}
	if len(p.signalTargets()) > 0 {
		keep = append(keep, unix.CAP_KILL)
	}
	return keep
}

// signalTargets are the processes the running agent signals: the
// command's init and its process group, the --guest-pid, the
// --on-terminate runner.
func (p *Process) signalTargets() []int {
	var pids []int
	if pid := int(p.sandboxPID.Load()); pid > 0 {
		pids = append(pids, pid, -pid)
	}
	if p.cfg.GuestPID > 0 {
		pids = append(pids, p.cfg.GuestPID)
	}
	if p.hook != nil {
		pids = append(pids, p.hook.cmd.Process.Pid)
	}
	return pids
}

// startCommand starts the command in the sandbox's namespace (in VM mode,
// in msbtap's own: it is the VMM), behind the sandbox's init.
func (p *Process) startCommand() (*exec.Cmd, error) {
	cfg := p.cfg
	wd, _ := os.Getwd()
	env, err := p.commandEnv()
	if err != nil {
		return nil, err
	}
	spec := sandbox.Spec{Argv: cfg.Command, Env: env, Dir: wd,
		UID: cfg.CommandUID, GID: cfg.CommandGID, Groups: cfg.CommandGroups,
		Hide: p.net.Private(), Private: !cfg.VM, Binds: cfg.CommandBinds}
	if dir := p.net.BundleDir(); dir != "" && !cfg.VM {
		// The CA bundle lives in msbtap's temporary directory, which the
		// command's private /tmp hides.
		spec.Binds = append(spec.Binds, sandbox.Bind{Path: dir, ReadOnly: true})
	}
	sp, err := sandbox.Start(p.ns, spec)
	if err != nil {
		return nil, err
	}
	p.sandboxPID.Store(int32(sp.Process.Pid))
	return sp.Cmd, nil
}

// commandEnv is the command's environment: the allow-list of msbtap's own
// (sandbox.Environ), its user's HOME, USER, LOGNAME and SHELL, the CA
// bundle's variables, --env, and the secrets' placeholders; never a
// secret's source variable.
func (p *Process) commandEnv() ([]string, error) {
	env, err := sandbox.Environ(sandbox.EnvOptions{
		Host: os.Environ(), User: sandbox.LookupAccount(p.cfg.CommandUID),
		Own: p.net.CAVars(), Extra: p.cfg.CommandEnv, Final: p.net.SecretVars(), Forbidden: p.net.SecretSources(),
	})
	if err != nil {
		return nil, fielderr.Wrap("env", err)
	}
	return env, nil
}

// reloadPolicy re-reads the policy file on SIGHUP: validated first, then
// swapped in for new flows; an invalid file leaves the old policy in force.
func (p *Process) reloadPolicy() {
	path := p.cfg.PolicyPath
	if path == "" {
		p.cfg.Log.Warn("SIGHUP: the policy is a preset or inline, nothing to reload")
		return
	}
	f, err := p.net.LoadPolicy(path)
	if err == nil {
		err = p.net.SetPolicy(policy.WithRulesFirst(f, p.cfg.Allow), path)
	}
	if err != nil {
		p.cfg.Log.Error("policy reload failed; the old policy stays in force", "file", path, "err", err)
	}
}

func (p *Process) policyLabel() string {
	if p.cfg.PolicyPath != "" {
		return p.cfg.PolicyPath
	}
	for _, n := range policy.PresetNames() {
		if f, _ := policy.Preset(n); f == p.cfg.Policy {
			return n
		}
	}
	return "inline"
}

func (p *Process) nsLabel() string {
	switch {
	case p.cfg.VM:
		return "(host)"
	case p.cfg.Netns == "":
		return "(new)"
	}
	return p.cfg.Netns
}

func (p *Process) modeLabel() string {
	if p.cfg.VM {
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

// finish logs the violation, runs --on-terminate, and returns it.
func (p *Process) finish(v agent.Terminated) error {
	p.cfg.Log.Error("policy violation: sandbox terminated", "proto", v.Proto, "src", v.Src,
		"dst", v.Dst, "domain", v.Domain, "rule", v.Rule, "secret", v.Secret)
	if p.hook != nil {
		env := []string{
			"MSBTAP_VIOLATION_PROTO=" + v.Proto,
			"MSBTAP_VIOLATION_SRC=" + v.Src,
			"MSBTAP_VIOLATION_DST=" + v.Dst,
			"MSBTAP_VIOLATION_DOMAIN=" + safeName(v.Domain),
			"MSBTAP_VIOLATION_RULE=" + v.Rule,
		}
		if v.Secret != "" {
			env = append(env, "MSBTAP_VIOLATION_SECRET="+v.Secret) // a declared name: letters, digits, _
		}
		if err := p.hook.run(p.cfg.OnTerminate, env); err != nil {
			p.cfg.Log.Error("--on-terminate failed", "err", err)
		}
		p.hook = nil
	}
	return &v
}

// safeName keeps only letters, digits, '-' and '.' of a name that came from
// the guest's bytes, so that a shell running --on-terminate cannot be made
// to run any of it.
func safeName(s string) string {
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' {
			b = append(b, c)
		}
	}
	return string(b)
}

// askExec is the asker's Exec: the runner started in Run.
func (p *Process) askExec(ctx context.Context, q ask.Question) (ask.Answer, error) {
	r := p.askRunner.Load()
	if r == nil {
		return ask.Answer{}, errors.New("the --ask-exec runner is not running yet")
	}
	return r.ask(ctx, q)
}

// inSandbox reports whether process pid runs in the sandbox that -- COMMAND
// started: a descendant of its init (orphans there are re-parented to the
// init, so none leaves). A process that cannot be traced is refused.
func (p *Process) inSandbox(pid int) bool {
	init := int(p.sandboxPID.Load())
	if init <= 0 {
		return len(p.cfg.Command) > 0 // starting: cannot tell yet
	}
	for i := 0; i < 256 && pid > 1; i++ {
		if pid == init {
			return true
		}
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil {
			return true
		}
		// pid (comm) state ppid …: comm may hold spaces and parentheses.
		rest := b[bytes.LastIndexByte(b, ')')+1:]
		f := strings.Fields(string(rest))
		if len(f) < 2 {
			return true
		}
		if pid, err = strconv.Atoi(f[1]); err != nil {
			return true
		}
	}
	return pid == init
}
