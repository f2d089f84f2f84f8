package cni

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netlink"

	"github.com/msbtap/msbtap/netns"
	"github.com/msbtap/msbtap/plan"
)

// state is what ADD leaves for DEL and CHECK, in StateDir/<id>/state.json.
type state struct {
	ContainerID string `json:"container_id"`
	Netns       string `json:"netns"`
	IfName      string `json:"ifname"`
	Slot        int    `json:"slot"`
	PID         int    `json:"pid"`
	// Start is the agent's start time (clock ticks since boot, from
	// /proc/PID/stat), so that a reused pid is never taken for it.
	Start uint64 `json:"start"`
	Unit  string `json:"unit,omitempty"` // the systemd scope, if any
	// Supervised says PID is the supervisor (msbtap-cni supervise), which
	// restarts the agent whose own pid is in the state directory's pid
	// file.
	Supervised bool `json:"supervised,omitempty"`
}

// readyTimeout bounds how long ADD waits for the agent.
const readyTimeout = 20 * time.Second

// load parses the configuration and checks the container id, as the CNI
// errors the runtime expects.
func load(args *skel.CmdArgs) (*NetConf, error) {
	c, err := ParseConf(args.StdinData, args.Args)
	if err != nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "invalid network configuration", err.Error())
	}
	if err := checkID(args.ContainerID); err != nil {
		return nil, types.NewError(types.ErrInvalidEnvironmentVariables, err.Error(), "")
	}
	return c, nil
}

// Add starts the agent for args' namespace and prints the result.
func Add(args *skel.CmdArgs) error {
	c, err := load(args)
	if err != nil {
		return err
	}
	if n := len(args.IfName); n == 0 || n > 15 || strings.ContainsAny(args.IfName, "/ :") {
		return types.NewError(types.ErrInvalidEnvironmentVariables, "CNI_IFNAME "+strconv.Quote(args.IfName)+": not an interface name", "")
	}
	msbtap, err := findMsbtap(c, args.Path)
	if err != nil {
		return types.NewError(types.ErrTryAgainLater, err.Error(), "")
	}
	dir := filepath.Join(c.StateDir, args.ContainerID)
	if _, err := os.Stat(filepath.Join(dir, "state.json")); err == nil {
		return fmt.Errorf("container %s already has an msbtap agent (DEL it first)", args.ContainerID)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	slot, err := allocSlot(c, args.ContainerID)
	if err != nil {
		os.RemoveAll(dir)
		return err
	}
	st := &state{ContainerID: args.ContainerID, Netns: args.Netns, IfName: args.IfName, Slot: slot}
	p, err := start(c, msbtap, dir, st)
	if err != nil {
		stopAgent(st)
		releaseSlot(c, slot, args.ContainerID)
		os.RemoveAll(dir)
		return err
	}
	if err := writeState(dir, st); err != nil {
		stopAgent(st)
		releaseSlot(c, slot, args.ContainerID)
		os.RemoveAll(dir)
		return err
	}
	return types.PrintResult(result(p, args), c.CNIVersion)
}

// result is the interfaces, addresses, routes and DNS of the plan.
func result(p plan.Plan, args *skel.CmdArgs) *current.Result {
	idx := 0
	ipnet := func(pr netip.Prefix) net.IPNet {
		return net.IPNet{IP: pr.Addr().AsSlice(), Mask: net.CIDRMask(pr.Bits(), pr.Addr().BitLen())}
	}
	_, any4, _ := net.ParseCIDR("0.0.0.0/0")
	_, any6, _ := net.ParseCIDR("::/0")
	return &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{{Name: args.IfName, Mac: p.GuestMAC.String(), Sandbox: args.Netns}},
		IPs: []*current.IPConfig{
			{Interface: &idx, Address: ipnet(p.GuestIPv4), Gateway: p.GatewayV4.AsSlice()},
			{Interface: &idx, Address: ipnet(p.GuestIPv6), Gateway: p.GatewayV6.AsSlice()},
		},
		Routes: []*types.Route{{Dst: *any4, GW: p.GatewayV4.AsSlice()}, {Dst: *any6, GW: p.GatewayV6.AsSlice()}},
		DNS:    types.DNS{Nameservers: []string{p.GatewayV4.String(), p.GatewayV6.String()}},
	}
}

