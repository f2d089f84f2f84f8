package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

type result struct {
	upload, download, rr, crr float64 // Gbit/s, Gbit/s, per second, per second
	p50, p99                  float64 // one 1-byte exchange, µs
	cpuPerGB                  float64
	// cpuPerRR and cpuPerCRR are the backend's CPU time (user and system,
	// every process of it) per rr transaction and per crr connection, µs;
	// -1 where there is no backend process (the kernel path).
	cpuPerRR, cpuPerCRR float64
	resources           map[string]float64
}

// ports are the servers' ports of one measurement. Every backend and round
// gets its own: a crr run leaves thousands of TIME_WAIT sockets toward its
// server, and once the ephemeral ports toward one address and port are used
// up connect() scans the range, which would make the backend measured next
// pay for the one before.
type ports struct{ echo, hold, iperf int }

var seq int

// world is one backend's namespaces: the sandbox, the "host" where the
// backend runs, and the "internet" with the servers.
type world struct {
	sandbox, host, inet string
	procs               []*exec.Cmd
	links               []string
	ports               ports
	nServers            int // w.procs[nServers:] are the backend's
}

func ns(name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", name}, args...)...)
}

func must(cmd *exec.Cmd) {
	if out, err := cmd.CombinedOutput(); err != nil {
		panic(fmt.Sprintf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, out))
	}
}

func newWorld(pt ports) *world {
	seq++
	id := fmt.Sprintf("%d%d", os.Getpid()%10000, seq)
	w := &world{sandbox: "bps" + id, host: "bph" + id, inet: "bpi" + id, ports: pt}
	for _, n := range []string{w.sandbox, w.host, w.inet} {
		must(exec.Command("ip", "netns", "add", n))
		must(ns(n, "ip", "link", "set", "lo", "up"))
	}
	a, b := "bpa"+id, "bpb"+id
	must(exec.Command("ip", "link", "add", a, "type", "veth", "peer", "name", b))
	must(exec.Command("ip", "link", "set", a, "netns", w.host, "name", "up0"))
	must(exec.Command("ip", "link", "set", b, "netns", w.inet, "name", "eth0"))
	must(ns(w.host, "ip", "addr", "add", hostAddr+"/24", "dev", "up0"))
	must(ns(w.host, "ip", "link", "set", "up0", "mtu", "65520", "up"))
	must(ns(w.inet, "ip", "addr", "add", inetAddr+"/24", "dev", "eth0"))
	must(ns(w.inet, "ip", "addr", "add", serverIP+"/24", "dev", "eth0"))
	must(ns(w.inet, "ip", "link", "set", "eth0", "mtu", "65520", "up"))
	// The "host" needs a default route for pasta to copy; inside these
	// private namespaces it leads only to the test internet.
	must(ns(w.host, "ip", "route", "add", "default", "via", inetAddr))
	must(ns(w.inet, "ip", "route", "add", kernelNet+".0/24", "via", hostAddr))
	w.start(w.inet, "iperf3", "-s", "-p", strconv.Itoa(pt.iperf))
	w.start(w.inet, testhostBin, "serve", "--echo", w.addr(pt.echo), "--halfclose", w.addr(pt.hold))
	w.nServers = len(w.procs)
	time.Sleep(300 * time.Millisecond)
	return w
}

func (w *world) addr(port int) string { return serverIP + ":" + strconv.Itoa(port) }

func (w *world) start(n string, args ...string) *exec.Cmd {
	c := ns(n, args...)
	if err := c.Start(); err != nil {
		panic(err)
	}
	w.procs = append(w.procs, c)
	return c
}

func (w *world) close() {
	for i := len(w.procs) - 1; i >= 0; i-- {
		p := w.procs[i]
		p.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { p.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(3 * time.Second):
			p.Process.Kill()
			<-done
		}
	}
	for _, n := range []string{w.sandbox, w.host, w.inet} {
		out, _ := exec.Command("ip", "netns", "pids", n).Output()
		for _, pid := range strings.Fields(string(out)) {
			exec.Command("kill", "-KILL", pid).Run()
		}
		exec.Command("ip", "netns", "del", n).Run()
	}
}

