// Package stress runs the abuse a hostile or just busy sandbox can put on
// its agent (floods, held connections, churn, malformed frames, upstream
// and namespace deaths, many agents) and reports, for each, the agent's
// memory before, at its peak and after, its goroutines and descriptors,
// and whether legitimate traffic got through meanwhile. `make stress` runs
// the full version; `make test` a short one (MSBTAP_STRESS=short).
package stress

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/msbtap/msbtap/internal/testkit/testenv"
)

func TestMain(m *testing.M) {
	code := m.Run()
	testenv.Cleanup()
	os.Exit(code)
}

// profile is how hard and how long: the short one for CI, the full one for
// make stress.
type profile struct {
	flood, settle time.Duration // each flood; the wait before "after"
	// quiet is the wait before "before": 11 s lets the agent's memory
	// trimmer (every 5 s) see a quiet interval after work, so "before" is
	// a trimmed idle agent; the short run takes a shorter one (its
	// "before" RSS may then be untrimmed: CI checks goroutines and fds).
	quiet         time.Duration
	churn, agents int
}

var profiles = map[string]profile{
	"short": {flood: 4 * time.Second, settle: 11 * time.Second, quiet: 6 * time.Second, churn: 3000, agents: 5},
	"full":  {flood: 15 * time.Second, settle: 60 * time.Second, quiet: 11 * time.Second, churn: 100000, agents: 20},
}

// row is one line of the report.
type row struct {
	name                string
	before, peak, after int // RSS, KiB
	gBefore, gAfter     int
	fdBefore, fdAfter   int
	legit               string
	pass                bool
}

var (
	rowsMu sync.Mutex
	rows   []row
)

func TestStress(t *testing.T) {
	testenv.RequireRoot(t)
	mode := os.Getenv("MSBTAP_STRESS")
	pr, ok := profiles[mode]
	if !ok {
		t.Skip("skipping: set MSBTAP_STRESS=short or full (make stress)")
	}
	for _, c := range []struct {
		name string
		run  func(t *testing.T, w *testenv.World, pr profile) (string, bool)
	}{
		{"SYN flood, one host, ports +1", synOneHost},
		{"SYN flood, random addresses of a /24", synRandom},
		{"4000 held TCP connections to port 53", heldDNS},
		{"UDP flood to many ports", udpFlood},
		{"ICMP echo flood", icmpFlood},
		{"DNS flood, random names", dnsFlood},
		{"malformed frames from the sandbox", garbageFrames},
		{fmt.Sprintf("%d-connection churn", pr.churn), churnConns},
		{"upstream dies mid-transfer", upstreamDeath},
	} {
		t.Run(c.name, func(t *testing.T) { measure(t, c.name, pr, c.run) })
	}
	t.Run("namespace deleted mid-transfer", func(t *testing.T) { nsDeleted(t) })
	t.Run(fmt.Sprintf("%d agents at once", pr.agents), func(t *testing.T) { manyAgents(t, pr) })

	var b strings.Builder
	fmt.Fprintf(&b, "\nmsbtap stress (%s), RSS in MiB:\n\n", mode)
	fmt.Fprintf(&b, "| case | RSS before → peak → after | goroutines before → after | fds before → after | legitimate traffic meanwhile | ok |\n|---|---|---|---|---|---|\n")
	rowsMu.Lock()
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %.1f → %.1f → %.1f | %d → %d | %d → %d | %s | %v |\n", r.name,
			float64(r.before)/1024, float64(r.peak)/1024, float64(r.after)/1024, r.gBefore, r.gAfter, r.fdBefore, r.fdAfter, r.legit, r.pass)
	}
	rowsMu.Unlock()
	fmt.Print(b.String())
	if out := os.Getenv("MSBTAP_STRESS_REPORT"); out != "" {
		os.WriteFile(out, []byte(b.String()), 0o644)
	}
}

// rss returns the process's resident memory in KiB.
func rss(pid int) int { return status(pid, "VmRSS") }

// anon returns the part of it that is the process's own (not pages of its
// executable, which the page cache shares).
func anon(pid int) int { return status(pid, "RssAnon") }

