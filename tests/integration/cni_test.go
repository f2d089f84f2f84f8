package integration

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/msbtap/msbtap/internal/testkit/testenv"
	"github.com/msbtap/msbtap/netns"
)

// cniEnv runs libcni (what containerd uses) from the host namespace of a
// test world, with the plugin and msbtap side by side in CNI_PATH.
type cniEnv struct {
	w        *testenv.World
	cfg      *libcni.CNIConfig
	list     *libcni.NetworkConfigList
	stateDir string
	host     netns.Handle
}

func newCNI(t *testing.T, w *testenv.World, extra string) *cniEnv {
	t.Helper()
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	conf := `{"cniVersion": "1.1.0", "name": "msbtap-test", "plugins": [{"type": "msbtap-cni",
		"dnsUpstreams": ["` + testenv.DNSHost4 + `"], "stateDir": "` + state + `", "capabilities": {"portMappings": true}` + extra + `}]}`
	list, err := libcni.NetworkConfFromBytes([]byte(conf))
	if err != nil {
		t.Fatal(err)
	}
	h, err := netns.Open(w.Host.Path())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return &cniEnv{w: w, cfg: libcni.NewCNIConfigWithCacheDir([]string{filepath.Dir(w.Msbtap)}, filepath.Join(dir, "cache"), nil),
		list: list, stateDir: state, host: h}
}

func (c *cniEnv) rt(ns *testenv.NS, id string, ports ...map[string]any) *libcni.RuntimeConf {
	rt := &libcni.RuntimeConf{ContainerID: id, NetNS: ns.Path(), IfName: "eth0"}
	if len(ports) > 0 {
		rt.CapabilityArgs = map[string]any{"portMappings": ports}
	}
	return rt
}

// in runs f in the host namespace: the plugin, and the agent it starts,
// live there.
func (c *cniEnv) in(f func() error) error { return netns.Do(c.host, f) }

func (c *cniEnv) add(t *testing.T, rt *libcni.RuntimeConf) (*current.Result, error) {
	var res types.Result
	err := c.in(func() (err error) {
		res, err = c.cfg.AddNetworkList(context.Background(), c.list, rt)
		return err
	})
	if err != nil {
		return nil, err
	}
	return current.NewResultFromResult(res)
}

func (c *cniEnv) del(rt *libcni.RuntimeConf) error {
	return c.in(func() error { return c.cfg.DelNetworkList(context.Background(), c.list, rt) })
}

func (c *cniEnv) check(rt *libcni.RuntimeConf) error {
	return c.in(func() error { return c.cfg.CheckNetworkList(context.Background(), c.list, rt) })
}

// agentPID reads the pid ADD recorded for id.
func (c *cniEnv) agentPID(t *testing.T, id string) int {
	b, err := os.ReadFile(filepath.Join(c.stateDir, id, "state.json"))
	if err != nil {
		t.Fatal(err)
	}
	var st struct{ PID int }
	json.Unmarshal(b, &st)
	return st.PID
}

// gone checks that DEL left nothing: no agent, no TAP, no slot, no state.
func (c *cniEnv) gone(t *testing.T, ns *testenv.NS, id string, pid int) {
	t.Helper()
	if pid > 0 && syscall.Kill(pid, 0) == nil && !isZombie(pid) {
		t.Errorf("agent %d still runs after DEL", pid)
	}
	if out, err := ns.Run("ip", "link", "show", "eth0"); err == nil {
		t.Errorf("eth0 still in the namespace after DEL: %s", out)
	}
	if _, err := os.Stat(filepath.Join(c.stateDir, id)); err == nil {
		t.Error("state directory left after DEL")
	}
	if ents, _ := os.ReadDir(filepath.Join(c.stateDir, "slots")); len(ents) != 0 {
		t.Errorf("%d slots still held after DEL", len(ents))
	}
}

