package integration

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/msbtap/msbtap/internal/testkit/testenv"
)

// ctl runs `msbtap ctl --control sock ARGS…` on the host and returns its
// output.
func ctl(t *testing.T, w *testenv.World, sock string, args ...string) (string, error) {
	t.Helper()
	out, err := exec.Command(w.Msbtap, append([]string{"ctl", "--control", sock}, args...)...).CombinedOutput()
	return string(out), err
}

func mustCtl(t *testing.T, w *testenv.World, sock string, args ...string) string {
	t.Helper()
	out, err := ctl(t, w, sock, args...)
	if err != nil {
		t.Fatalf("msbtap ctl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

type flowRow struct {
	ID        uint64  `json:"id"`
	Proto     string  `json:"proto"`
	Src       string  `json:"src"`
	Dst       string  `json:"dst"`
	Domain    string  `json:"domain"`
	Rule      int     `json:"rule"`
	BytesUp   uint64  `json:"bytes_up"`
	BytesDown uint64  `json:"bytes_down"`
	AgeSecs   float64 `json:"age_seconds"`
}

// flowTo returns the open TCP flow to dst, if any.
func flowTo(t *testing.T, w *testenv.World, sock, dst string) (flowRow, bool) {
	t.Helper()
	var fs []flowRow
	if err := json.Unmarshal([]byte(mustCtl(t, w, sock, "flows", "--json")), &fs); err != nil {
		t.Fatal(err)
	}
	for _, f := range fs {
		if f.Proto == "tcp" && f.Dst == dst {
			return f, true
		}
	}
	return flowRow{}, false
}

// startDownload starts a slow download (the server sends about 1.6 MB/s)
// in the sandbox; done yields its exit once it ends.
func startDownload(t *testing.T, w *testenv.World, url string, size int) (*testenv.Buffer, <-chan error) {
	t.Helper()
	return startCmd(t, w.Guest.Command("curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}\n",
		url+"/drip?n="+strconv.Itoa(size)))
}

// openDir makes a directory everyone may walk (t.TempDir's are root's
// alone), with mode perm; cleanup removes it.
func openDir(t *testing.T, perm os.FileMode) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "msbtap-ctl-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, perm); err != nil {
		t.Fatal(err)
	}
	return dir
}

// controlSocket is a path for a control socket in a directory others may
// walk: the socket's own mode must keep them out.
func controlSocket(t *testing.T) string {
	return filepath.Join(openDir(t, 0o755), "ctl.sock")
}

// TestCtlFlowsAndClose: `ctl flows` lists a running download with growing
// byte counts; `flows close` ends it, and the sandbox sees a reset.
func TestCtlFlowsAndClose(t *testing.T) {
	testenv.RequireTools(t, "curl")
	w := testenv.NewWorld(t)
	sock := controlSocket(t)
	w.StartAgent(t, "--control", sock)

	out, done := startDownload(t, w, "http://"+testenv.WebHost4, 200<<20)
	dst := testenv.WebHost4 + ":80"
	var first flowRow
	waitFor(t, 10*time.Second, "the download in ctl flows", func() bool {
		f, ok := flowTo(t, w, sock, dst)
		first = f
		return ok && f.BytesDown > 0
	})
	time.Sleep(500 * time.Millisecond)
	second, ok := flowTo(t, w, sock, dst)
	if !ok || second.ID != first.ID || second.BytesDown <= first.BytesDown || second.BytesUp == 0 {
		t.Fatalf("flow did not grow: %+v then %+v", first, second)
	}
	if !strings.HasPrefix(second.Src, "100.96.0.2:") || second.AgeSecs <= 0 {
		t.Errorf("flow row %+v", second)
	}
	table := mustCtl(t, w, sock, "flows")
	if !strings.Contains(table, strconv.FormatUint(first.ID, 10)) || !strings.Contains(table, dst) {
		t.Errorf("ctl flows table lacks the flow:\n%s", table)
	}

	mustCtl(t, w, sock, "flows", "close", strconv.FormatUint(first.ID, 10))
	select {
	case err := <-done:
		if err == nil || !strings.Contains(out.String(), "reset") {
			t.Errorf("curl after flows close: %v %q, want a reset", err, out.String())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the download went on after flows close")
	}
	if _, ok := flowTo(t, w, sock, dst); ok {
		t.Error("the closed flow is still listed")
	}
	if out, err := ctl(t, w, sock, "flows", "close", "999999"); err == nil || !strings.Contains(out, "no open flow") {
		t.Errorf("closing a flow that is not open: %v %s", err, out)
	}
}

// TestCtlPolicyRevoke: `policy set --revoke` resets an open flow the new
// policy denies and leaves an allowed one running to its end; a bad policy
// is refused with the reason and the old one stays.
func TestCtlPolicyRevoke(t *testing.T) {
	testenv.RequireTools(t, "curl")
	w := testenv.NewWorld(t)
	sock := controlSocket(t)
	w.StartAgent(t, "--control", sock)

	keepOut, keepDone := startDownload(t, w, "http://"+testenv.WebHost4, 3<<20)
	cutOut, cutDone := startDownload(t, w, "http://["+testenv.WebHost6+"]", 200<<20)
	waitFor(t, 10*time.Second, "both downloads in ctl flows", func() bool {
		_, a := flowTo(t, w, sock, testenv.WebHost4+":80")
		_, b := flowTo(t, w, sock, "["+testenv.WebHost6+"]:80")
		return a && b
	})

	bad := writePolicy(t, `{"default_action": "deny", "rules": [{"destination": {"cidr": "198.51.100.0/33"}, "action": "allow"}]}`)
	if out, err := ctl(t, w, sock, "policy", "set", "--revoke", bad); err == nil || !strings.Contains(out, "198.51.100.0/33") {
		t.Errorf("a bad policy: %v %s", err, out)
	}
	if _, ok := flowTo(t, w, sock, "["+testenv.WebHost6+"]:80"); !ok {
		t.Fatal("a refused policy cut a flow")
	}

	pol := writePolicy(t, `{"default_action": "deny", "rules": [{"destination": {"cidr": "`+testenv.WebHost4+`/32"}, "protocols": ["tcp"], "action": "allow"}]}`)
	out := mustCtl(t, w, sock, "policy", "set", "--revoke", pol)
	if !strings.Contains(out, "1 open flows revoked") {
		t.Errorf("policy set said %q", out)
	}
	select {
	case err := <-cutDone:
		if err == nil || !strings.Contains(cutOut.String(), "reset") {
			t.Errorf("the denied download: %v %q, want a reset", err, cutOut.String())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the download the new policy denies went on")
	}
	select {
	case err := <-keepDone:
		if err != nil || strings.TrimSpace(keepOut.String()) != strconv.Itoa(3<<20) {
			t.Errorf("the allowed download: %v %q, want all %d bytes", err, keepOut.String(), 3<<20)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the allowed download did not finish")
	}
	got := mustCtl(t, w, sock, "policy", "get")
	if !strings.Contains(got, testenv.WebHost4+"/32") || !strings.Contains(got, `"deny"`) {
		t.Errorf("policy get: %s", got)
	}
	// New flows follow the new policy.
	if ok, out := reach(t, w, "tcp", "["+testenv.WebHost6+"]:80"); ok {
		t.Errorf("a new flow the new policy denies got through: %s", out)
	}
}

// TestCtlEventsPromptly: a denial shows on `ctl events` within 100 ms of
// the decision, with the flow id the audit log and ctl flows use.
func TestCtlEventsPromptly(t *testing.T) {
	w := testenv.NewWorld(t)
	sock := controlSocket(t)
	w.StartAgent(t, "--control", sock) // public-only: the private host is denied

	cmd := exec.Command(w.Msbtap, "ctl", "--control", sock, "events")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() }()
	type event struct {
		rec map[string]any
		at  time.Time
	}
	events := make(chan event, 64)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var r map[string]any
			if json.Unmarshal(sc.Bytes(), &r) == nil {
				events <- event{r, time.Now()}
			}
		}
		close(events)
	}()
	// The stream may not be up for the first denial: deny again, each time
	// to a new address (the log folds repeats to one address into a line
	// at the end of its window), until one shows.
	for i := 0; i < 20; i++ {
		dst := "10.77.0." + strconv.Itoa(100+i) + ":80"
		reach(t, w, "tcp", dst)
		wait := time.After(time.Second)
	next:
		for {
			select {
			case ev := <-events:
				if ev.rec["action"] != "deny" || ev.rec["dst"] != dst || ev.rec["repeats"] != nil {
					continue
				}
				at, err := time.Parse(time.RFC3339Nano, ev.rec["time"].(string))
				if err != nil {
					t.Fatal(err)
				}
				if lag := ev.at.Sub(at); lag > 100*time.Millisecond {
					t.Errorf("the denial reached ctl events %s after the decision, want < 100ms", lag)
				}
				if id, _ := ev.rec["flow_id"].(float64); id == 0 {
					t.Errorf("event without a flow id: %v", ev.rec)
				}
				return
			case <-wait:
				break next
			}
		}
	}
	t.Fatal("no denial on ctl events")
}

// TestCtlSocketPrivate: the socket is refused to another user (by its
// mode, and by the peer check even when the mode is opened up), and the
// sandbox reaches it neither over the network nor through the file system.
func TestCtlSocketPrivate(t *testing.T) {
	testenv.RequireTools(t, "curl", "setpriv", "ss")
	w := testenv.NewWorld(t)
	sock := controlSocket(t)
	w.StartAgent(t, "--control", sock, "--policy", "allow-all")

	st, err := os.Lstat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != 0o600 || st.Sys().(*syscall.Stat_t).Uid != 0 {
		t.Fatalf("socket %v owned by %d, want a root-owned socket with mode 0600", st.Mode(), st.Sys().(*syscall.Stat_t).Uid)
	}
	asNobody := func() (string, error) {
		out, err := exec.Command("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
			"curl", "-sS", "--max-time", "5", "--unix-socket", sock, "http://msbtap/v1/flows").CombinedOutput()
		return string(out), err
	}
	if out, err := asNobody(); err == nil || !strings.Contains(out, "(7)") {
		t.Errorf("another user: %v %q, want curl's failure to connect", err, out)
	}
	// Opened up by mistake, the socket still refuses the other user.
	os.Chmod(sock, 0o666)
	if out, err := asNobody(); err == nil || strings.Contains(out, "[") {
		t.Errorf("another user through a mode-0666 socket: %v %q, want the connection closed", err, out)
	}
	if !strings.Contains(w.AgentLog.String(), "uid 65534 is neither root nor the socket's owner") {
		t.Error("the agent did not log the refused peer")
	}
	// Root, for comparison, gets an answer.
	if out := mustCtl(t, w, sock, "flows", "--json"); !strings.HasPrefix(strings.TrimSpace(out), "[") {
		t.Errorf("root: %q", out)
	}

	// Over the network: the agent listens on no TCP or UDP port at all
	// (the API is the Unix socket only), and the gateway answers nothing
	// on a web port, under a policy that allows everything.
	ss := w.Host.MustRun(t, "ss", "-Htulnp")
	if strings.Contains(ss, "pid="+strconv.Itoa(w.AgentPID())+",") {
		t.Errorf("msbtap listens on a network port:\n%s", ss)
	}
	for _, gw := range []string{"100.96.0.1", "[fd42:6d73:62::1]"} {
		out, err := w.Guest.Run("curl", "-sS", "--max-time", "3", "http://"+gw+"/v1/flows")
		if err == nil || strings.Contains(out, "flow") {
			t.Errorf("the sandbox reached %s: %v %q", gw, err, out)
		}
	}
}

// TestCtlSocketHiddenFromCommand: a -- COMMAND running as the socket's
// owner finds nothing at the socket's path, and even through a second path
// (a hard link) the agent refuses it: it runs inside the sandbox.
func TestCtlSocketHiddenFromCommand(t *testing.T) {
	testenv.RequireTools(t, "curl")
	w := testenv.NewWorld(t)
	sock := controlSocket(t)
	link := filepath.Join(filepath.Dir(sock), "link.sock")
	script := `curl -sS --max-time 5 --unix-socket ` + sock + ` http://msbtap/v1/flows; echo " direct=$?"
		while [ ! -S ` + link + ` ]; do sleep 0.05; done
		curl -sS --max-time 5 --unix-socket ` + link + ` http://msbtap/v1/flows; echo " link=$?"`
	cmd := w.Host.Command(w.Msbtap, "run", "--dns-upstream", testenv.DNSHost4, "--control", sock,
		"--control-owner", "nobody", "--user", "nobody", "--bind", filepath.Dir(sock), "--", "sh", "-c", script)
	out, done := startCmd(t, cmd)
	waitFor(t, 10*time.Second, "the control socket", func() bool {
		st, err := os.Lstat(sock)
		return err == nil && st.Mode()&os.ModeSocket != 0
	})
	if err := os.Link(sock, link); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatalf("the command did not end:\n%s", out.String())
	}
	got := out.String()
	if strings.Contains(got, `"id"`) || strings.Contains(got, "direct=0") || strings.Contains(got, "link=0") ||
		!strings.Contains(got, "direct=7") || !strings.Contains(got, "pid") || !strings.Contains(got, "runs inside the sandbox") {
		t.Errorf("the sandbox's command reached the control socket, or was not refused for the right reason:\n%s", got)
	}
}

