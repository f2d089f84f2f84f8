package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/plan"
	"github.com/msbtap/msbtap/proxy"
	"github.com/msbtap/msbtap/rings"
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
}

func runFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "netns", Usage: "attach to network namespace `NAME|PATH` (a name is looked up in /run/netns)"},
		&cli.StringFlag{Name: "tap", Value: "eth0", Usage: "`NAME` of the TAP interface"},
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
	}
}

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
			return runAgent(opts)
		},
	}
}

func parseRunOptions(c *cli.Context) (runOptions, error) {
	o := runOptions{
		tapName: c.String("tap"),
		readyFD: c.Int("ready-fd"),
		pidFile: c.String("pid-file"),
		command: c.Args().Slice(),
	}
	if c.IsSet("netns") {
		if c.String("netns") == "" {
			return o, errors.New("--netns: empty namespace name")
		}
		o.netns = tap.ResolveNetns(c.String("netns"))
	}
	if o.netns == "" && len(o.command) == 0 {
		return o, errors.New("nothing to attach: give --netns NAME|PATH or a command after --")
	}
	if n := len(o.tapName); n == 0 || n > 15 || strings.ContainsAny(o.tapName, "/ \t\n:") {
		return o, fmt.Errorf("--tap %q: not a valid interface name (1 to 15 characters, no '/', ':' or spaces)", o.tapName)
	}
	p, err := plan.ForSlot(c.Int("slot"))
	if err != nil {
		return o, fmt.Errorf("--slot: %w", err)
	}
	mtu := 0
	if c.IsSet("mtu") {
		mtu = c.Int("mtu")
		if mtu == 0 {
			return o, errors.New("--mtu 0: out of range 1280..65520")
		}
	}
	p, err = p.Apply(plan.Overrides{
		GuestIPv4: c.String("guest-ipv4"),
		GuestIPv6: c.String("guest-ipv6"),
		GuestMAC:  c.String("guest-mac"),
		MTU:       mtu,
	})
	if err != nil {
		return o, err
	}
	o.plan = p
	if o.readyFD == 0 || o.readyFD == 1 || o.readyFD == 2 || o.readyFD < -1 {
		return o, fmt.Errorf("--ready-fd %d: must be an inherited descriptor above 2", o.readyFD)
	}
	switch o.logFormat = c.String("log-format"); o.logFormat {
	case "text", "json":
	default:
		return o, fmt.Errorf("--log-format %q: want text or json", o.logFormat)
	}
	for _, u := range c.StringSlice("dns-upstream") {
		p, err := proxy.ParseUpstream(u)
		if err != nil {
			return o, fmt.Errorf("--dns-upstream: %w", err)
		}
		o.dnsUpstreams = append(o.dnsUpstreams, p)
	}
	if o.maxConnections = c.Int("max-connections"); o.maxConnections < 1 {
		return o, fmt.Errorf("--max-connections %d: must be at least 1", o.maxConnections)
	}
	o.metricsAddr = c.String("metrics-addr")
	if o.metricsAddr != "" {
		if _, _, err := net.SplitHostPort(o.metricsAddr); err != nil {
			return o, fmt.Errorf("--metrics-addr %q: want HOST:PORT", o.metricsAddr)
		}
	}
	if err := o.logLevel.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return o, fmt.Errorf("--log-level %q: want debug, info, warn or error", c.String("log-level"))
	}
	return o, nil
}

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

	// The namespace: the user's, or a fresh one for the command.
	var ns netns.NsHandle
	if o.netns != "" {
		ns, err = tap.OpenNetns(o.netns)
	} else {
		ns, err = tap.NewNetns()
	}
	if err != nil {
		return err
	}
	defer ns.Close()

	dev, err := tap.CreateInNetns(ns, o.tapName)
	if err != nil {
		return err
	}
	defer dev.Close()
	if err := tap.ConfigureGuest(ns, dev.Name(), o.plan); err != nil {
		return fmt.Errorf("configure %s in the sandbox: %w", dev.Name(), err)
	}

	sh := rings.NewShared(rings.DefaultCapacity, o.plan.FrameSize()+256)
	pump := tap.StartPump(dev, sh, o.plan.FrameSize(), log.With("component", "tap"))
	defer func() {
		pump.Close()
		pump.Wait()
	}()
	gw, err := startGateway(sh, o, log)
	if err != nil {
		return err
	}
	defer gw.Close()
	if o.metricsAddr != "" {
		m, err := startMetrics(o.metricsAddr, sh, gw.Stack, log)
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

	sigc := make(chan os.Signal, 2)
	signal.Notify(sigc, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigc)

	var cmd *exec.Cmd
	cmdDone := make(chan error, 1)
	if len(o.command) > 0 {
		cmd = exec.Command(o.command[0], o.command[1:]...)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
		// The child is forked from a thread inside the sandbox's namespace,
		// so it starts there.
		if err := tap.InNetns(ns, cmd.Start); err != nil {
			return fmt.Errorf("start %s: %w", o.command[0], err)
		}
		go func() { cmdDone <- cmd.Wait() }()
		defer stopCommand(cmd, cmdDone)
	}

	log.Info("ready", "tap", dev.Name(), "netns", nsLabel(o.netns), "guest_ipv4", o.plan.GuestIPv4,
		"guest_ipv6", o.plan.GuestIPv6, "gateway_ipv4", o.plan.GatewayV4, "gateway_ipv6", o.plan.GatewayV6, "mtu", o.plan.MTU)
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
			log.Info("stopping", "signal", sig.String())
			return nil
		case werr := <-cmdDone:
			cmdDone <- werr // for stopCommand
			return commandStatus(werr)
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

func nsLabel(p string) string {
	if p == "" {
		return "(new)"
	}
	return p
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
