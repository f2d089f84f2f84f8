package integration

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/msbtap/msbtap/internal/testkit/pattern"
	"github.com/msbtap/msbtap/internal/testkit/testenv"
)

func TestCurlByIPAndName(t *testing.T) {
	forOffloads(t, testCurlByIPAndName)
}

func testCurlByIPAndName(t *testing.T, offload string) {
	testenv.RequireTools(t, "curl")
	w := testenv.NewWorld(t)
	w.StartAgent(t, "--offload", offload)
	for _, url := range []string{
		"http://" + testenv.WebHost4 + "/",
		"http://[" + testenv.WebHost6 + "]/",
	} {
		out := w.Guest.MustRun(t, "curl", "-sS", "--max-time", "10", url)
		if !strings.Contains(out, "hello from testhost") {
			t.Errorf("curl %s: %q", url, out)
		}
	}
	for _, fam := range []string{"-4", "-6"} {
		out := w.Guest.MustRun(t, "curl", "-sS", fam, "--max-time", "10", "-w", " %{remote_ip}", "http://"+testenv.TestDomain+"/")
		if !strings.Contains(out, "hello from testhost") {
			t.Errorf("curl %s by name: %q", fam, out)
		}
		want := testenv.WebHost4
		if fam == "-6" {
			want = testenv.WebHost6
		}
		if !strings.HasSuffix(out, want) {
			t.Errorf("curl %s by name reached %q, want %s", fam, out, want)
		}
	}
}

// TestBulkTransferIntegrity moves 100 MB each way and compares checksums
// computed at both ends.
func TestBulkTransferIntegrity(t *testing.T) {
	forOffloads(t, testBulkTransferIntegrity)
}

func testBulkTransferIntegrity(t *testing.T, offload string) {
	testenv.RequireTools(t, "curl", "sha256sum")
	w := testenv.NewWorld(t)
	w.StartAgent(t, "--offload", offload)
	const n = 100 << 20
	want := pattern.SHA256(n)

	out := w.Guest.MustRun(t, "sh", "-c", fmt.Sprintf("curl -sS --fail --max-time 120 http://%s/bytes?n=%d | sha256sum", testenv.WebHost4, n))
	if got := strings.Fields(out)[0]; got != want {
		t.Errorf("download: sha256 %s, want %s", got, want)
	}

	file := filepath.Join(t.TempDir(), "upload")
	f, err := os.Create(file)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(f, pattern.Reader(n))
	f.Close()
	out = w.Guest.MustRun(t, "curl", "-sS", "--fail", "--max-time", "120", "-H", "Expect:", "--data-binary", "@"+file, "http://["+testenv.WebHost6+"]/sha256")
	if got := strings.TrimSpace(out); got != fmt.Sprintf("%d %s", n, want) {
		t.Errorf("upload: server saw %q, want %d %s", got, n, want)
	}
}

// TestHalfClose: the client shuts its write side; the server, which reads
// to EOF first, still gets its answer through.
func TestHalfClose(t *testing.T) {
	forOffloads(t, testHalfClose)
}

func testHalfClose(t *testing.T, offload string) {
	w := testenv.NewWorld(t)
	w.StartAgent(t, "--offload", offload)
	for _, addr := range []string{testenv.WebHost4 + ":7001", "[" + testenv.WebHost6 + "]:7001"} {
		out := w.Guest.MustRun(t, w.Testhost, "halfclose", addr, "1000000")
		if want := fmt.Sprintf("1000000 %s", pattern.SHA256(1000000)); strings.TrimSpace(out) != want {
			t.Errorf("%s: got %q, want %q", addr, out, want)
		}
	}
}

func TestClosedPortRefusedFast(t *testing.T) {
	testenv.RequireTools(t, "curl")
	w := testenv.NewWorld(t)
	w.StartAgent(t)
	for _, addr := range []string{testenv.WebHost4 + ":81", "[" + testenv.WebHost6 + "]:81"} {
		start := time.Now()
		out, err := w.Guest.Run(w.Testhost, "dial", addr)
		took := time.Since(start)
		if err == nil || !strings.Contains(out, "connection refused") {
			t.Errorf("%s: want connection refused, got %v: %s", addr, err, out)
		}
		if took > time.Second {
			t.Errorf("%s: refused after %s, want under 1 s", addr, took)
		}
		// curl, as a user would run it, fails fast too (exit 7: could not connect).
		cmd := w.Guest.Command("curl", "-sS", "--max-time", "5", "http://"+addr+"/")
		if err := cmd.Run(); cmd.ProcessState.ExitCode() != 7 {
			t.Errorf("curl %s: %v, want exit status 7", addr, err)
		}
	}
}