// TestCNIAddCheckDel: ADD gives the namespace msbtap's network (curl and
// dig work, the policy holds, a hostPort reaches the container), CHECK
// passes, DEL leaves nothing and may be repeated.
func TestCNIAddCheckDel(t *testing.T) {
	testenv.RequireTools(t, "curl", "dig")
	w := testenv.NewWorld(t)
	c := newCNI(t, w, "")
	hostPort := freePort(t)
	w.Guest.Start(t, w.Testhost, "serve", "--http", "0.0.0.0:8080")
	rt := c.rt(w.Guest, "ctr-one", map[string]any{"hostPort": mustAtoi(hostPort), "containerPort": 8080, "protocol": "tcp"})
	start := time.Now()
	res, err := c.add(t, rt)
	if err != nil {
		t.Fatalf("ADD: %v", err)
	}
	t.Logf("ADD took %s", time.Since(start))
	if len(res.IPs) != 2 || len(res.Interfaces) != 1 || res.Interfaces[0].Sandbox != w.Guest.Path() || len(res.DNS.Nameservers) == 0 || len(res.Routes) != 2 {
		t.Fatalf("result: %+v", res)
	}
	gw := res.IPs[0].Gateway.String()
	pid := c.agentPID(t, "ctr-one")
	if out, err := curlIn(t, w, "http://"+testenv.TestDomain+"/"); err != nil || !strings.Contains(out, "hello from testhost") {
		t.Errorf("curl by name: %v %s", err, out)
	}
	if out, err := w.Guest.Run("dig", "+short", "@"+gw, testenv.TestDomain); err != nil || !strings.Contains(out, testenv.WebHost4) {
		t.Errorf("dig: %v %s", err, out)
	}
	if ok, out := reach(t, w, "tcp", testenv.PrivHost4+":80"); ok {
		t.Errorf("the private test host is reachable: %s", out)
	}
	if out, err := w.Host.Run("curl", "-sS", "--max-time", "5", "http://127.0.0.1:"+hostPort+"/"); err != nil || !strings.Contains(out, "hello from testhost") {
		t.Errorf("hostPort: %v %s", err, out)
	}
	if err := c.check(rt); err != nil {
		t.Errorf("CHECK: %v", err)
	}
	start = time.Now()
	if err := c.del(rt); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	t.Logf("DEL took %s", time.Since(start))
	c.gone(t, w.Guest, "ctr-one", pid)
	if err := c.del(rt); err != nil {
		t.Errorf("a second DEL: %v", err)
	}
	if err := c.check(rt); err == nil {
		t.Error("CHECK passed after DEL")
	}
}

func mustAtoi(s string) int { n, _ := strconv.Atoi(s); return n }

// TestCNIDelAfterKilledAgent: DEL cleans up after an agent that died.
func TestCNIDelAfterKilledAgent(t *testing.T) {
	w := testenv.NewWorld(t)
	c := newCNI(t, w, "")
	rt := c.rt(w.Guest, "ctr-killed")
	if _, err := c.add(t, rt); err != nil {
		t.Fatal(err)
	}
	pid := c.agentPID(t, "ctr-killed")
	syscall.Kill(pid, syscall.SIGKILL)
	waitFor(t, 5*time.Second, "the agent to die", func() bool { return syscall.Kill(pid, 0) != nil || isZombie(pid) })
	if err := c.check(rt); err == nil {
		t.Error("CHECK passed with the agent dead")
	}
	if err := c.del(rt); err != nil {
		t.Fatalf("DEL after a killed agent: %v", err)
	}
	c.gone(t, w.Guest, "ctr-killed", pid)
}