// findMsbtap finds the agent binary: the configuration's, else beside the
// plugin in CNI_PATH, else on PATH.
func findMsbtap(c *NetConf, cniPath string) (string, error) {
	if c.Msbtap != "" {
		return c.Msbtap, nil
	}
	for _, d := range filepath.SplitList(cniPath) {
		p := filepath.Join(d, "msbtap")
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	if p, err := exec.LookPath("msbtap"); err == nil {
		return p, nil
	}
	return "", errors.New("msbtap agent binary not found beside the plugin in CNI_PATH nor on PATH")
}

// allocSlot takes the first free slot of the range: a file created with
// O_EXCL is the lock, so concurrent ADDs never share one. With metrics on,
// a slot whose metrics port another process holds is passed over (and
// left free), so one busy port costs a slot, not every new pod.
func allocSlot(c *NetConf, id string) (int, error) {
	busy := 0
	for {
		s, err := takeSlot(c, id, busy)
		if err != nil || c.MetricsHost == "" {
			return s, err
		}
		if portFree(c.metricsAddr(s)) {
			return s, nil
		}
		releaseSlot(c, s, id)
		busy = s - c.SlotRange[0] + 1
	}
}

// portFree reports whether a TCP listener can be had at addr now.
func portFree(addr string) bool {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return false
	}
	l.Close()
	return true
}

// takeSlot takes the first free slot at least skip past the range's start.
func takeSlot(c *NetConf, id string, skip int) (int, error) {
	dir := filepath.Join(c.StateDir, "slots")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return 0, err
	}
	for s := c.SlotRange[0] + skip; s <= c.SlotRange[1]; s++ {
		f, err := os.OpenFile(filepath.Join(dir, strconv.Itoa(s)), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if errors.Is(err, os.ErrExist) {
			continue
		}
		if err != nil {
			return 0, err
		}
		_, err = f.WriteString(id + "\n")
		f.Close()
		return s, err
	}
	return 0, fmt.Errorf("no free slot in %d..%d", c.SlotRange[0], c.SlotRange[1])
}

// releaseSlot frees slot if id holds it.
func releaseSlot(c *NetConf, slot int, id string) {
	p := filepath.Join(c.StateDir, "slots", strconv.Itoa(slot))
	if b, err := os.ReadFile(p); err == nil && strings.TrimSpace(string(b)) == id {
		os.Remove(p)
	}
}

// releaseSlotsOf frees every slot id holds (a DEL with no state left).
func releaseSlotsOf(c *NetConf, id string) {
	dir := filepath.Join(c.StateDir, "slots")
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if n, err := strconv.Atoi(e.Name()); err == nil {
			releaseSlot(c, n, id)
		}
	}
}