func TestUDPEcho(t *testing.T) {
	forOffloads(t, testUDPEcho)
}

func testUDPEcho(t *testing.T, offload string) {
	w := testenv.NewWorld(t)
	w.StartAgent(t, "--offload", offload)
	for _, addr := range []string{testenv.WebHost4 + ":7002", "[" + testenv.WebHost6 + "]:7002"} {
		out := w.Guest.MustRun(t, w.Testhost, "udp", addr, "ping-"+addr)
		if strings.TrimSpace(out) != "ping-"+addr {
			t.Errorf("%s: echo %q", addr, out)
		}
	}
	// A datagram as large as the MTU allows (1500 - 20 - 8) makes the trip.
	big := strings.Repeat("x", 1472)
	out := w.Guest.MustRun(t, w.Testhost, "udp", testenv.WebHost4+":7002", big)
	if strings.TrimSpace(out) != big {
		t.Errorf("1472-byte datagram: echo of %d bytes", len(strings.TrimSpace(out)))
	}
}

func TestDNS(t *testing.T) {
	testenv.RequireTools(t, "dig")
	w := testenv.NewWorld(t)
	w.StartAgent(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"@100.96.0.1", testenv.TestDomain, "A"}, testenv.WebHost4},
		{[]string{"@100.96.0.1", testenv.TestDomain, "AAAA"}, testenv.WebHost6},
		{[]string{"@fd42:6d73:62::1", testenv.TestDomain, "AAAA"}, testenv.WebHost6},
		{[]string{"@100.96.0.1", "+tcp", testenv.TestDomain, "A"}, testenv.WebHost4},
		// Any address on port 53 is answered by the agent.
		{[]string{"@198.51.100.99", testenv.TestDomain, "A"}, testenv.WebHost4},
		{[]string{"@198.51.100.99", "+tcp", testenv.TestDomain, "AAAA"}, testenv.WebHost6},
	} {
		out := w.Guest.MustRun(t, append([]string{"dig", "+short", "+time=3", "+tries=1"}, tc.args...)...)
		if strings.TrimSpace(out) != tc.want {
			t.Errorf("dig %v: got %q, want %q", tc.args, out, tc.want)
		}
	}
	out, _ := w.Guest.Run("dig", "+time=3", "+tries=1", "@100.96.0.1", "nosuch.example.test", "A")
	if !strings.Contains(out, "NXDOMAIN") {
		t.Errorf("unknown name: want NXDOMAIN from upstream, got:\n%s", out)
	}
}

func TestPing(t *testing.T) {
	testenv.RequireTools(t, "ping")
	w := testenv.NewWorld(t)
	w.StartAgent(t, "--policy", "allow-all") // public-only denies the gateway itself
	for _, dst := range []string{"100.96.0.1", "fd42:6d73:62::1", testenv.WebHost4, testenv.WebHost6} {
		out, err := w.Guest.Run("ping", "-c", "2", "-i", "0.2", "-W", "2", dst)
		if err != nil || !strings.Contains(out, " 0% packet loss") {
			t.Errorf("ping %s: %v\n%s", dst, err, out)
		}
	}
	// Nobody answers 198.51.100.77: the agent must not answer for it.
	out, err := w.Guest.Run("ping", "-c", "1", "-W", "1", "198.51.100.77")
	if err == nil {
		t.Errorf("ping to an address nobody holds was answered:\n%s", out)
	}
}

func TestConcurrentConnections(t *testing.T) {
	w := testenv.NewWorld(t)
	w.StartAgent(t)
	out := w.Guest.MustRun(t, w.Testhost, "conc", "http://"+testenv.WebHost4+"/slow?ms=300", "200")
	if strings.TrimSpace(out) != "ok=200 failed=0" {
		t.Errorf("200 concurrent connections: %s", out)
	}
}

