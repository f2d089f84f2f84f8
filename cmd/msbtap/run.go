package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/plan"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/proxy"
	"github.com/msbtap/msbtap/rings"
	"github.com/msbtap/msbtap/tap"
)

func runCommand() *cli.Command {
	return &cli.Command{
		Name:      "run",
		Usage:     "attach a sandbox and serve its network until it goes away",
		ArgsUsage: "[-- COMMAND [ARGS...]]",
		Flags:     runFlags(),
		OnUsageError: func(_ *cli.Context, err error, _ bool) error {
			return withStatus(2, err)
		},
		Action: func(c *cli.Context) error {
			opts, err := parseRunOptions(c)
			if err != nil {
				return withStatus(2, err)
			}
			return startAgent(opts)
		},
	}
}

// startAgent is runAgent; tests replace it to see the parsed options.
var startAgent = runAgent

func newLogger(w io.Writer, format string, level slog.Level) *slog.Logger {
	ho := &slog.HandlerOptions{Level: level}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, ho))
	}
	return slog.New(slog.NewTextHandler(w, ho))
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
		return errors.New("missing CAP_NET_ADMIN: msbtap creates a TAP device and must run as root (sudo)")
	}
	if !has(unix.CAP_SYS_ADMIN) {
		return errors.New("missing CAP_SYS_ADMIN: msbtap enters the sandbox's network namespace and must run as root (sudo)")
	}
	return nil
}

// hostAddrs returns the addresses that mean "the host itself" to the
// policy: the gateway's and every address of msbtap's own namespace.
func hostAddrs(p plan.Plan) *policy.HostSet {
	addrs := []netip.Addr{p.GatewayV4, p.GatewayV6}
	if ifAddrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range ifAddrs {
			if ipn, ok := a.(*net.IPNet); ok {
				if ip, ok := netip.AddrFromSlice(ipn.IP); ok {
					addrs = append(addrs, ip.Unmap())
				}
			}
		}
	}
	return policy.NewHostSet(addrs...)
}