// start runs the agent, detached, and waits until it is ready.
func start(c *NetConf, msbtap, dir string, st *state) (plan.Plan, error) {
	p, err := plan.ForSlot(st.Slot)
	if err != nil {
		return p, err
	}
	if c.MTU != 0 {
		if p, err = p.Apply(plan.Overrides{MTU: c.MTU}); err != nil {
			return p, err
		}
	}
	args := []string{"run", "--netns", st.Netns, "--tap", st.IfName, "--slot", strconv.Itoa(st.Slot),
		"--ready-fd", "3", "--pid-file", filepath.Join(dir, "pid"), "--log-format", "json"}
	if c.MTU != 0 {
		args = append(args, "--mtu", strconv.Itoa(c.MTU))
	}
	pol, err := c.policyArg(dir)
	if err != nil {
		return p, err
	}
	if pol != "" {
		args = append(args, "--policy", pol)
	}
	for _, u := range c.DNSUpstreams {
		args = append(args, "--dns-upstream", u)
	}
	if c.DenyMode != "" {
		args = append(args, "--deny-mode", c.DenyMode)
	}
	if c.AuditLogDir != "" {
		if err := os.MkdirAll(c.AuditLogDir, 0o700); err != nil {
			return p, err
		}
		args = append(args, "--audit-log", filepath.Join(c.AuditLogDir, st.ContainerID+".log"))
	}
	if a := c.metricsAddr(st.Slot); a != "" {
		args = append(args, "--metrics-addr", a)
	}
	for _, pm := range c.RuntimeConfig.PortMappings {
		s, _ := pm.spec()
		args = append(args, "--publish", s)
	}
	argv := append([]string{msbtap}, args...)
	if self, err := os.Executable(); err == nil {
		// The supervisor restarts the agent if it dies, into the same
		// namespace and slot with the same TAP and policy.
		argv = append([]string{self, "supervise", "--netns", st.Netns, "--"}, argv...)
		st.Supervised = true
	}
	if unit, ok := systemdScope(st.ContainerID); ok {
		st.Unit = unit
		argv = append([]string{"systemd-run", "--scope", "--quiet", "--collect", "--unit", unit, "--"}, argv...)
	}
	logf, err := os.OpenFile(filepath.Join(dir, "agent.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return p, err
	}
	defer logf.Close()
	pr, pw, err := os.Pipe()
	if err != nil {
		return p, err
	}
	defer pr.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{pw}
	// A session of its own: the agent outlives the plugin, and no signal
	// for the runtime's process group reaches it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		pw.Close()
		return p, fmt.Errorf("start msbtap: %w", err)
	}
	pw.Close()
	st.PID = cmd.Process.Pid
	st.Start = startTime(st.PID)
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(pr).ReadString('\n')
		line <- s
	}()
	select {
	case s := <-line:
		if strings.TrimSpace(s) == "ready" {
			cmd.Process.Release()
			return p, nil
		}
		<-exited
		return p, fmt.Errorf("msbtap did not start: %s", lastLines(filepath.Join(dir, "agent.log")))
	case <-time.After(readyTimeout):
		return p, fmt.Errorf("msbtap not ready after %s: %s", readyTimeout, lastLines(filepath.Join(dir, "agent.log")))
	}
}

// systemdScope names the agent's scope where systemd runs.
func systemdScope(id string) (string, bool) {
	if _, err := os.Stat("/run/systemd/system"); err != nil {
		return "", false
	}
	if _, err := exec.LookPath("systemd-run"); err != nil {
		return "", false
	}
	if len(id) > 32 {
		id = id[:32]
	}
	return "msbtap-cni-" + id + ".scope", true
}

// lastLines is the end of the agent's log, for an error message.
func lastLines(path string) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 3 {
		lines = lines[len(lines)-3:]
	}
	return strings.Join(lines, " | ")
}

// startTime is a process's start time from /proc/PID/stat: 0 if it is
// gone, or dead and waiting to be reaped (by init, its parent now).
func startTime(pid int) uint64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	if len(f) < 20 || f[0] == "Z" || f[0] == "X" {
		return 0
	}
	n, _ := strconv.ParseUint(f[19], 10, 64) // field 22 of the whole line
	return n
}

// alive reports whether the state's agent still runs.
func (st *state) alive() bool {
	return st.PID > 0 && st.Start != 0 && startTime(st.PID) == st.Start
}

// stopAgent ends the agent: SIGTERM, then SIGKILL after 10 s.
func stopAgent(st *state) {
	if !st.alive() {
		return
	}
	syscall.Kill(st.PID, syscall.SIGTERM)
	for i := 0; i < 200 && st.alive(); i++ {
		time.Sleep(50 * time.Millisecond)
	}
	if st.alive() {
		syscall.Kill(st.PID, syscall.SIGKILL)
		for i := 0; i < 40 && st.alive(); i++ {
			time.Sleep(50 * time.Millisecond)
		}
	}
}

func writeState(dir string, st *state) error {
	b, _ := json.Marshal(st)
	tmp := filepath.Join(dir, "state.json.tmp")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, "state.json"))
}