func status(pid int, field string) int {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), field+":"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			return n
		}
	}
	return 0
}

func fds(pid int) int {
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(ents)
}

func goroutines(t *testing.T, w *testenv.World) int {
	out, _ := w.Host.Run("curl", "-sS", "--max-time", "5", "http://127.0.0.1:9464/metrics")
	m := regexp.MustCompile(`(?m)^go_goroutines (\d+)`).FindStringSubmatch(out)
	if m == nil {
		return -1
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// measure runs one abuse case in a world of its own, sampling the agent's
// RSS all along.
func measure(t *testing.T, name string, pr profile, run func(*testing.T, *testenv.World, profile) (string, bool)) {
	w := testenv.NewWorld(t)
	// MSBTAP_STRESS_HEAP=DIR keeps the agent's heap profile, metrics and
	// memory map "before" and "after" in DIR, for each case: what the
	// agent still holds after the abuse.
	heapDir := os.Getenv("MSBTAP_STRESS_HEAP")
	args := []string{"--metrics-addr", "127.0.0.1:9464", "--log-level", "warn"}
	if heapDir != "" {
		args = append(args, "--pprof")
	}
	w.StartAgent(t, args...)
	pid := w.AgentPID()
	// A first round of ordinary traffic, so pools and lazy goroutines exist,
	// then a quiet while: "before" is an idle agent that has served.
	w.Guest.Run("curl", "-sS", "-o", "/dev/null", "http://"+testenv.TestDomain+"/")
	time.Sleep(pr.quiet)
	r := row{name: name, before: rss(pid), gBefore: goroutines(t, w), fdBefore: fds(pid)}
	if heapDir != "" {
		keepProfile(t, w, heapDir, name+" before", pid)
	}
	var peak atomic.Int64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			if v := int64(rss(pid)); v > peak.Load() {
				peak.Store(v)
			}
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()
	r.legit, r.pass = run(t, w, pr)
	close(stop)
	<-sampled
	time.Sleep(pr.settle)
	r.peak, r.after, r.gAfter, r.fdAfter = int(peak.Load()), rss(pid), goroutines(t, w), fds(pid)
	if heapDir != "" {
		keepProfile(t, w, heapDir, name+" after", pid)
	}
	if r.gAfter > r.gBefore+10 || r.fdAfter > r.fdBefore+5 {
		t.Errorf("leak: goroutines %d → %d, fds %d → %d", r.gBefore, r.gAfter, r.fdBefore, r.fdAfter)
		r.pass = false
	}
	if !r.pass {
		t.Errorf("legitimate traffic failed: %s", r.legit)
	}
	rowsMu.Lock()
	rows = append(rows, r)
	rowsMu.Unlock()
}

// background runs a command in the sandbox until it ends; wait returns its
// output.
func background(w *testenv.World, args ...string) (wait func() string) {
	cmd := w.Guest.Command(args...)
	var out testenv.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.Start()
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	return func() string { <-done; return strings.TrimSpace(out.String()) }
}

// keepProfile saves the agent's heap profile, its metrics and its memory
// map in dir, named after the case and the moment.
func keepProfile(t *testing.T, w *testenv.World, dir, name string, pid int) {
	base := filepath.Join(dir, strings.Map(func(r rune) rune {
		if r == ' ' || r == '/' || r == ',' {
			return '_'
		}
		return r
	}, name))
	smaps, _ := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid)) // before the requests fault pages in
	os.WriteFile(base+".smaps", smaps, 0o644)
	for file, path := range map[string]string{base + ".heap": "/debug/pprof/heap", base + ".metrics": "/metrics"} {
		if _, err := w.Host.Run("curl", "-sS", "--max-time", "10", "-o", file, "http://127.0.0.1:9464"+path); err != nil {
			t.Logf("%s: %v", path, err)
		}
	}
}

func secs(d time.Duration) string { return strconv.FormatFloat(d.Seconds(), 'f', 1, 64) }

const download = 20 << 20

