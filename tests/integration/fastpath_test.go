package integration

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/msbtap/msbtap/internal/testkit/pattern"
	"github.com/msbtap/msbtap/internal/testkit/testenv"
)

// TestFastPath: with --fast-path on, curl (both families, by address and
// by name), 100 MB each way with checksums, a half-close, a refused port
// and iperf3 both ways work through the TCP translator, and the flows did
// go through it.
func TestFastPath(t *testing.T) {
	forOffloads(t, testFastPath)
}

func testFastPath(t *testing.T, offload string) {
	testenv.RequireTools(t, "curl", "sha256sum", "iperf3")
	w := testenv.NewWorld(t)
	w.Inet.Start(t, "iperf3", "-s", "-B", testenv.WebHost4, "-p", "5201")
	w.StartAgent(t, "--offload", offload, "--fast-path", "on")
	for _, url := range []string{"http://" + testenv.WebHost4 + "/", "http://[" + testenv.WebHost6 + "]/", "http://" + testenv.TestDomain + "/"} {
		if out := w.Guest.MustRun(t, "curl", "-sS", "--max-time", "10", url); !strings.Contains(out, "hello from testhost") {
			t.Errorf("curl %s: %q", url, out)
		}
	}

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

	for _, addr := range []string{testenv.WebHost4 + ":7001", "[" + testenv.WebHost6 + "]:7001"} {
		out := w.Guest.MustRun(t, w.Testhost, "halfclose", addr, "1000000")
		if want := fmt.Sprintf("1000000 %s", pattern.SHA256(1000000)); strings.TrimSpace(out) != want {
			t.Errorf("half-close %s: got %q, want %q", addr, out, want)
		}
	}

	start := time.Now()
	out, err = w.Guest.Run(w.Testhost, "dial", testenv.WebHost4+":81")
	if err == nil || !strings.Contains(out, "connection refused") || time.Since(start) > time.Second {
		t.Errorf("closed port: %v after %s: %s", err, time.Since(start), out)
	}

	waitFor(t, 5*time.Second, "iperf3 server", func() bool { ok, _ := reach(t, w, "tcp", testenv.WebHost4+":5201"); return ok })
	down, up := iperf(t, w, true, 3), iperf(t, w, false, 3)
	t.Logf("iperf3 through the fast path, offload %s: download %.0f Mbit/s, upload %.0f Mbit/s", offload, down, up)

	if c := strings.Count(w.AgentLog.String(), "tcp flow on the fast path"); c < 8 {
		t.Errorf("%d flows on the fast path, want every TCP flow of the test (8 or more)", c)
	}
}