// pcapHasSYN reports whether the capture holds a SYN from the guest to dst
// (tcpdump's reading of the file).
func pcapHasSYN(t *testing.T, file, dstIP, dstPort string) bool {
	t.Helper()
	out, err := exec.Command("tcpdump", "-nn", "-r", file, "tcp and dst host "+dstIP+" and dst port "+dstPort).CombinedOutput()
	if err != nil {
		t.Fatalf("tcpdump -r %s: %v\n%s", file, err, out)
	}
	for _, l := range strings.Split(string(out), "\n") {
		guest := strings.Contains(l, " 100.96.0.2.") || strings.Contains(l, " fd42:6d73:62::2.")
		if guest && strings.Contains(l, dstIP+"."+dstPort+": Flags [S],") {
			return true
		}
	}
	t.Logf("tcpdump -r %s:\n%s", file, out)
	return false
}

// TestPcap: --pcap captures from the start, and ctl pcap start|stop at run
// time, both into files tcpdump reads that hold the SYN of a test flow. A
// capture ctl starts is written into a file the client created, as itself.
func TestPcap(t *testing.T) {
	testenv.RequireTools(t, "curl", "tcpdump", "setpriv")
	w := testenv.NewWorld(t)
	sock := controlSocket(t)
	dir := openDir(t, 0o777)
	startFile := filepath.Join(dir, "start.pcap")
	w.StartAgent(t, "--control", sock, "--control-owner", "nobody", "--pcap", startFile)

	w.Guest.MustRun(t, "curl", "-sS", "--max-time", "10", "http://"+testenv.WebHost4+"/")
	asNobody := func(args ...string) string {
		out, err := exec.Command("setpriv", append([]string{"--reuid", "65534", "--regid", "65534", "--clear-groups", w.Msbtap, "ctl", "--control", sock}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("msbtap ctl %v as nobody: %v\n%s", args, err, out)
		}
		return string(out)
	}
	if out := asNobody("pcap", "stop"); !strings.Contains(out, startFile) {
		t.Errorf("pcap stop: %s", out)
	}
	if !pcapHasSYN(t, startFile, testenv.WebHost4, "80") {
		t.Error("the --pcap file lacks the SYN to the web host")
	}

	runFile := filepath.Join(dir, "run.pcap")
	asNobody("pcap", "start", runFile)
	if out, err := ctl(t, w, sock, "pcap", "start", filepath.Join(dir, "second.pcap")); err == nil || !strings.Contains(out, "already capturing") {
		t.Errorf("a second capture: %v %s", err, out)
	}
	w.Guest.MustRun(t, "curl", "-sS", "--max-time", "10", "http://["+testenv.WebHost6+"]/")
	var info struct {
		File    string `json:"file"`
		Written uint64 `json:"frames_written"`
	}
	if err := json.Unmarshal([]byte(asNobody("pcap", "stop")), &info); err != nil || info.File != runFile || info.Written == 0 {
		t.Errorf("pcap stop: %+v %v", info, err)
	}
	st, err := os.Stat(runFile)
	if err != nil {
		t.Fatal(err)
	}
	if uid := st.Sys().(*syscall.Stat_t).Uid; uid != 65534 {
		t.Errorf("the capture file ctl asked for is owned by %d, want its client (65534)", uid)
	}
	if !pcapHasSYN(t, runFile, testenv.WebHost6, "80") {
		t.Error("the ctl pcap file lacks the SYN to the web host")
	}
}

// iperf runs iperf3 in the sandbox against the test internet's server for
// secs seconds (reverse: the sandbox receives) and returns the rate the
// receiver saw, in Mbit/s.
func iperf(t *testing.T, w *testenv.World, reverse bool, secs int) float64 {
	t.Helper()
	args := []string{"iperf3", "-c", testenv.WebHost4, "-p", "5201", "-t", strconv.Itoa(secs), "-O", "1", "-J"}
	if reverse {
		args = append(args, "-R")
	}
	// The server may still be draining the last test (a paced upload ends
	// at the client before the server has it all): try again.
	for try := 0; ; try++ {
		out, err := w.Guest.Run(args...)
		var r struct {
			End struct {
				SumReceived struct {
					BitsPerSecond float64 `json:"bits_per_second"`
				} `json:"sum_received"`
			} `json:"end"`
			Error string `json:"error"`
		}
		jerr := json.Unmarshal([]byte(out), &r)
		if strings.Contains(r.Error, "busy") && try < 10 {
			time.Sleep(500 * time.Millisecond)
			continue
		}
		if err != nil || jerr != nil || r.End.SumReceived.BitsPerSecond == 0 {
			t.Fatalf("iperf3: %v %v\n%s", err, jerr, out)
		}
		return r.End.SumReceived.BitsPerSecond / 1e6
	}
}

// nstat sums TCP counters of ns.
func nstat(t *testing.T, ns *testenv.NS, names ...string) (int, string) {
	t.Helper()
	out := ns.MustRun(t, append([]string{"nstat", "-az"}, names...)...)
	n := 0
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) >= 2 {
			v, _ := strconv.Atoi(f[1])
			n += v
		}
	}
	return n, out
}