// TestCNIAgentRestarted: an agent killed with SIGKILL is restarted by its
// supervisor into the same namespace and slot, and the pod fetches again
// within 2 s; CHECK passes again once it is back.
func TestCNIAgentRestarted(t *testing.T) {
	testenv.RequireTools(t, "curl")
	w := testenv.NewWorld(t)
	c := newCNI(t, w, "")
	rt := c.rt(w.Guest, "ctr-restart")
	res, err := c.add(t, rt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.del(rt) })
	pidFile := filepath.Join(c.stateDir, "ctr-restart", "pid")
	readPID := func() int {
		b, _ := os.ReadFile(pidFile)
		n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		return n
	}
	agent := readPID()
	if agent == 0 || agent == c.agentPID(t, "ctr-restart") {
		t.Fatalf("agent pid %d (supervisor %d)", agent, c.agentPID(t, "ctr-restart"))
	}
	url := "http://" + testenv.WebHost4 + "/"
	if out, err := w.Guest.Run("curl", "-sS", "--max-time", "5", url); err != nil || !strings.Contains(out, "hello from testhost") {
		t.Fatalf("fetch before: %v %s", err, out)
	}
	syscall.Kill(agent, syscall.SIGKILL)
	killed := time.Now()
	var out string
	for {
		out, err = w.Guest.Run("curl", "-sS", "--max-time", "1", url)
		if err == nil && strings.Contains(out, "hello from testhost") {
			break
		}
		if time.Since(killed) > 2*time.Second {
			t.Fatalf("no fetch within 2 s of the kill: %v %s", err, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("fetching again %s after the kill", time.Since(killed).Round(time.Millisecond))
	if n := readPID(); n == agent || n == 0 {
		t.Errorf("pid file %d after the restart", n)
	}
	if out, err := w.Guest.Run("ip", "-br", "addr", "show", "eth0"); err != nil || !strings.Contains(out, res.IPs[0].Address.IP.String()) {
		t.Errorf("eth0 after the restart: %v %s", err, out)
	}
	if err := c.check(rt); err != nil {
		t.Errorf("CHECK after the restart: %v", err)
	}
	sup := c.agentPID(t, "ctr-restart")
	if err := c.del(rt); err != nil {
		t.Fatal(err)
	}
	c.gone(t, w.Guest, "ctr-restart", sup)
	if n := readPID(); n != 0 && syscall.Kill(n, 0) == nil && !isZombie(n) {
		t.Errorf("agent %d runs after DEL", n)
	}
}

// TestCNIConcurrentAdds: 20 namespaces added at once get 20 slots, all
// working; the note's ADD time is the median here.
func TestCNIConcurrentAdds(t *testing.T) {
	w := testenv.NewWorld(t)
	c := newCNI(t, w, "")
	const n = 20
	nss := make([]*testenv.NS, n)
	for i := range nss {
		nss[i] = testenv.NewNS(t, "c"+strconv.Itoa(i))
	}
	// One at a time first: the time an ADD takes, and an idle agent's
	// memory.
	var seq []time.Duration
	var rss []int
	for i, ns := range nss {
		id := fmt.Sprintf("seq-%d", i)
		start := time.Now()
		if _, err := c.add(t, c.rt(ns, id)); err != nil {
			t.Fatalf("ADD %d: %v", i, err)
		}
		seq = append(seq, time.Since(start))
		pid := c.agentPID(t, id)
		b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) > 1 && f[0] == "VmRSS:" {
				kb, _ := strconv.Atoi(f[1])
				rss = append(rss, kb)
			}
		}
		if err := c.del(c.rt(ns, id)); err != nil {
			t.Fatalf("DEL %d: %v", i, err)
		}
	}
	sort.Slice(seq, func(i, j int) bool { return seq[i] < seq[j] })
	sort.Ints(rss)
	t.Logf("ADD one at a time: median %s of %d; idle agent RSS median %d KiB", seq[n/2], n, rss[len(rss)/2])

	var mu sync.Mutex
	addrs := map[string]bool{}
	var took []time.Duration
	var wg sync.WaitGroup
	for i := range nss {
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			res, err := c.add(t, c.rt(nss[i], fmt.Sprintf("ctr-%d", i)))
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				t.Errorf("ADD %d: %v", i, err)
				return
			}
			took = append(took, time.Since(start))
			addrs[res.IPs[0].Address.IP.String()] = true
		}()
	}
	wg.Wait()
	if len(addrs) != n {
		t.Fatalf("%d distinct addresses for %d namespaces", len(addrs), n)
	}
	sort.Slice(took, func(i, j int) bool { return took[i] < took[j] })
	t.Logf("ADD of %d namespaces at once: median %s, slowest %s", n, took[n/2], took[n-1])
	for i, ns := range nss {
		if out, err := ns.Run("ping", "-c", "1", "-W", "2", testenv.WebHost4); err != nil {
			t.Errorf("namespace %d: %v %s", i, err, out)
		}
	}
	for i, ns := range nss {
		id := fmt.Sprintf("ctr-%d", i)
		pid := c.agentPID(t, id)
		if err := c.del(c.rt(ns, id)); err != nil {
			t.Errorf("DEL %d: %v", i, err)
		}
		waitFor(t, 5*time.Second, "the agent to exit", func() bool { return syscall.Kill(pid, 0) != nil || isZombie(pid) })
	}
	if ents, _ := os.ReadDir(filepath.Join(c.stateDir, "slots")); len(ents) != 0 {
		t.Errorf("%d slots held after every DEL", len(ents))
	}
}