func TestConnectionCap(t *testing.T) {
	w := testenv.NewWorld(t)
	w.StartAgent(t, "--max-connections", "20")
	out := w.Guest.MustRun(t, w.Testhost, "hold", testenv.WebHost4+":7001", "40", "2")
	if strings.TrimSpace(out) != "open=20 refused=20" {
		t.Errorf("40 connections against a cap of 20: %s", out)
	}
	// The cap frees up again afterwards.
	out = w.Guest.MustRun(t, w.Testhost, "conc", "http://"+testenv.WebHost4+"/", "20")
	if strings.TrimSpace(out) != "ok=20 failed=0" {
		t.Errorf("after the burst: %s", out)
	}
}

// TestNoLeaks: after a round of every kind of traffic, the agent's
// goroutines and file descriptors return to where they were.
func TestNoLeaks(t *testing.T) {
	testenv.RequireTools(t, "curl", "dig", "ping")
	w := testenv.NewWorld(t)
	w.StartAgent(t, "--metrics-addr", "127.0.0.1:9464")
	metric := func(name string) int {
		out := w.Host.MustRun(t, "curl", "-sS", "http://127.0.0.1:9464/metrics")
		m := regexp.MustCompile(`(?m)^` + name + ` (\S+)$`).FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("no %s in /metrics", name)
		}
		v, _ := strconv.ParseFloat(m[1], 64)
		return int(v)
	}
	fds := func() int {
		ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", w.AgentPID()))
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	traffic := func() {
		w.Guest.MustRun(t, w.Testhost, "conc", "http://"+testenv.WebHost4+"/", "50")
		w.Guest.MustRun(t, w.Testhost, "halfclose", testenv.WebHost4+":7001", "1000")
		w.Guest.MustRun(t, "dig", "+short", "@100.96.0.1", testenv.TestDomain)
		w.Guest.MustRun(t, "dig", "+short", "+tcp", "@100.96.0.1", testenv.TestDomain)
		w.Guest.MustRun(t, "ping", "-c", "1", "-W", "2", testenv.WebHost4)
		w.Guest.Run("curl", "-sS", "--max-time", "2", "http://"+testenv.WebHost4+":81/")
	}
	traffic() // warm up pools and lazily started goroutines
	time.Sleep(500 * time.Millisecond)
	g0, f0 := metric("go_goroutines"), fds()
	traffic()
	// UDP is the one kind of flow that lingers by design (idle timeout);
	// the TCP and DNS work must be gone within a few seconds.
	deadline := time.Now().Add(10 * time.Second)
	var g1, f1 int
	for {
		g1, f1 = metric("go_goroutines"), fds()
		if g1 <= g0 && f1 <= f0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if g1 > g0 {
		t.Errorf("goroutines: %d before, %d after", g0, g1)
	}
	if f1 > f0 {
		t.Errorf("fds: %d before, %d after", f0, f1)
	}
	if a := metric(`msbtap_flows_active{proto="tcp"}`); a != 0 {
		t.Errorf("tcp flows still active: %d", a)
	}
}

// forOffloads runs a correctness test with the TAP's offloads on and off.
func forOffloads(t *testing.T, f func(*testing.T, string)) {
	for _, mode := range []string{"on", "off"} {
		t.Run("offload-"+mode, func(t *testing.T) { f(t, mode) })
	}
}

// TestFragmentedUDP: a datagram larger than the MTU leaves the guest in
// fragments; the gateway puts it back together, decides on the whole, and
// relays it whole (the test host answers with the size it got).
func TestFragmentedUDP(t *testing.T) {
	w := testenv.NewWorld(t)
	w.StartAgent(t)
	big := strings.Repeat("f", 4000)
	for _, addr := range []string{testenv.WebHost4 + ":7004", "[" + testenv.WebHost6 + "]:7004"} {
		out, err := w.Guest.Run(w.Testhost, "udp", addr, big)
		if err != nil || strings.TrimSpace(out) != "4000" {
			t.Errorf("%s: a 4000-byte datagram in fragments: %v %q", addr, err, out)
		}
	}
}