// stat returns one sample of `ctl stats` (0 when missing).
func stat(t *testing.T, w *testenv.World, sock, name, label, value string) float64 {
	t.Helper()
	var st map[string][]struct {
		Labels map[string]string `json:"labels"`
		Value  float64           `json:"value"`
	}
	if err := json.Unmarshal([]byte(mustCtl(t, w, sock, "stats")), &st); err != nil {
		t.Fatal(err)
	}
	for _, s := range st[name] {
		if s.Labels[label] == value {
			return s.Value
		}
	}
	return 0
}

// TestRateLimits: --rate-down 50mbit holds an iperf3 download within 10%
// of 50 Mbit/s, and --rate-up an upload, with no retransmission a drop
// caused (paced, never dropped); the rates change through ctl rates while
// the sandbox runs.
func TestRateLimits(t *testing.T) {
	testenv.RequireTools(t, "iperf3", "nstat")
	w := testenv.NewWorld(t)
	sock := controlSocket(t)
	w.Inet.Start(t, "iperf3", "-s", "-B", testenv.WebHost4, "-p", "5201")
	w.StartAgent(t, "--control", sock, "--rate-down", "50mbit", "--rate-up", "30mbit")
	waitFor(t, 5*time.Second, "iperf3 server", func() bool { ok, _ := reach(t, w, "tcp", testenv.WebHost4+":5201"); return ok })

	within := func(what string, got, want float64) {
		if got < want*0.9 || got > want*1.1 {
			t.Errorf("%s: %.1f Mbit/s, want %.0f ± 10%%", what, got, want)
		} else {
			t.Logf("%s: %.1f Mbit/s (limit %.0f)", what, got, want)
		}
	}
	// The links' drop counters from here on: a frame a link dropped while
	// the namespaces were being set up (a peer not up yet) is no drop of
	// the transfers'.
	nss := []*testenv.NS{w.Host, w.Inet, w.Guest}
	before := map[string]linkDrops{}
	for _, ns := range nss {
		for name, d := range linkDropsIn(t, ns) {
			before[ns.Name+"/"+name] = d
		}
	}
	within("download at --rate-down 50mbit", iperf(t, w, true, 5), 50)
	within("upload at --rate-up 30mbit", iperf(t, w, false, 5), 30)

	out := mustCtl(t, w, sock, "rates", "--down", "20mbit")
	if !strings.Contains(out, `"down": "20mbit"`) || !strings.Contains(out, `"up": "30mbit"`) {
		t.Errorf("ctl rates: %s", out)
	}
	within("download after ctl rates --down 20mbit", iperf(t, w, true, 4), 20)
	if out, err := ctl(t, w, sock, "rates", "--up", "fast"); err == nil || !strings.Contains(out, "fast") {
		t.Errorf("a bad rate: %v %s", err, out)
	}

	// Nothing was dropped anywhere on the path, so no retransmission was a
	// drop's: not by the links, not by the agent's host sockets (it reads
	// them at the paced rate; the kernel would count a segment it had no
	// room for), not by its netstack or its rings. (The senders' own
	// counters are no proof either way: a tail loss probe sent while the
	// paced window stands closed can set off a recovery that D-SACK later
	// shows was needless.)
	for _, ns := range nss {
		if n, out := nstat(t, ns, "TcpExtTCPRcvQDrop", "TcpExtTCPBacklogDrop", "TcpExtTCPOFODrop", "TcpExtTCPZeroWindowDrop",
			"TcpExtPruneCalled", "IpInDiscards", "Ip6InDiscards"); n != 0 {
			t.Errorf("the kernel in %s dropped %d segments:\n%s", ns.Name, n, out)
		}
		for name, d := range linkDropsIn(t, ns) {
			b := before[ns.Name+"/"+name]
			if d.rx != b.rx || d.tx != b.tx {
				t.Errorf("%s in %s dropped %d frames received and %d sent during the transfers:\n%s\nsoftnet_stat:\n%s", name, ns.Name,
					d.rx-b.rx, d.tx-b.tx, ns.MustRun(t, "ip", "-s", "-s", "link", "show", "dev", name), ns.MustRun(t, "cat", "/proc/net/softnet_stat"))
			}
		}
	}
	if n := stat(t, w, sock, "msbtap_flow_failures_total", "reason", "netstack_dropped"); n != 0 {
		t.Errorf("the netstack dropped %v segments", n)
	}
	for _, r := range []string{"tx_full", "rx_full", "other"} {
		if n := stat(t, w, sock, "msbtap_drops_total", "reason", r); n != 0 {
			t.Errorf("%v frames dropped (%s)", n, r)
		}
	}
}

