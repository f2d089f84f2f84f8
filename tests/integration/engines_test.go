package integration

import (
	"encoding/json"
	"fmt"

	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/msbtap/msbtap/internal/testkit/testenv"
)

// The engine tests run the plugin as users run it: containerd's CRI plugin
// driven by crictl the way the kubelet drives it, and podman with its CNI
// backend. Each engine gets its own state, configuration and socket
// directories inside the test's temporary directory, lives in the test
// world's host namespace (so its agents reach the test internet), and is
// stopped with every pod removed at the end.

// cniBinDir makes a CNI binary directory with the plugin, the agent and
// the reference plugins the engines and the comparison need.
func cniBinDir(t *testing.T, w *testenv.World) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "bin")
	os.MkdirAll(dir, 0o755)
	for _, f := range []struct{ src, name string }{
		{w.Msbtap, "msbtap"},
		{filepath.Join(filepath.Dir(w.Msbtap), "msbtap-cni"), "msbtap-cni"},
		{"/usr/lib/cni/loopback", "loopback"},
		{"/usr/lib/cni/bridge", "bridge"},
		{"/usr/lib/cni/host-local", "host-local"},
		{"/usr/lib/cni/portmap", "portmap"},
	} {
		b, err := os.ReadFile(f.src)
		if err != nil {
			t.Skipf("%s: %v (containernetworking-plugins: `make deps`, as root, installs what the tests need)", f.src, err)
		}
		if err := os.WriteFile(filepath.Join(dir, f.name), b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// msbtapConflist is the network configuration the engine tests install:
// docs/cni/10-msbtap.conflist's shape, with the test's directories.
func msbtapConflist(name, state, policies, audit string) string {
	return `{"cniVersion": "1.0.0", "name": "` + name + `", "plugins": [{"type": "msbtap-cni",
		"policy": "public-only", "policyDir": "` + policies + `", "auditLogDir": "` + audit + `",
		"dnsUpstreams": ["` + testenv.DNSHost4 + `"], "stateDir": "` + state + `",
		"capabilities": {"portMappings": true, "io.kubernetes.cri.pod-annotations": true}}]}`
}

type containerd struct {
	t                        *testing.T
	w                        *testenv.World
	dir, sock, config, state string
	cmd                      *exec.Cmd
	log                      *testenv.Buffer
}

func startContainerd(t *testing.T, w *testenv.World, confDir, binDir string) *containerd {
	t.Helper()
	testenv.RequireTools(t, "containerd", "containerd-shim-runc-v2", "runc", "crictl", "ctr")
	dir := t.TempDir()
	c := &containerd{t: t, w: w, dir: dir, sock: filepath.Join(dir, "containerd.sock"), config: filepath.Join(dir, "config.toml"), state: filepath.Join(dir, "state")}
	conf := `version = 2
root = "` + filepath.Join(dir, "root") + `"
state = "` + c.state + `"
[grpc]
  address = "` + c.sock + `"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/msbtap-pause:test"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  # This machine's root lacks CAP_SYS_RESOURCE: a pause container's
  # oom_score_adj of -998 would be refused.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "` + binDir + `"
    conf_dir = "` + confDir + `"
    max_conf_num = 1
`
	if err := os.WriteFile(c.config, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	c.start()
	t.Cleanup(c.cleanup)
	return c
}

func (c *containerd) start() {
	c.t.Helper()
	c.log = &testenv.Buffer{}
	// nsenter, not `ip netns exec`: that mounts a new /sys, which hides
	// the cgroup hierarchies runc needs.
	c.cmd = exec.Command("nsenter", "--net="+c.w.Host.Path(), "containerd", "--config", c.config)
	c.cmd.Stdout, c.cmd.Stderr = c.log, c.log
	if err := c.cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := c.crictl("info"); err == nil {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("containerd not up after 20 s:\n%s", c.log.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// stop ends containerd (its pods go on: the shims and the agents are not
// its children in the way that matters).
func (c *containerd) stop() {
	if c.cmd == nil {
		return
	}
	c.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { c.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		c.cmd.Process.Kill()
		<-done
	}
	c.cmd = nil
}

func (c *containerd) cleanup() {
	if c.cmd != nil {
		if out, err := c.crictl("rmp", "-f", "-a"); err != nil {
			c.t.Logf("crictl rmp -a: %v %s", err, out)
		}
	}
	c.stop()
	// Whatever is left of this instance: shims and their containers,
	// then the mounts under its directories.
	exec.Command("pkill", "-KILL", "-f", c.dir).Run()
	time.Sleep(100 * time.Millisecond)
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		var mps []string
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) > 4 && strings.HasPrefix(f[4], c.dir) {
				mps = append(mps, f[4])
			}
		}
		sort.Sort(sort.Reverse(sort.StringSlice(mps)))
		for _, mp := range mps {
			syscall.Unmount(mp, syscall.MNT_DETACH)
		}
	}
	if c.t.Failed() {
		c.t.Logf("containerd log (tail):\n%s", tail(c.log.String(), 40))
	}
}

func tail(s string, n int) string {
	l := strings.Split(s, "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

// crictl runs crictl against this containerd, from the host namespace.
func (c *containerd) crictl(args ...string) (string, error) {
	// In containerd's namespace: exec streams go through its stream
	// server on 127.0.0.1 there.
	full := append([]string{"nsenter", "--net=" + c.w.Host.Path(), "crictl", "--runtime-endpoint", "unix://" + c.sock, "--image-endpoint", "unix://" + c.sock, "--timeout", "30s"}, args...)
	cmd := exec.Command(full[0], full[1:]...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return strings.TrimSpace(string(out) + "\n" + stderr.String()), err
	}
	return strings.TrimSpace(string(out)), nil
}

func (c *containerd) mustCrictl(args ...string) string {
	c.t.Helper()
	out, err := c.crictl(args...)
	if err != nil {
		c.t.Fatalf("crictl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// importImages builds the pause and busybox images and imports them.
func (c *containerd) importImages(w *testenv.World) {
	c.t.Helper()
	pause := testenv.Image{Name: "localhost/msbtap-pause:test", Files: map[string]string{"pause": w.Testhost}, Entrypoint: []string{"/pause", "pause"}}
	bb := testenv.BusyboxImage(c.t, "localhost/msbtap-busybox:test", w.Testhost)
	for _, img := range []testenv.Image{pause, bb} {
		tar := img.WriteOCIArchive(c.t, c.dir)
		if out, err := exec.Command("ctr", "--address", c.sock, "-n", "k8s.io", "images", "import", "--all-platforms", tar).CombinedOutput(); err != nil {
			c.t.Fatalf("ctr images import %s: %v\n%s", img.Name, err, out)
		}
	}
}

// pod is one pod sandbox with one busybox container serving /www on 8080.
type pod struct {
	id, ctr, ip string
}

// runPod starts a pod as the kubelet does: RunPodSandbox (the CNI ADD),
// CreateContainer, StartContainer.
func (c *containerd) runPod(name string, annotations map[string]string, hostPort int) (*pod, error) {
	cfg := map[string]any{
		"metadata":      map[string]any{"name": name, "namespace": "default", "uid": "uid-" + name, "attempt": 0},
		"log_directory": filepath.Join(c.dir, "logs", name),
		"linux":         map[string]any{},
	}
	if annotations != nil {
		cfg["annotations"] = annotations
	}
	if hostPort != 0 {
		cfg["port_mappings"] = []any{map[string]any{"protocol": 0, "container_port": 8080, "host_port": hostPort}}
	}
	podFile := filepath.Join(c.dir, name+"-pod.json")
	ctrFile := filepath.Join(c.dir, name+"-ctr.json")
	b, _ := json.Marshal(cfg)
	os.WriteFile(podFile, b, 0o600)
	b, _ = json.Marshal(map[string]any{
		"metadata": map[string]any{"name": "web"},
		"image":    map[string]any{"image": "localhost/msbtap-busybox:test"},
		"command":  []string{"/bin/httpd", "-f", "-p", "8080", "-h", "/www"},
		"log_path": "web.log",
		"linux":    map[string]any{},
	})
	os.WriteFile(ctrFile, b, 0o600)
	id, err := c.crictl("runp", podFile)
	if err != nil {
		return nil, fmt.Errorf("runp: %v: %s", err, id)
	}
	p := &pod{id: id}
	if p.ctr, err = c.crictl("create", id, ctrFile, podFile); err != nil {
		return p, fmt.Errorf("create: %v: %s", err, p.ctr)
	}
	if out, err := c.crictl("start", p.ctr); err != nil {
		return p, fmt.Errorf("start: %v: %s", err, out)
	}
	out, err := c.crictl("inspectp", id)
	if err != nil {
		return p, fmt.Errorf("inspectp: %v: %s", err, out)
	}
	var st struct {
		Status struct {
			Network struct{ IP string }
		}
	}
	json.Unmarshal([]byte(out), &st)
	p.ip = st.Status.Network.IP
	return p, nil
}

// fetch runs busybox wget in the pod's container.
func (c *containerd) fetch(p *pod, url string) (string, error) {
	// busybox-static's wget -T crashes (Debian 12): timeout instead.
	return c.crictl("exec", p.ctr, "timeout", "5", "wget", "-q", "-O", "-", url)
}

func (c *containerd) removePod(p *pod) error {
	if out, err := c.crictl("stopp", p.id); err != nil {
		return fmt.Errorf("stopp: %v: %s", err, out)
	}
	if out, err := c.crictl("rmp", p.id); err != nil {
		return fmt.Errorf("rmp: %v: %s", err, out)
	}
	return nil
}

// TestContainerdCRI: containerd 1.6's CRI plugin, driven by crictl as the
// kubelet drives it, runs pods on msbtap's network: runp, create, start,
// exec (a fetch works, the private host is refused), inspectp (the slot's
// address), a hostPort, a pod annotation that picks a policy, ten pods at
// once, an agent killed with SIGKILL (the pod fetches again within 2 s),
// containerd restarted while pods run, stopp and rmp leaving no agent,
// slot or state behind.
func TestContainerdCRI(t *testing.T) {
	testenv.RequireTools(t, "containerd")
	w := testenv.NewWorld(t)
	bin := cniBinDir(t, w)
	dir := t.TempDir()
	confDir, state, policies, audit := filepath.Join(dir, "net.d"), filepath.Join(dir, "msbtap"), filepath.Join(dir, "policies"), filepath.Join(dir, "audit")
	for _, d := range []string{confDir, policies} {
		os.MkdirAll(d, 0o755)
	}
	os.WriteFile(filepath.Join(confDir, "10-msbtap.conflist"), []byte(msbtapConflist("msbtap", state, policies, audit)), 0o644)
	os.WriteFile(filepath.Join(policies, "deny-all.json"), []byte(`{"default_action": "deny"}`), 0o644)
	c := startContainerd(t, w, confDir, bin)
	c.importImages(w)
	web := "http://" + testenv.WebHost4 + "/"

	hostPort := mustAtoi(freePort(t))
	start := time.Now()
	p, err := c.runPod("first", nil, hostPort)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("first pod running after %s", time.Since(start).Round(time.Millisecond))
	if !strings.HasPrefix(p.ip, "100.96.") {
		t.Errorf("inspectp IP %q, want the slot's 100.96.x address", p.ip)
	}
	if out, err := c.fetch(p, web); err != nil || !strings.Contains(out, "hello from testhost") {
		t.Errorf("fetch in the pod: %v %s", err, out)
	}
	if out, err := c.fetch(p, "http://"+testenv.PrivHost4+"/"); err == nil {
		t.Errorf("the private host is reachable from the pod: %s", out)
	}
	if out, err := c.crictl("exec", p.ctr, "nslookup", testenv.TestDomain); err != nil || !strings.Contains(out, testenv.WebHost4) {
		t.Errorf("nslookup in the pod: %v %s", err, out)
	}
	if out, err := w.Host.Run("curl", "-sS", "--max-time", "5", "http://127.0.0.1:"+strconv.Itoa(hostPort)+"/"); err != nil || !strings.Contains(out, "hello from a pod") {
		t.Errorf("hostPort %d: %v %s", hostPort, err, out)
	}

	// A pod annotation picks the deny-all policy of policyDir.
	strict, err := c.runPod("strict", map[string]string{"msbtap.io/policy": "deny-all"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if out, err := c.fetch(strict, web); err == nil {
		t.Errorf("a deny-all pod fetched: %s", out)
	}

	// SIGKILL of an agent: its supervisor restarts it.
	agent := podAgentPID(t, state, p.id)
	syscall.Kill(agent, syscall.SIGKILL)
	killed := time.Now()
	for {
		out, err := c.crictl("exec", p.ctr, "timeout", "1", "wget", "-q", "-O", "-", web)
		if err == nil && strings.Contains(out, "hello from testhost") {
			break
		}
		if time.Since(killed) > 2*time.Second {
			t.Fatalf("no fetch within 2 s of killing the agent: %v %s", err, out)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("the pod fetched again %s after its agent was killed", time.Since(killed).Round(time.Millisecond))

	// containerd restarted while pods run: they keep their network, and
	// are removed normally afterwards.
	c.stop()
	if out, err := w.Guest.Run("true"); err != nil {
		t.Fatal(out)
	}
	c.start()
	if out, err := c.fetch(p, web); err != nil || !strings.Contains(out, "hello from testhost") {
		t.Errorf("fetch after containerd restarted: %v %s", err, out)
	}

	// Ten pods at once.
	var wg sync.WaitGroup
	var mu sync.Mutex
	pods := map[string]*pod{}
	ips := map[string]bool{}
	for i := 0; i < 10; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			q, err := c.runPod(fmt.Sprintf("many-%d", i), nil, 0)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				t.Errorf("pod %d: %v", i, err)
				return
			}
			pods[q.id] = q
			ips[q.ip] = true
		}()
	}
	wg.Wait()
	if len(ips) != 10 {
		t.Errorf("%d distinct addresses for 10 pods", len(ips))
	}
	for _, q := range pods {
		if out, err := c.fetch(q, web); err != nil || !strings.Contains(out, "hello from testhost") {
			t.Errorf("pod %s: %v %s", q.id[:12], err, out)
		}
	}
	for _, q := range append([]*pod{p, strict}, values(pods)...) {
		if err := c.removePod(q); err != nil {
			t.Errorf("remove %s: %v", q.id[:12], err)
		}
	}
	ents, _ := os.ReadDir(state)
	for _, e := range ents {
		if e.Name() != "slots" {
			t.Errorf("state left after every pod was removed: %s", e.Name())
		}
	}
	if slots, _ := os.ReadDir(filepath.Join(state, "slots")); len(slots) != 0 {
		t.Errorf("%d slots held after every pod was removed", len(slots))
	}
	if out, _ := exec.Command("pgrep", "-f", state).Output(); len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("agents left after every pod was removed: %s", out)
	}
}

func values(m map[string]*pod) []*pod {
	var out []*pod
	for _, p := range m {
		out = append(out, p)
	}
	return out
}

// podAgentPID is the agent's own pid (not its supervisor's) for a pod.
func podAgentPID(t *testing.T, state, id string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(state, id, "pid"))
	if err != nil {
		t.Fatalf("agent pid of %s: %v", id, err)
	}
	n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return n
}

// podman runs podman 4.3 with its CNI backend in the test's own
// directories (storage, run root, configuration, networks) from the test
// world's host namespace.
type podman struct {
	t                *testing.T
	w                *testenv.World
	dir, conf, state string
}

func newPodman(t *testing.T, w *testenv.World) *podman {
	t.Helper()
	testenv.RequireTools(t, "podman", "conmon", "runc")
	bin := cniBinDir(t, w)
	dir := t.TempDir()
	p := &podman{t: t, w: w, dir: dir, conf: filepath.Join(dir, "containers.conf"), state: filepath.Join(dir, "msbtap")}
	netd := filepath.Join(dir, "net.d")
	os.MkdirAll(netd, 0o755)
	os.MkdirAll(filepath.Join(dir, "tmp"), 0o700)
	os.WriteFile(filepath.Join(netd, "10-msbtap.conflist"), []byte(msbtapConflist("msbtap", p.state, filepath.Join(dir, "policies"), filepath.Join(dir, "audit"))), 0o644)
	// enable_port_reservation = false: rootful podman binds each published
	// port itself after the plugin's ADD, when the agent already listens on
	// it (README, "CNI plugin").
	conf := `[network]
network_backend = "cni"
cni_plugin_dirs = ["` + bin + `"]
network_config_dir = "` + netd + `"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "` + filepath.Join(dir, "events.log") + `"
tmp_dir = "` + filepath.Join(dir, "tmp") + `"
runtime = "runc"
enable_port_reservation = false
`
	os.WriteFile(p.conf, []byte(conf), 0o644)
	// podman load keeps a blob cache in /var/lib/containers/cache, which
	// no option moves: removed at the end unless it was there before.
	const blobCache = "/var/lib/containers/cache"
	if _, err := os.Stat(blobCache); err != nil {
		t.Cleanup(func() {
			os.RemoveAll(blobCache)
			os.Remove(filepath.Dir(blobCache)) // only if empty
		})
	}
	tar := testenv.BusyboxImage(t, "localhost/msbtap-busybox:test", w.Testhost).WriteOCIArchive(t, dir)
	if out, err := p.run("load", "-i", tar); err != nil {
		t.Fatalf("podman load: %v\n%s", err, out)
	}
	t.Cleanup(func() {
		p.run("rm", "-a", "-f", "-t", "0")
		p.run("rmi", "-a", "-f")
		exec.Command("pkill", "-KILL", "-f", dir).Run()
		if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
			var mps []string
			for _, l := range strings.Split(string(b), "\n") {
				if f := strings.Fields(l); len(f) > 4 && strings.HasPrefix(f[4], dir) {
					mps = append(mps, f[4])
				}
			}
			sort.Sort(sort.Reverse(sort.StringSlice(mps)))
			for _, mp := range mps {
				syscall.Unmount(mp, syscall.MNT_DETACH)
			}
		}
	})
	return p
}

func (p *podman) run(args ...string) (string, error) {
	full := append([]string{"--net=" + p.w.Host.Path(), "podman", "--root", filepath.Join(p.dir, "root"), "--runroot", filepath.Join(p.dir, "runroot")}, args...)
	cmd := exec.Command("nsenter", full...)
	cmd.Env = append(os.Environ(), "CONTAINERS_CONF="+p.conf)
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// runArgs are the flags every container of the test gets: this
// machine's root may not raise RLIMIT_NOFILE past its hard limit, which
// podman's default would.
var podmanRunArgs = []string{"--pull", "never", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--network", "msbtap"}

// TestPodmanCNI: `podman run --network msbtap` (podman 4.3, CNI backend)
// fetches by name and address, is refused the private host, publishes a
// port with -p, answers DNS at the address `--dns` names, and `--rm`
// leaves no agent, slot or state behind.
func TestPodmanCNI(t *testing.T) {
	testenv.RequireTools(t, "podman")
	w := testenv.NewWorld(t)
	p := newPodman(t, w)
	img := "localhost/msbtap-busybox:test"

	args := append(append([]string{"run", "--rm", "--dns", "100.96.0.1"}, podmanRunArgs...), img, "/bin/sh", "-c",
		"cat /etc/resolv.conf; timeout 5 wget -q -O - http://"+testenv.TestDomain+"/; echo; if timeout 5 wget -q -O - http://"+testenv.PrivHost4+"/; then echo PRIVATE-REACHED; else echo private-refused; fi")
	start := time.Now()
	out, err := p.run(args...)
	t.Logf("podman run --rm took %s", time.Since(start).Round(time.Millisecond))
	if err != nil {
		t.Fatalf("podman run: %v\n%s", err, out)
	}
	for _, want := range []string{"nameserver 100.96.0.1", "hello from testhost", "private-refused"} {
		if !strings.Contains(out, want) {
			t.Errorf("podman run output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "PRIVATE-REACHED") || strings.Count(out, "nameserver") != 1 {
		t.Errorf("podman run output:\n%s", out)
	}

	hostPort := freePort(t)
	cargs := append(append([]string{"run", "-d", "--name", "web", "-p", "127.0.0.1:" + hostPort + ":8080"}, podmanRunArgs...), img, "/bin/httpd", "-f", "-p", "8080", "-h", "/www")
	if out, err := p.run(cargs...); err != nil {
		t.Fatalf("podman run -p: %v\n%s", err, out)
	}
	var got string
	waitFor(t, 5*time.Second, "the published port", func() bool {
		got, err = w.Host.Run("curl", "-sS", "--max-time", "2", "http://127.0.0.1:"+hostPort+"/")
		return err == nil && strings.Contains(got, "hello from a pod")
	})
	if out, err := p.run("rm", "-f", "-t", "0", "web"); err != nil {
		t.Errorf("podman rm: %v %s", err, out)
	}
	ents, _ := os.ReadDir(p.state)
	for _, e := range ents {
		if e.Name() != "slots" {
			t.Errorf("state left after the containers were removed: %s", e.Name())
		}
	}
	if slots, _ := os.ReadDir(filepath.Join(p.state, "slots")); len(slots) != 0 {
		t.Errorf("%d slots held after the containers were removed", len(slots))
	}
	if out, _ := exec.Command("pgrep", "-f", p.state).Output(); len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("agents left after the containers were removed: %s", out)
	}
}

// TestCNIImageInstalls: the DaemonSet's image (docs/cni/Dockerfile: FROM
// scratch, the two binaries and the conflist, entry point `msbtap-cni
// install`), built here as an OCI image and run by podman with the node's
// CNI directories mounted as the DaemonSet mounts them, installs the
// plugin, the agent and the configuration; the image has no shell.
func TestCNIImageInstalls(t *testing.T) {
	testenv.RequireTools(t, "podman")
	w := testenv.NewWorld(t)
	p := newPodman(t, w)
	conflist, err := filepath.Abs("../../docs/cni/10-msbtap.conflist")
	if err != nil {
		t.Fatal(err)
	}
	img := testenv.Image{Name: "localhost/msbtap-cni:test",
		Files:      map[string]string{"msbtap-cni": filepath.Join(filepath.Dir(w.Msbtap), "msbtap-cni"), "msbtap": w.Msbtap, "10-msbtap.conflist": conflist},
		Entrypoint: []string{"/msbtap-cni", "install"}}
	tar := img.WriteOCIArchive(t, p.dir)
	if out, err := p.run("load", "-i", tar); err != nil {
		t.Fatalf("podman load: %v\n%s", err, out)
	}
	bin, conf := t.TempDir(), t.TempDir()
	out, err := p.run("run", "--rm", "--pull", "never", "--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
		"-v", bin+":/host/opt/cni/bin", "-v", conf+":/host/etc/cni/net.d", img.Name)
	if err != nil {
		t.Fatalf("the image's entry point: %v\n%s", err, out)
	}
	for _, f := range []string{filepath.Join(bin, "msbtap-cni"), filepath.Join(bin, "msbtap"), filepath.Join(conf, "10-msbtap.conflist")} {
		if _, err := os.Stat(f); err != nil {
			t.Errorf("not installed: %v (output: %s)", err, out)
		}
	}
	if out, err := exec.Command(filepath.Join(bin, "msbtap"), "version").CombinedOutput(); err != nil {
		t.Errorf("the installed agent does not run: %v %s", err, out)
	}
	if out, err := p.run("run", "--rm", "--pull", "never", "--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--entrypoint", "/bin/sh", img.Name, "-c", "true"); err == nil {
		t.Errorf("the image has a shell: %s", out)
	}
}