// TestCNIConfigErrors: a bad configuration, or a pod that names a path
// for its policy, gets the CNI error JSON with a clear message.
func TestCNIConfigErrors(t *testing.T) {
	w := testenv.NewWorld(t)
	for _, tc := range []struct{ extra, args, want string }{
		{`, "mtu": 99`, "", "mtu 99: out of range"},
		{`, "policy": "no-such-preset"`, "", "no-such-preset"},
		{`, "policy": {"default_action": "maybe"}`, "", "default_action"},
		{`, "policyDir": "/etc"`, "MSBTAP_POLICY=../shadow", "not a path"},
	} {
		c := newCNI(t, w, tc.extra)
		rt := c.rt(w.Guest, "ctr-bad")
		if tc.args != "" {
			k, v, _ := strings.Cut(tc.args, "=")
			rt.Args = [][2]string{{k, v}}
		}
		_, err := c.add(t, rt)
		var ce *types.Error
		if !errors.As(err, &ce) || ce.Code != types.ErrInvalidNetworkConfig || !strings.Contains(ce.Details+ce.Msg, tc.want) {
			t.Errorf("%s: %v, want a CNI error naming %q", tc.extra, err, tc.want)
		}
		if out, err := w.Guest.Run("ip", "link", "show", "eth0"); err == nil {
			t.Errorf("a failed ADD left eth0: %s", out)
		}
	}
}

