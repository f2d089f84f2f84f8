// Package process is msbtap's agent as a process: what one sandbox's
// network (package agent) needs of the process it runs in and nothing else
// may do. It checks privileges, makes the link (a TAP in the sandbox's
// namespace, or on the host for a VMM), starts the keeper that does root's
// file work later, writes the pid, ready and terminated files, starts the
// command and the --on-terminate and --ask-exec runners, drops privileges
// for the whole process, trims its memory, and serves signals until the
// sandbox goes away.
package process

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/agent"
	"github.com/msbtap/msbtap/intercept"
	"github.com/msbtap/msbtap/internal/fielderr"
	"github.com/msbtap/msbtap/internal/safefile"
	"github.com/msbtap/msbtap/netns"
	"github.com/msbtap/msbtap/sandbox"
	"github.com/msbtap/msbtap/tap"
)

// Config is everything msbtap run is told: the network's settings, and
// the process's own.
type Config struct {
	agent.Config

	// Netns is the path of the network namespace to attach to. Empty
	// means a fresh namespace for Command, or none in VM mode.
	Netns string
	// VM creates TapName on the host for a VMM instead of a TAP inside a
	// namespace; TapOwner (≥ 0) is the user allowed to open it.
	VM       bool
	TapName  string
	TapOwner int
	// Command runs in the sandbox (in VM mode: in msbtap's own namespace)
	// as CommandUID:CommandGID with CommandGroups, with no capabilities,
	// in a PID and mount namespace of its own; the agent ends with it. Its
	// environment is built from an allow-list (sandbox.Environ) plus
	// agent.Config.CommandEnv; a secret's source variable is refused.
	Command       []string
	CommandUID    int
	CommandGID    int
	CommandGroups []int
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
	// TerminatedFD (≥ 3; lower: none) is written "terminated" the moment a
	// fatal violation fires, before the network is cut, so that a
	// supervisor (msbtap-cni's) never restarts a sandbox that must stay
	// stopped however the agent then ends.
	TerminatedFD int
	// PIDFile receives the agent's pid while it runs.
	PIDFile string
	// OnTerminate is a shell command run after a fatal violation stopped
	// the sandbox; GuestPID a process to kill then.
	OnTerminate string
	GuestPID    int
	// AskExec is a shell command that gets each question of an ask rule as
	// JSON on stdin and prints its answer, run as AskExecUID:AskExecGID.
	AskExec                string
	AskExecUID, AskExecGID int
}

// Process is one running msbtap agent.
type Process struct {
	cfg Config
	net *agent.Agent
	// netRef is net, for the memory trimmer, whose goroutine starts
	// before the network exists.
	netRef atomic.Pointer[agent.Agent]
	ns     netns.Handle
	// terminatedOut is Config.TerminatedFD (0: none), told of a fatal
	// violation; written with write(2), never waited on.
	terminatedOut int
	sandboxPID    atomic.Int32 // the -- COMMAND's init
	// keeper does the file work once the process is no longer root (nil
	// when there is none to do).
	keeper *keeper
	// links are the network devices the keeper removes at the end.
	links []string
	// hook runs --on-terminate; askRunner --ask-exec. Both start in Run,
	// before privileges drop.
	hook      *hookRunner
	askRunner atomic.Pointer[askRunner]

	undo      []func() // teardown steps, run last to first
	closeOnce sync.Once
	closed    chan struct{}
}

// New checks what it needs, makes the link and builds the network on it,
// and unwinds whatever it built if a step fails.
func New(cfg Config) (p *Process, err error) {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	p = &Process{cfg: cfg, ns: netns.None(), closed: make(chan struct{})}
	defer func() {
		if err != nil {
			p.Close()
			p = nil
		}
	}()
	if err := checkPrivileges(); err != nil {
		return p, err
	}
	if err := p.openFDs(); err != nil {
		return p, err
	}
	if cfg.needsKeeper() {
		// Started first, so that it starts while the rest is built, and
		// ends last: it removes the pid file and the control socket.
		if p.keeper, err = startKeeper(cfg.VM); err != nil {
			return p, err
		}
		p.onClose(p.keeper.finish)
	}
	p.onClose(startTrimmer(cfg.MemoryLimit, p.activity))
	if cfg.hasSecrets() {
		// A core of the agent would hold the values: none is written, and
		// no process of the same user may trace it.
		if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
			return p, fmt.Errorf("keep secrets out of core dumps: %w", err)
		}
	}
	if p.cfg.Link, err = p.buildLink(); err != nil {
		return p, err
	}
	net, err := agent.New(p.networkConfig())
	if err != nil {
		return p, err
	}
	p.setNetwork(net)
	p.onClose(func() { p.net.Close() })
	if cfg.PIDFile != "" {
		if err := writePIDFile(cfg.PIDFile); err != nil {
			return p, fielderr.Wrap("pid_file", err)
		}
		p.onClose(func() { os.Remove(cfg.PIDFile) })
	}
	return p, nil
}

// networkConfig is the network's part of the configuration, with what the
// process provides it: the link, the halt, the ask runner, the check of
// control-socket peers.
func (p *Process) networkConfig() agent.Config {
	nc := p.cfg.Config
	nc.Link = p.cfg.Link
	nc.ForCommand = len(p.cfg.Command) > 0
	nc.Halt = p.halt()
	nc.InSandbox = p.inSandbox
	if p.cfg.AskExec != "" {
		nc.AskHook = p.askExec
	}
	return nc
}