// downloadDuring fetches 20 MB from the live test host while the flood runs.
func downloadDuring(t *testing.T, w *testenv.World, pr profile, flood ...string) (string, bool) {
	wait := background(w, flood...)
	time.Sleep(pr.flood / 4)
	start := time.Now()
	out, err := w.Guest.Run("curl", "-sS", "-o", "/dev/null", "--max-time", "60", "-w", "%{size_download}",
		fmt.Sprintf("http://%s/bytes?n=%d", testenv.WebHost4, download))
	took := time.Since(start)
	sent := wait()
	ok := err == nil && strings.TrimSpace(out) == strconv.Itoa(download)
	if !ok {
		return fmt.Sprintf("20 MB download FAILED in %.1f s: %v %q (flood %s)", took.Seconds(), err, strings.TrimSpace(out), sent), false
	}
	return fmt.Sprintf("20 MB download complete in %.1f s (flood %s)", took.Seconds(), sent), ok
}

func synOneHost(t *testing.T, w *testenv.World, pr profile) (string, bool) {
	return downloadDuring(t, w, pr, w.Testhost, "synflood", "--dst", testenv.WebHost4, "--port", "1", "--port-step", "1", "--seconds", secs(pr.flood))
}

func synRandom(t *testing.T, w *testenv.World, pr profile) (string, bool) {
	return downloadDuring(t, w, pr, w.Testhost, "synflood", "--dst", "198.51.100.0/24", "--port", "80", "--seconds", secs(pr.flood))
}

func heldDNS(t *testing.T, w *testenv.World, pr profile) (string, bool) {
	wait := background(w, w.Testhost, "hold", "198.51.100.99:53", "4000", secs(pr.flood))
	time.Sleep(pr.flood / 2)
	out, err := w.Guest.Run("curl", "-sS", "--max-time", "10", "http://"+testenv.TestDomain+"/")
	held := wait()
	ok := err == nil && strings.Contains(out, "hello from testhost")
	return fmt.Sprintf("curl by name %s (held: %s)", map[bool]string{true: "ok", false: "FAILED"}[ok], held), ok
}

func udpFlood(t *testing.T, w *testenv.World, pr profile) (string, bool) {
	wait := background(w, w.Testhost, "udpflood", "--dst", testenv.WebHost4, "--lo", "10000", "--hi", "60000", "--seconds", secs(pr.flood))
	time.Sleep(pr.flood / 2)
	during, err1 := w.Guest.Run(w.Testhost, "udp", testenv.WebHost4+":7002", "during")
	sent := wait()
	start := time.Now()
	after, err2 := w.Guest.Run(w.Testhost, "udp", testenv.WebHost4+":7002", "after")
	ok := err1 == nil && strings.TrimSpace(during) == "during" && err2 == nil && strings.TrimSpace(after) == "after"
	if !ok {
		m, _ := w.Host.Run("curl", "-sS", "--max-time", "5", "http://127.0.0.1:9464/metrics")
		var keep []string
		for _, l := range strings.Split(m, "\n") {
			if !strings.HasPrefix(l, "#") && (strings.Contains(l, "udp") || strings.Contains(l, "drop")) {
				keep = append(keep, l)
			}
		}
		t.Logf("counters:\n%s", strings.Join(keep, "\n"))
		return fmt.Sprintf("new UDP flow FAILED: during the flood %q, after it %q (flood %s)", strings.TrimSpace(during), strings.TrimSpace(after), sent), false
	}
	return fmt.Sprintf("new UDP flow during the flood and %.1f s after it: %v (flood %s)", time.Since(start).Seconds(), ok, sent), ok
}

func icmpFlood(t *testing.T, w *testenv.World, pr profile) (string, bool) {
	wait := background(w, "ping", "-f", "-q", "-w", strconv.Itoa(int(pr.flood.Seconds())), testenv.WebHost4)
	time.Sleep(pr.flood / 4)
	out, _ := w.Guest.Run("ping", "-c", "5", "-i", "0.2", "-W", "2", testenv.Inet4)
	flood := wait()
	m := regexp.MustCompile(`(\d+) received`).FindStringSubmatch(out)
	got := "0"
	if m != nil {
		got = m[1]
	}
	fm := regexp.MustCompile(`(\d+ packets transmitted, \d+ received)`).FindStringSubmatch(flood)
	fl := ""
	if fm != nil {
		fl = fm[1]
	}
	return fmt.Sprintf("ping to another host %s/5 (flood: %s)", got, fl), got == "5"
}