// attach gives the sandbox its path to the internet through backend b and
// returns the backend's process (nil for the kernel path).
func (w *world) attach(b string, mtu int) (*exec.Cmd, error) {
	switch b {
	case "kernel":
		id := strings.TrimPrefix(w.sandbox, "bps")
		a, c := "bpk"+id, "bpl"+id
		must(exec.Command("ip", "link", "add", a, "type", "veth", "peer", "name", c))
		must(exec.Command("ip", "link", "set", a, "netns", w.sandbox, "name", "eth0"))
		must(exec.Command("ip", "link", "set", c, "netns", w.host, "name", "sb0"))
		must(ns(w.sandbox, "ip", "addr", "add", kernelNet+".2/24", "dev", "eth0"))
		must(ns(w.sandbox, "ip", "link", "set", "eth0", "mtu", strconv.Itoa(mtu), "up"))
		must(ns(w.host, "ip", "addr", "add", kernelNet+".1/24", "dev", "sb0"))
		must(ns(w.host, "ip", "link", "set", "sb0", "mtu", strconv.Itoa(mtu), "up"))
		must(ns(w.sandbox, "ip", "route", "add", "default", "via", kernelNet+".1"))
		must(ns(w.host, "sysctl", "-qw", "net.ipv4.ip_forward=1"))
		return nil, nil
	case "slirp4netns":
		p := w.start(w.host, "slirp4netns", "--configure", "--mtu="+strconv.Itoa(mtu), "--disable-host-loopback",
			"--netns-type=path", "/run/netns/"+w.sandbox, "tap0")
		return p, waitLink(w.sandbox, "tap0")
	case "pasta":
		p := w.start(w.host, "pasta", "--config-net", "--runas", "0:0", "-m", strconv.Itoa(mtu), "-f", "-q",
			"--netns", "/run/netns/"+w.sandbox)
		return p, waitRoute(w.sandbox)
	case "gvproxy":
		// gvproxy's default plan: the sandbox is 192.168.127.2/24 behind
		// 192.168.127.1; its guest-side forwarder moves the frames of a
		// TAP we make over a Unix socket to gvproxy on the host side.
		if _, err := os.Stat(gvproxyBin); err != nil {
			return nil, fmt.Errorf("gvproxy not built (make bench-peers builds it): %v", err)
		}
		sock := fmt.Sprintf("/tmp/%s-gvproxy.sock", w.sandbox)
		os.Remove(sock)
		p := w.start(w.host, gvproxyBin, "-listen", "unix://"+sock, "-mtu", strconv.Itoa(mtu))
		must(ns(w.sandbox, "ip", "tuntap", "add", "tap0", "mode", "tap"))
		must(ns(w.sandbox, "ip", "link", "set", "tap0", "address", "5a:94:ef:e4:0c:ee", "mtu", strconv.Itoa(mtu), "up"))
		must(ns(w.sandbox, "ip", "addr", "add", "192.168.127.2/24", "dev", "tap0"))
		must(ns(w.sandbox, "ip", "route", "add", "default", "via", "192.168.127.1"))
		for i := 0; i < 100; i++ {
			if _, err := os.Stat(sock); err == nil {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		w.start(w.sandbox, gvforwarderBin, "-preexisting", "-iface", "tap0", "-url", "unix://"+sock, "-mtu", strconv.Itoa(mtu), "-stop-if-exist", "")
		for i := 0; i < 100; i++ {
			if ns(w.sandbox, "ping", "-c", "1", "-W", "1", "192.168.127.1").Run() == nil {
				return p, nil
			}
			time.Sleep(100 * time.Millisecond)
		}
		return p, fmt.Errorf("gvproxy's gateway never answered")
	case "msbtap", "msbtap-fast", "msbtap-b", "msbtap-fast-b":
		args := []string{"run", "--netns", w.sandbox, "--policy", "allow-all", "--mtu", strconv.Itoa(mtu), "--log-level", "warn"}
		if strings.HasPrefix(b, "msbtap-fast") { // the TCP fast path (issue 27)
			args = append(args, "--fast-path", "on")
		}
		if profileDir != "" {
			args = append(args, "--metrics-addr", profileAddr, "--pprof")
		}
		bin := msbtapBin
		if strings.HasSuffix(b, "-b") {
			if compareBin == "" {
				return nil, fmt.Errorf("%s needs -compare BINARY", b)
			}
			bin = compareBin
		}
		p := w.start(w.host, append([]string{bin}, args...)...)
		return p, waitLink(w.sandbox, "eth0")
	}
	return nil, fmt.Errorf("unknown backend %q", b)
}

func waitLink(n, link string) error {
	for i := 0; i < 100; i++ {
		if out, err := ns(n, "ip", "-o", "addr", "show", "dev", link).Output(); err == nil && strings.Contains(string(out), "inet ") {
			time.Sleep(200 * time.Millisecond)
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%s never came up in %s", link, n)
}

func waitRoute(n string) error {
	for i := 0; i < 100; i++ {
		if out, err := ns(n, "ip", "route").Output(); err == nil && strings.Contains(string(out), "default") {
			time.Sleep(200 * time.Millisecond)
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("no default route in %s", n)
}

func measure(b string, mtu int, pt ports, resources bool) (r result, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("%v", p)
		}
	}()
	w := newWorld(pt)
	defer w.close()
	proc, err := w.attach(b, mtu)
	if err != nil {
		return r, err
	}
	pid := 0
	if strings.HasPrefix(b, "msbtap") && proc != nil {
		pid = proc.Process.Pid
	}
	var backendPIDs []int
	for _, p := range w.procs[w.nServers:] {
		backendPIDs = append(backendPIDs, p.Process.Pid)
	}
	if resources && pid > 0 {
		// Memory first, before throughput runs leave buffers behind.
		time.Sleep(time.Second)
		r.resources = map[string]float64{}
		idle := rssKiB(pid)
		hold := ns(w.sandbox, testhostBin, "hold", w.addr(pt.hold), "1000", "6")
		if err := hold.Start(); err != nil {
			return r, err
		}
		time.Sleep(4 * time.Second)
		held := rssKiB(pid)
		hold.Wait()
		r.resources["rss_idle_kib"] = idle
		r.resources["rss_1000_idle_conns_kib"] = held
		r.resources["rss_per_idle_conn_kib"] = (held - idle) / 1000
	}
	if skipThroughput {
		r.upload, r.download, r.cpuPerGB = -1, -1, -1
		return latency(w, b, mtu, pt, backendPIDs, r)
	}
	cpu0 := cpuSeconds(pid)
	var bytes float64
	stopProfile := w.profile(b, "upload", mtu)
	r.upload, bytes, err = iperf(w.sandbox, pt.iperf, false)
	stopProfile()
	if err != nil {
		return r, err
	}
	var bytes2 float64
	stopProfile = w.profile(b, "download", mtu)
	r.download, bytes2, err = iperf(w.sandbox, pt.iperf, true)
	stopProfile()
	if err != nil {
		return r, err
	}
	if pid > 0 && bytes+bytes2 > 0 {
		r.cpuPerGB = (cpuSeconds(pid) - cpu0) / ((bytes + bytes2) / 1e9)
	}
	return latency(w, b, mtu, pt, backendPIDs, r)
}

// latency measures rr (rate, p50, p99) and crr, with the backend's CPU per
// transaction and per connection.
func latency(w *world, b string, mtu int, pt ports, backendPIDs []int, r result) (result, error) {
	r.cpuPerRR, r.cpuPerCRR = -1, -1
	stopProfile := w.profile(b, "rr", mtu)
	c0, t0 := treeCPUSeconds(backendPIDs), time.Now()
	out, err := ns(w.sandbox, testhostBin, "rr", w.addr(pt.echo), strconv.Itoa(seconds), "latency").CombinedOutput()
	c1, t1 := treeCPUSeconds(backendPIDs), time.Now()
	stopProfile()
	if _, serr := fmt.Sscan(string(out), &r.rr, &r.p50, &r.p99); err != nil || serr != nil {
		return r, fmt.Errorf("rr: %v %v %s", err, serr, out)
	}
	if len(backendPIDs) > 0 && r.rr > 0 {
		// The transactions of the run: its rate over the wall time it
		// took (the client's own figure covers a little less: its start).
		r.cpuPerRR = (c1 - c0) / (r.rr * t1.Sub(t0).Seconds()) * 1e6
	}
	stopProfile = w.profile(b, "crr", mtu)
	c0, t0 = treeCPUSeconds(backendPIDs), time.Now()
	r.crr, err = number(ns(w.sandbox, testhostBin, "crr", w.addr(pt.echo), strconv.Itoa(seconds)))
	c1, t1 = treeCPUSeconds(backendPIDs), time.Now()
	stopProfile()
	if err != nil {
		return r, fmt.Errorf("crr: %w", err)
	}
	if len(backendPIDs) > 0 && r.crr > 0 {
		r.cpuPerCRR = (c1 - c0) / (r.crr * t1.Sub(t0).Seconds()) * 1e6
	}
	return r, nil
}

// treeCPUSeconds is the CPU time of the processes pids and all their
// descendants (msbtap's sandbox helpers, say).
func treeCPUSeconds(pids []int) float64 {
	if len(pids) == 0 {
		return 0
	}
	children := map[int][]int{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if pp := ppid(pid); pp > 0 {
			children[pp] = append(children[pp], pid)
		}
	}
	total := 0.0
	seen := map[int]bool{}
	for todo := append([]int(nil), pids...); len(todo) > 0; {
		p := todo[len(todo)-1]
		todo = todo[:len(todo)-1]
		if seen[p] {
			continue
		}
		seen[p] = true
		total += cpuSeconds(p)
		todo = append(todo, children[p]...)
	}
	return total
}

func statFields(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 > len(s) {
		return nil
	}
	return strings.Fields(s[i+2:])
}

func ppid(pid int) int {
	f := statFields(pid)
	if len(f) < 2 {
		return 0
	}
	n, _ := strconv.Atoi(f[1])
	return n
}

// profileDir (-profile DIR) keeps CPU profiles of msbtap and msbtap-fast
// during each run: DIR/msbtap-fast-crr-1500-PORT.pprof and so on, read
// with go tool pprof bin/msbtap FILE.
var profileDir string

const profileAddr = "127.0.0.1:9465"

// profile starts a CPU profile of msbtap for the run that follows, a
// second shorter than it; the returned func waits for the file.
func (w *world) profile(b, metric string, mtu int) (wait func()) {
	if profileDir == "" || !strings.HasPrefix(b, "msbtap") {
		return func() {}
	}
	file := filepath.Join(profileDir, fmt.Sprintf("%s-%s-%d-%d.pprof", b, metric, mtu, w.ports.echo))
	url := fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", profileAddr, max(seconds-1, 1))
	c := ns(w.host, "curl", "-sS", "-o", file, url)
	if err := c.Start(); err != nil {
		log.Printf("profile: %v", err)
		return func() {}
	}
	return func() {
		if err := c.Wait(); err != nil {
			log.Printf("profile %s: %v", file, err)
		}
	}
}

func iperf(sandbox string, port int, reverse bool) (gbps, bytes float64, err error) {
	args := []string{"iperf3", "-c", serverIP, "-p", strconv.Itoa(port), "-t", strconv.Itoa(seconds), "-J"}
	if reverse {
		args = append(args, "-R")
	}
	out, err := ns(sandbox, args...).Output()
	var j struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
				Bytes         float64 `json:"bytes"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	if jerr := json.Unmarshal(out, &j); jerr != nil || j.Error != "" {
		return 0, 0, fmt.Errorf("iperf3 %v: %v %s", args[1:], err, j.Error)
	}
	return j.End.SumReceived.BitsPerSecond / 1e9, j.End.SumReceived.Bytes, nil
}

func number(c *exec.Cmd) (float64, error) {
	out, err := c.CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("%v: %s", err, out)
	}
	return strconv.ParseFloat(strings.TrimSpace(string(out)), 64)
}

func cpuSeconds(pid int) float64 {
	if pid == 0 {
		return 0
	}
	f := statFields(pid)
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100 // USER_HZ
}

func rssKiB(pid int) float64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			n, _ := strconv.ParseFloat(strings.Fields(v)[0], 64)
			return n
		}
	}
	return 0
}