// TestCNIKataStyleVM: a VM runtime (Kata's way) keeps the plugin's TAP as
// the namespace's uplink: it moves the addresses to the VM, creates a TAP
// of its own for QEMU and joins the two with tc redirects. The test guest
// boots on it, gets its address by DHCP, resolves, fetches and is denied
// as a container would be.
func TestCNIKataStyleVM(t *testing.T) {
	testenv.RequireTools(t, "tc")
	w := testenv.NewWorld(t)
	kernel, initrd := vmImage(t)
	c := newCNI(t, w, "")
	rt := c.rt(w.Guest, "kata-vm")
	res, err := c.add(t, rt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.del(rt) })
	for _, cmd := range [][]string{
		{"ip", "tuntap", "add", "tap0_kata", "mode", "tap"},
		{"ip", "link", "set", "tap0_kata", "up"},
		{"ip", "addr", "flush", "dev", "eth0"},
		{"tc", "qdisc", "add", "dev", "eth0", "ingress"},
		{"tc", "filter", "add", "dev", "eth0", "parent", "ffff:", "protocol", "all", "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", "tap0_kata"},
		{"tc", "qdisc", "add", "dev", "tap0_kata", "ingress"},
		{"tc", "filter", "add", "dev", "tap0_kata", "parent", "ffff:", "protocol", "all", "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", "eth0"},
	} {
		w.Guest.MustRun(t, cmd...)
	}
	cmd := w.Guest.Command("qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-m", "256", "-smp", "1",
		"-nographic", "-no-reboot", "-monitor", "none", "-kernel", kernel, "-initrd", initrd,
		"-append", "console=ttyS0 panic=-1 quiet msbtap.resolve="+testenv.TestDomain+" msbtap.fetch=http://"+testenv.TestDomain+"/ msbtap.deny="+testenv.PrivHost4+":80",
		"-netdev", "tap,id=net0,ifname=tap0_kata,script=no,downscript=no",
		"-device", "virtio-net-pci,netdev=net0,mac="+res.Interfaces[0].Mac)
	out, done := startCmd(t, cmd)
	select {
	case <-done:
	case <-time.After(4 * time.Minute):
		t.Fatalf("the VM did not finish within 4 minutes:\n%s", out)
	}
	serial := out.String()
	for _, want := range []string{
		"MSBTAP-VM: dhcp ok " + res.IPs[0].Address.String(),
		"MSBTAP-VM: resolve ok " + testenv.TestDomain + " " + testenv.WebHost4,
		"MSBTAP-VM: fetch ok hello from testhost",
		"MSBTAP-VM: deny ok " + testenv.PrivHost4 + ":80",
	} {
		if !strings.Contains(serial, want) {
			t.Errorf("serial console lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("serial console:\n%s", serial)
	}
}

// TestCNIAddTimeVsBridge measures ADD for msbtap and for the reference
// bridge plugin (with host-local IPAM), alternating, ten each, and
// reports the medians: a figure for `make bench`, not a pass/fail timing.
func TestCNIAddTimeVsBridge(t *testing.T) {
	if os.Getenv("MSBTAP_BENCH") == "" {
		t.Skip("a measurement: MSBTAP_BENCH=1 (make bench) runs it")
	}
	w := testenv.NewWorld(t)
	c := newCNI(t, w, "")
	bin := cniBinDir(t, w)
	br := `{"cniVersion": "1.0.0", "name": "br-test", "plugins": [{"type": "bridge", "bridge": "mtbr` + strconv.Itoa(os.Getpid()%10000) + `",
		"isGateway": true, "ipam": {"type": "host-local", "dataDir": "` + filepath.Join(t.TempDir(), "ipam") + `", "ranges": [[{"subnet": "10.123.0.0/24"}]]}}]}`
	brList, err := libcni.NetworkConfFromBytes([]byte(br))
	if err != nil {
		t.Fatal(err)
	}
	brCfg := libcni.NewCNIConfigWithCacheDir([]string{bin}, filepath.Join(t.TempDir(), "cache"), nil)
	var ms, bs []time.Duration
	for i := 0; i < 10; i++ {
		ns := testenv.NewNS(t, "a"+strconv.Itoa(i))
		rt := c.rt(ns, fmt.Sprintf("time-%d", i))
		start := time.Now()
		if _, err := c.add(t, rt); err != nil {
			t.Fatal(err)
		}
		ms = append(ms, time.Since(start))
		c.del(rt)
		brt := &libcni.RuntimeConf{ContainerID: fmt.Sprintf("br-%d", i), NetNS: ns.Path(), IfName: "eth1"}
		err := c.in(func() error {
			start = time.Now()
			_, err := brCfg.AddNetworkList(context.Background(), brList, brt)
			bs = append(bs, time.Since(start))
			if err == nil {
				brCfg.DelNetworkList(context.Background(), brList, brt)
			}
			return err
		})
		if err != nil {
			t.Fatalf("bridge ADD: %v", err)
		}
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i] < ms[j] })
	sort.Slice(bs, func(i, j int) bool { return bs[i] < bs[j] })
	t.Logf("ADD, median of 10 alternating: msbtap %s (%s..%s), bridge %s (%s..%s)", ms[5].Round(100*time.Microsecond),
		ms[0].Round(100*time.Microsecond), ms[9].Round(100*time.Microsecond), bs[5].Round(100*time.Microsecond), bs[0].Round(100*time.Microsecond), bs[9].Round(100*time.Microsecond))
}