// dnsFlood: legitimate lookups, by a resolver that retries every 250 ms,
// are answered within a second while the sandbox floods random names.
func dnsFlood(t *testing.T, w *testenv.World, pr profile) (string, bool) {
	wait := background(w, w.Testhost, "dnsflood", "--server", "100.96.0.1:53", "--seconds", secs(pr.flood))
	time.Sleep(pr.flood / 4)
	answered, slowest := 0, 0
	for i := 0; i < 5; i++ {
		out, err := w.Guest.Run(w.Testhost, "resolve", testenv.TestDomain, "100.96.0.1:53")
		var ip string
		var ms int
		if _, serr := fmt.Sscan(out, &ip, &ms); err == nil && serr == nil && ip == testenv.WebHost4 {
			answered++
			slowest = max(slowest, ms)
		}
		time.Sleep(200 * time.Millisecond)
	}
	sent := wait()
	return fmt.Sprintf("lookups answered within 1 s: %d/5, slowest %d ms (flood %s)", answered, slowest, sent), answered == 5
}

func garbageFrames(t *testing.T, w *testenv.World, pr profile) (string, bool) {
	return downloadDuring(t, w, pr, w.Testhost, "garbage", "--iface", "eth0", "--seconds", secs(pr.flood))
}

func churnConns(t *testing.T, w *testenv.World, pr profile) (string, bool) {
	// The guest closes first and the agent after it, so each side keeps
	// every connection's port in TIME_WAIT for 60 s: with Linux's 28232
	// default ports, more than 470 connections a second would measure
	// their port ranges (connect: cannot assign requested address), not
	// the agent. These are the test's own namespaces.
	for _, ns := range []*testenv.NS{w.Guest, w.Host} {
		ns.MustRun(t, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535")
	}
	start := time.Now()
	out, _ := w.Guest.Run(w.Testhost, "churn", testenv.WebHost4+":7005", strconv.Itoa(pr.churn), "16")
	took := time.Since(start)
	ok := strings.TrimSpace(out) == fmt.Sprintf("ok=%d failed=0", pr.churn)
	return fmt.Sprintf("%s in %.1f s (%.0f/s)", strings.TrimSpace(out), took.Seconds(), float64(pr.churn)/took.Seconds()), ok
}

// upstreamDeath: the server of a download dies mid-way; the guest sees the
// stream end in an error at once, and the agent serves the next request.
func upstreamDeath(t *testing.T, w *testenv.World, pr profile) (string, bool) {
	ready := filepath.Join(t.TempDir(), "dying-ready")
	srv := w.Inet.Command(w.Testhost, "serve", "--http", testenv.WebHost4+":8090", "--ready", ready)
	srv.Start()
	defer func() { srv.Process.Kill(); srv.Wait() }()
	for i := 0; i < 100; i++ {
		if _, err := os.Stat(ready); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	cmd := w.Guest.Command("curl", "-sS", "-o", "/dev/null", "--limit-rate", "10M", "--max-time", "60",
		"http://"+testenv.WebHost4+":8090/bytes?n=2000000000")
	done := make(chan error, 1)
	cmd.Start()
	go func() { done <- cmd.Wait() }()
	time.Sleep(time.Second)
	srv.Process.Signal(syscall.SIGKILL)
	killed := time.Now()
	var ended time.Duration
	select {
	case err := <-done:
		ended = time.Since(killed)
		if err == nil {
			return "the download completed though its server died", false
		}
	case <-time.After(15 * time.Second):
		cmd.Process.Kill()
		return "the download hung after its server died", false
	}
	out, err := w.Guest.Run("curl", "-sS", "--max-time", "5", "http://"+testenv.WebHost4+"/")
	ok := err == nil && strings.Contains(out, "hello")
	return fmt.Sprintf("guest saw the stream fail %.1f s after the server died; next request ok: %v", ended.Seconds(), ok), ok
}

// nsDeleted: the sandbox's namespace goes away during a transfer; the
// agent exits cleanly and leaves nothing behind.
func nsDeleted(t *testing.T) {
	w := testenv.NewWorld(t)
	ns := testenv.NewNS(t, "del")
	cmd := w.Host.Command(w.Msbtap, "run", "--netns", ns.Name, "--dns-upstream", testenv.DNSHost4)
	out := &testenv.Buffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	for i := 0; i < 200 && !strings.Contains(out.String(), "ready"); i++ {
		time.Sleep(20 * time.Millisecond)
	}
	dl := ns.Command("curl", "-sS", "-o", "/dev/null", "--limit-rate", "5M", "http://"+testenv.WebHost4+"/bytes?n=500000000")
	dl.Start()
	time.Sleep(time.Second)
	dl.Process.Kill()
	dl.Wait()
	start := time.Now()
	exec.Command("ip", "netns", "del", ns.Name).Run()
	var legit string
	pass := false
	select {
	case err := <-done:
		pass = err == nil
		legit = fmt.Sprintf("agent exited %v %.1f s after the namespace went", err, time.Since(start).Seconds())
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		legit = "agent still running 10 s after its namespace went"
	}
	if !pass {
		t.Error(legit)
	}
	rowsMu.Lock()
	rows = append(rows, row{name: "namespace deleted mid-transfer", legit: legit, pass: pass})
	rowsMu.Unlock()
}

// manyAgents starts n agents at once in one host namespace, one sandbox
// each, checks every sandbox gets out, and measures their idle memory.
func manyAgents(t *testing.T, pr profile) {
	w := testenv.NewWorld(t)
	type agent struct {
		ns  *testenv.NS
		cmd *exec.Cmd
	}
	agents := make([]agent, pr.agents)
	var wg sync.WaitGroup
	for i := range agents {
		ns := testenv.NewNS(t, "m")
		etc := filepath.Join("/etc/netns", ns.Name)
		os.MkdirAll(etc, 0o755)
		t.Cleanup(func() { os.RemoveAll(etc) })
		gw := fmt.Sprintf("100.96.0.%d", (i+1)*4+1)
		os.WriteFile(filepath.Join(etc, "resolv.conf"), []byte("nameserver "+gw+"\n"), 0o644)
		cmd := w.Host.Command(w.Msbtap, "run", "--netns", ns.Name, "--slot", strconv.Itoa(i+1), "--dns-upstream", testenv.DNSHost4, "--log-level", "warn")
		agents[i] = agent{ns, cmd}
		wg.Add(1)
		go func() { defer wg.Done(); cmd.Start() }()
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, a := range agents {
			a.cmd.Process.Signal(syscall.SIGTERM)
			a.cmd.Wait()
		}
	})
	okCount := 0
	for _, a := range agents {
		var err error
		for try := 0; try < 50; try++ {
			if _, err = a.ns.Run("curl", "-sS", "--max-time", "5", "http://"+testenv.TestDomain+"/"); err == nil {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err == nil {
			okCount++
		}
	}
	time.Sleep(pr.settle)
	total, most, totalAnon := 0, 0, 0
	for _, a := range agents {
		r := rss(a.cmd.Process.Pid)
		total += r
		totalAnon += anon(a.cmd.Process.Pid)
		most = max(most, r)
	}
	avg := total / len(agents)
	pass := okCount == len(agents)
	legit := fmt.Sprintf("%d/%d sandboxes reached the test host; idle RSS %.1f MiB on average (%.1f of it the agent's own, the rest its executable's pages), %.1f at most",
		okCount, len(agents), float64(avg)/1024, float64(totalAnon/len(agents))/1024, float64(most)/1024)
	if !pass {
		t.Error(legit)
	}
	rowsMu.Lock()
	rows = append(rows, row{name: fmt.Sprintf("%d agents at once", len(agents)), after: avg, legit: legit, pass: pass})
	rowsMu.Unlock()
}