func (p *Process) onClose(f func()) { p.undo = append(p.undo, f) }

// openFDs checks --ready-fd and takes --terminated-fd.
func (p *Process) openFDs() error {
	cfg := p.cfg
	if cfg.ReadyFD >= 0 {
		if _, err := unix.FcntlInt(uintptr(cfg.ReadyFD), unix.F_GETFD, 0); err != nil {
			return fielderr.Bad("ready_fd", cfg.ReadyFD, "not an open file descriptor")
		}
	}
	if cfg.TerminatedFD > 2 {
		if _, err := unix.FcntlInt(uintptr(cfg.TerminatedFD), unix.F_GETFD, 0); err != nil {
			return fielderr.Bad("terminated_fd", cfg.TerminatedFD, "not an open file descriptor")
		}
		unix.CloseOnExec(cfg.TerminatedFD)
		// The notice is written on the packet path, before the network is
		// cut: a reader that does not read must not hold the cut back.
		if err := unix.SetNonblock(cfg.TerminatedFD, true); err != nil {
			return fielderr.Bad("terminated_fd", cfg.TerminatedFD, "%v", err)
		}
		p.terminatedOut = cfg.TerminatedFD
	}
	return nil
}

// needsKeeper says whether the agent has file work left once it is no
// longer root: files to rotate, to read again, or to remove at the end.
func (cfg *Config) needsKeeper() bool {
	return cfg.VM || cfg.PIDFile != "" || cfg.Control != "" || cfg.PolicyPath != "" || cfg.Learn != "" || cfg.Secrets.File != "" || (cfg.AuditLog != "" && cfg.AuditLog != "-") || cfg.Pcap != "" ||
		(cfg.TLS.Mode != intercept.Off && len(cfg.Command) > 0) // the CA bundle's directory
}

// hasSecrets says whether secrets are declared.
func (cfg *Config) hasSecrets() bool { return len(cfg.Secrets.Flags) > 0 || cfg.Secrets.File != "" }

// setNetwork keeps the network New built.
func (p *Process) setNetwork(a *agent.Agent) {
	p.net = a
	p.netRef.Store(a)
}

// activity counts the frames the network moved so far (0 before it
// exists), for the memory trimmer.
func (p *Process) activity() uint64 {
	if a := p.netRef.Load(); a != nil {
		return a.Activity()
	}
	return 0
}

// buildLink creates the sandbox's link: a TAP inside its namespace (the
// user's, or a fresh one for the command), or a TAP on the host for a VMM.
func (p *Process) buildLink() (tap.Device, error) {
	cfg := p.cfg
	if cfg.VM {
		vt, err := tap.CreateVMTap(cfg.TapName, cfg.TapOwner, cfg.Plan.MTU, cfg.Offload)
		if err != nil {
			return nil, err
		}
		p.onClose(func() { vt.Close() })
		p.links = vt.Created() // the keeper removes them in the end: the running agent cannot
		return vt.Agent, nil
	}
	var err error
	if cfg.Netns != "" {
		p.ns, err = netns.Open(cfg.Netns)
	} else {
		p.ns, err = netns.New()
	}
	if err != nil {
		return nil, err
	}
	p.onClose(func() { p.ns.Close() })
	if cfg.Netns == "" {
		// The command runs unprivileged: let it ping (ICMP datagram
		// sockets) and bind any port, in its own namespace only.
		for _, kv := range [][2]string{{"net.ipv4.ping_group_range", "0 2147483647"}, {"net.ipv4.ip_unprivileged_port_start", "0"}} {
			if err := netns.SetSysctl(p.ns, kv[0], kv[1]); err != nil {
				return nil, err
			}
		}
	}
	dev, err := tap.CreateInNetns(p.ns, cfg.TapName, cfg.Offload)
	if err != nil {
		return nil, err
	}
	if err := tap.ConfigureGuest(p.ns, dev.Name(), cfg.Plan); err != nil {
		dev.Close()
		return nil, fmt.Errorf("configure %s in the sandbox: %w", dev.Name(), err)
	}
	return dev, nil
}

// halt is the process side of a termination: the supervisor told on
// --terminated-fd, then the command's process group and --guest-pid
// killed.
func (p *Process) halt() agent.Halt {
	return agent.Halt{
		Notify: func() {
			if p.terminatedOut > 0 {
				_, _ = unix.Write(p.terminatedOut, []byte("terminated\n"))
			}
		},
		Kill: func() {
			if pg := p.sandboxPID.Load(); pg > 0 {
				_ = syscall.Kill(-int(pg), syscall.SIGKILL)
			}
			if p.cfg.GuestPID > 0 {
				_ = syscall.Kill(p.cfg.GuestPID, syscall.SIGKILL)
			}
		},
	}
}

// Close tears the sandbox down, last part first: the command, the
// runners, the network (every relayed flow reset, the link gone), the
// namespace, the keeper. It is safe to call more than once.
func (p *Process) Close() error {
	p.closeOnce.Do(func() {
		for i := len(p.undo) - 1; i >= 0; i-- {
			p.undo[i]()
		}
		close(p.closed)
	})
	return nil
}

// Wait blocks until Close has finished.
func (p *Process) Wait() { <-p.closed }

// writePIDFile writes the agent's pid without following a symbolic link.
func writePIDFile(path string) error {
	f, err := safefile.OpenRegularNoFollow(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
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