// runAgent attaches the sandbox, serves it, and tears everything down.
func runAgent(o runOptions) (err error) {
	log := newLogger(os.Stderr, o.logFormat, o.logLevel)
	if err := checkPrivileges(); err != nil {
		return err
	}
	if o.readyFD >= 0 {
		if _, err := unix.FcntlInt(uintptr(o.readyFD), unix.F_GETFD, 0); err != nil {
			return fmt.Errorf("--ready-fd %d: not an open file descriptor", o.readyFD)
		}
	}

	// The policy, its DNS side and the decision log come first: a bad
	// audit-log path must fail before anything is created.
	pins := policy.NewPins(0)
	popts := policy.Options{Host: hostAddrs(o.plan), Pins: pins, DenyIsFatal: o.denyIsFatal}
	engine, err := policy.Compile(o.policy, popts)
	if err != nil {
		return fmt.Errorf("--policy: %w", err)
	}
	holder := policy.NewHolder(engine)
	audit, err := openAudit(o.auditLog, holder, pins, log)
	if err != nil {
		return err
	}
	defer audit.Close()
	term := newTerminator(o, log)
	counts := &decisionCounts{}
	onDecision := func(f policy.Flow, d policy.Decision) {
		counts.add(d.Action)
		audit.Log(f, d)
		if d.Action == policy.Terminate {
			term.Fire(f, d, holder.Load())
		}
	}
	guard, err := policy.NewDNSGuard(policy.DNSGuardOptions{
		Policy: holder, Pins: pins, Block: o.dnsBlock, BlockSuffix: o.dnsBlockSuffix,
		RebindProtection: o.rebind, OnDecision: onDecision,
	})
	if err != nil {
		return fmt.Errorf("--dns-block: %w", err)
	}

	// Published ports are bound before anything else exists, so a port in
	// use fails start-up with nothing half-made.
	var pub *proxy.Publisher
	if len(o.publish) > 0 {
		if pub, err = proxy.ListenPublished(o.publish); err != nil {
			return err
		}
		defer pub.Close()
	}

	// The sandbox's link: a TAP inside its namespace (the user's, or a
	// fresh one for the command), or a TAP on the host for a VMM.
	var (
		ns  netns.NsHandle = netns.None()
		dev *tap.File
	)
	if o.vm {
		vt, err := tap.CreateVMTap(o.tapName, o.tapOwner, o.plan.MTU, o.offload)
		if err != nil {
			return err
		}
		defer vt.Close()
		dev = vt.Agent
	} else {
		if o.netns != "" {
			ns, err = tap.OpenNetns(o.netns)
		} else {
			ns, err = tap.NewNetns()
		}
		if err != nil {
			return err
		}
		defer ns.Close()
		if dev, err = tap.CreateInNetns(ns, o.tapName, o.offload); err != nil {
			return err
		}
		defer dev.Close()
		if err := tap.ConfigureGuest(ns, dev.Name(), o.plan); err != nil {
			return fmt.Errorf("configure %s in the sandbox: %w", dev.Name(), err)
		}
	}

	maxFrame := o.plan.FrameSize()
	if o.offload {
		maxFrame = 14 + 4 + 65535 // a 64 KiB TSO segment in one frame
	}
	sh := rings.NewShared(rings.DefaultCapacity, maxFrame+256)
	sh.SetTerminationHook(term.hook)
	pump := tap.StartPump(dev, sh, maxFrame, log.With("component", "tap"))
	defer func() {
		pump.Close()
		pump.Wait()
	}()
	gw, err := startGateway(sh, o, holder, guard, onDecision, log)
	if err != nil {
		return err
	}
	defer gw.Close()
	term.shared = sh
	if pub != nil {
		gw.SetIngressUDP(pub)
		pub.Start(proxy.PublishOptions{
			DialGuest:   gw.DialGuest,
			SendToGuest: gw.SendUDPToGuest,
			Allow: func(proto string, client, listen netip.AddrPort) bool {
				pr := policy.TCP
				if proto == "udp" {
					pr = policy.UDP
				}
				f := policy.Flow{Direction: policy.Ingress, Proto: pr, Src: client, Dst: listen}
				d := holder.Check(f)
				onDecision(f, d)
				return d.Action == policy.Allow
			},
			Log: log.With("component", "publish"),
		})
		for _, p := range o.publish {
			log.Info("published", "host", p.Host, "guest_port", p.GuestPort, "proto", p.Proto)
		}
	}
	if o.metricsAddr != "" {
		m, err := startMetrics(o.metricsAddr, o.pprof, sh, gw.Stack, audit, counts, log)
		if err != nil {
			return err
		}
		defer m.Close()
	}

	if o.pidFile != "" {
		if err := os.WriteFile(o.pidFile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
			return fmt.Errorf("--pid-file: %w", err)
		}
		defer os.Remove(o.pidFile)
	}

	sigc := make(chan os.Signal, 4)
	signal.Notify(sigc, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigc)

	var cmd *exec.Cmd
	cmdDone := make(chan error, 1)
	if len(o.command) > 0 {
		cmd = exec.Command(o.command[0], o.command[1:]...)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
		// The child is forked from a thread inside the sandbox's namespace,
		// so it starts there (in VM mode, in msbtap's own: it is the VMM).
		start := cmd.Start
		if ns.IsOpen() {
			start = func() error { return tap.InNetns(ns, cmd.Start) }
		}
		if err := start(); err != nil {
			return fmt.Errorf("start %s: %w", o.command[0], err)
		}
		term.setProcessGroup(cmd.Process.Pid)
		go func() { cmdDone <- cmd.Wait() }()
		defer stopCommand(cmd, cmdDone)
	}

	log.Info("ready", "tap", o.tapName, "netns", nsLabel(o), "mode", modeLabel(o), "guest_ipv4", o.plan.GuestIPv4,
		"guest_ipv6", o.plan.GuestIPv6, "gateway_ipv4", o.plan.GatewayV4, "gateway_ipv6", o.plan.GatewayV6,
		"mtu", o.plan.MTU, "policy", policyLabel(o), "dns_upstreams", gw.DNSUpstreams())
	if o.readyFD >= 0 {
		f := os.NewFile(uintptr(o.readyFD), "ready-fd")
		if _, err := f.WriteString("ready\n"); err != nil {
			log.Warn("write --ready-fd", "fd", o.readyFD, "err", err)
		}
		f.Close()
	}

	nsGone := make(<-chan time.Time)
	if o.netns != "" {
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		nsGone = t.C
	}
	for {
		select {
		case sig := <-sigc:
			if sig == syscall.SIGHUP {
				reloadPolicy(o, popts, holder, log)
				continue
			}
			log.Info("stopping", "signal", sig.String())
			return nil
		case werr := <-cmdDone:
			cmdDone <- werr // for stopCommand
			if term.firing.Load() {
				// The command died because the termination hook killed it.
				return term.finish(<-term.fired, cmdDone)
			}
			return commandStatus(werr)
		case v := <-term.fired:
			return term.finish(v, cmdDone)
		case <-nsGone:
			if !tap.SameNetns(o.netns, ns) {
				log.Info("stopping: the sandbox's network namespace is gone", "netns", o.netns)
				return nil
			}
		case <-gw.Done():
			return gw.Err()
		}
	}
}

func policyLabel(o runOptions) string {
	if o.policyPath != "" {
		return o.policyPath
	}
	for _, n := range policy.PresetNames() {
		if f, _ := policy.Preset(n); f == o.policy {
			return n
		}
	}
	return "inline"
}

// reloadPolicy re-reads the policy file on SIGHUP: validated first, then
// swapped in for new flows; an invalid file leaves the old policy in force.
func reloadPolicy(o runOptions, popts policy.Options, holder *policy.Holder, log *slog.Logger) {
	if o.policyPath == "" {
		log.Warn("SIGHUP: the policy is a preset or inline, nothing to reload")
		return
	}
	f, err := policy.LoadFile(o.policyPath)
	if err == nil {
		var e *policy.Engine
		if e, err = policy.Compile(f, popts); err == nil {
			holder.Store(e)
			log.Info("policy reloaded", "file", o.policyPath, "rules", len(f.Rules), "default_action", f.DefaultAction)
			return
		}
	}
	log.Error("policy reload failed; the old policy stays in force", "file", o.policyPath, "err", err)
}

func nsLabel(o runOptions) string {
	switch {
	case o.vm:
		return "(host)"
	case o.netns == "":
		return "(new)"
	}
	return o.netns
}

func modeLabel(o runOptions) string {
	if o.vm {
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
			return withStatus(128+int(ws.Signal()), nil)
		}
		return withStatus(ee.ExitCode(), nil)
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
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	select {
	case err := <-done:
		done <- err
	case <-ctx.Done():
	}
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
}