// linkDrops is a link's count of dropped frames each way.
type linkDrops struct{ rx, tx int }

// linkDropsIn returns the drop counters of every link in ns, by name.
func linkDropsIn(t *testing.T, ns *testenv.NS) map[string]linkDrops {
	t.Helper()
	var links []struct {
		Name  string `json:"ifname"`
		Stats struct {
			RX, TX struct {
				Dropped int `json:"dropped"`
			}
		} `json:"stats64"`
	}
	if err := json.Unmarshal([]byte(ns.MustRun(t, "ip", "-s", "-j", "link")), &links); err != nil {
		t.Fatalf("ip -s -j link in %s: %v", ns.Name, err)
	}
	m := map[string]linkDrops{}
	for _, l := range links {
		m[l.Name] = linkDrops{l.Stats.RX.Dropped, l.Stats.TX.Dropped}
	}
	return m
}

// TestNewConnectionRate: --max-new-connections-per-second holds a burst of
// connections to about that rate; the rest are reset at once, and counted.
func TestNewConnectionRate(t *testing.T) {
	w := testenv.NewWorld(t)
	sock := controlSocket(t)
	w.StartAgent(t, "--control", sock, "--max-new-connections-per-second", "5")
	out := w.Guest.MustRun(t, w.Testhost, "churn", testenv.WebHost4+":7005", "40", "8")
	var ok, failed int
	if _, err := fmt.Sscanf(strings.TrimSpace(out), "ok=%d failed=%d", &ok, &failed); err != nil {
		t.Fatalf("churn: %q: %v", out, err)
	}
	if ok < 5 || ok > 15 || failed == 0 {
		t.Errorf("40 connections at 5 a second allowed: ok=%d failed=%d, want about 5 (burst) plus 5 a second", ok, failed)
	}
	limited := stat(t, w, sock, "msbtap_flow_failures_total", "reason", "tcp_rate_limited")
	if int(limited) < failed {
		t.Errorf("tcp_rate_limited = %v, want at least the %d refused", limited, failed)
	}
}
