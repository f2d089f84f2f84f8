// Package startup measures how long msbtap takes from exec to ready in
// netns mode (`make bench` runs it, as root).
package startup

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
)

// BenchmarkStartup starts `msbtap run --netns X --ready-fd 3` b.N times
// (make bench: 20) in a namespace of its own, each time from exec to the
// line on the ready descriptor, then stops it; it reports the median and
// the slowest start. MSBTAP_BIN measures another binary;
// MSBTAP_STARTUP_ARGS adds flags (--pid-file FILE, say).
func BenchmarkStartup(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("skipping: msbtap needs root to create its TAP; run `make bench` as root")
	}
	bin := os.Getenv("MSBTAP_BIN")
	if bin == "" {
		_, file, _, _ := runtime.Caller(0)
		bin = filepath.Join(b.TempDir(), "msbtap")
		build := exec.Command("go", "build", "-o", bin, "./cmd/msbtap")
		build.Dir = filepath.Join(filepath.Dir(file), "..", "..")
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			b.Fatalf("build: %v\n%s", err, out)
		}
	}
	ns := fmt.Sprintf("msbtap-start-%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		b.Fatalf("ip netns add: %v %s", err, out)
	}
	b.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })

	var took []time.Duration
	b.ResetTimer()
	for range b.N {
		took = append(took, startOnce(b, bin, ns))
	}
	b.StopTimer()
	slices.Sort(took)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	b.ReportMetric(ms(took[len(took)/2]), "median-ms")
	b.ReportMetric(ms(took[len(took)-1]), "max-ms")
	b.ReportMetric(0, "ns/op") // the per-op figure includes the stop: the median says it
}

// startOnce runs msbtap until it is ready and returns how long that took.
func startOnce(b *testing.B, bin, ns string) time.Duration {
	pr, pw, err := os.Pipe()
	if err != nil {
		b.Fatal(err)
	}
	defer pr.Close()
	// 127.0.0.1:9 (discard): no resolver is asked anything.
	args := []string{"run", "--netns", ns, "--dns-upstream", "127.0.0.1:9", "--ready-fd", "3", "--log-level", "error"}
	cmd := exec.Command(bin, append(args, strings.Fields(os.Getenv("MSBTAP_STARTUP_ARGS"))...)...)
	cmd.ExtraFiles = []*os.File{pw}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	pw.Close()
	line, _ := bufio.NewReader(pr).ReadString('\n')
	took := time.Since(start)
	cmd.Process.Signal(os.Interrupt)
	werr := cmd.Wait()
	if strings.TrimSpace(line) != "ready" || werr != nil {
		b.Fatalf("msbtap: ready fd said %q, exit %v\n%s", line, werr, stderr.String())
	}
	return took
}