func readState(dir string) (*state, error) {
	b, err := os.ReadFile(filepath.Join(dir, "state.json"))
	if err != nil {
		return nil, err
	}
	var st state
	return &st, json.Unmarshal(b, &st)
}

// Del stops the agent and releases its slot and state. It succeeds when
// there is nothing left to remove: after a failed ADD, a second DEL, a
// killed agent, a namespace already gone. It needs only what ADD stored
// and the configuration's state directory: a configuration that stopped
// validating since (a policy file removed, a changed field) must not keep
// a pod from being removed.
func Del(args *skel.CmdArgs) error {
	c, err := parseBare(args.StdinData)
	if err != nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "invalid network configuration", err.Error())
	}
	if err := checkID(args.ContainerID); err != nil {
		return types.NewError(types.ErrInvalidEnvironmentVariables, err.Error(), "")
	}
	dir := filepath.Join(c.StateDir, args.ContainerID)
	if st, err := readState(dir); err == nil {
		stopAgent(st)
		releaseSlot(c, st.Slot, args.ContainerID)
	}
	releaseSlotsOf(c, args.ContainerID)
	return os.RemoveAll(dir)
}

// Check verifies that the agent runs and that the TAP and its addresses are
// as ADD returned them.
func Check(args *skel.CmdArgs) error {
	c, err := load(args)
	if err != nil {
		return err
	}
	st, err := readState(filepath.Join(c.StateDir, args.ContainerID))
	if err != nil {
		return fmt.Errorf("no msbtap agent for container %s: %v", args.ContainerID, err)
	}
	if !st.alive() {
		return fmt.Errorf("the msbtap agent of container %s (pid %d) is not running", args.ContainerID, st.PID)
	}
	if st.Supervised {
		if pid := agentPID(filepath.Join(c.StateDir, args.ContainerID)); pid == 0 || syscall.Kill(pid, 0) != nil {
			return fmt.Errorf("the msbtap agent of container %s is being restarted by its supervisor (pid %d)", args.ContainerID, st.PID)
		}
	}
	var want []netip.Prefix
	if c.PrevResult != nil {
		prev, err := current.NewResultFromResult(c.PrevResult)
		if err != nil {
			return fmt.Errorf("prevResult: %v", err)
		}
		for _, ip := range prev.IPs {
			a, _ := netip.AddrFromSlice(ip.Address.IP)
			bits, _ := ip.Address.Mask.Size()
			want = append(want, netip.PrefixFrom(a.Unmap(), bits))
		}
	}
	ns, err := netns.Open(args.Netns)
	if err != nil {
		return err
	}
	defer ns.Close()
	return netns.Do(ns, func() error {
		l, err := netlink.LinkByName(args.IfName)
		if err != nil {
			return fmt.Errorf("%s in %s: %v", args.IfName, args.Netns, err)
		}
		if l.Type() != "tuntap" {
			return fmt.Errorf("%s is a %s, not msbtap's TAP", args.IfName, l.Type())
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return err
		}
		for _, w := range want {
			found := false
			for _, a := range addrs {
				ip, _ := netip.AddrFromSlice(a.IP)
				bits, _ := a.Mask.Size()
				if netip.PrefixFrom(ip.Unmap(), bits) == w {
					found = true
				}
			}
			if !found {
				return fmt.Errorf("%s lacks %s", args.IfName, w)
			}
		}
		return nil
	})
}

// Status reports whether the plugin can serve ADDs: the agent binary is
// there and the state directory writable.
func Status(args *skel.CmdArgs) error {
	c, err := ParseConf(args.StdinData, args.Args)
	if err != nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "invalid network configuration", err.Error())
	}
	if _, err := findMsbtap(c, args.Path); err != nil {
		return types.NewError(types.ErrPluginNotAvailable, err.Error(), "")
	}
	if err := os.MkdirAll(c.StateDir, 0o700); err != nil {
		return types.NewError(types.ErrPluginNotAvailable, "state directory: "+err.Error(), "")
	}
	return nil
}
