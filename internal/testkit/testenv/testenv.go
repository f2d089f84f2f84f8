// Package testenv builds the throwaway worlds the integration tests run in:
// uniquely named network namespaces joined by veth pairs, test servers in
// them, and msbtap attached to a guest namespace. Everything is torn down in
// t.Cleanup, also when the test fails.
package testenv

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// RequireRoot skips t, saying why, unless the test runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root (network namespaces and TAP devices); run `make test` as root (or with sudo)")
	}
}

// RequireTools fails t when a command the test drives is missing.
func RequireTools(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			t.Fatalf("%s not found: `make deps`, as root, installs what the tests need", n)
		}
	}
}

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
)

// Binaries builds msbtap and testhost once per test binary and returns their
// paths. Call Cleanup from TestMain to remove them.
func Binaries(t testing.TB) (msbtap, testhost string) {
	t.Helper()
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "msbtap-test-bin-")
		if buildErr != nil {
			return
		}
		// Tests run the binaries as other users too (nobody).
		if buildErr = os.Chmod(buildDir, 0o755); buildErr != nil {
			return
		}
		root := moduleRoot()
		for _, b := range [][2]string{{"msbtap", "./cmd/msbtap"}, {"testhost", "./internal/testkit/testhost"}, {"msbtap-cni", "./cmd/msbtap-cni"}} {
			cmd := exec.Command("go", "build", "-o", filepath.Join(buildDir, b[0]), b[1])
			cmd.Dir = root
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0") // as make build: msbtap drops capabilities on every thread
			if out, err := cmd.CombinedOutput(); err != nil {
				buildErr = fmt.Errorf("go build %s: %v\n%s", b[1], err, out)
				return
			}
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(buildDir, "msbtap"), filepath.Join(buildDir, "testhost")
}

// Cleanup removes what Binaries built.
func Cleanup() {
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
}

func moduleRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "..")
}

var nsSeq atomic.Int64

// NS is a network namespace made for one test.
type NS struct {
	Name string
}

// NewNS creates a uniquely named namespace with loopback up; cleanup kills
// whatever still runs in it and deletes it.
func NewNS(t testing.TB, tag string) *NS {
	t.Helper()
	name := fmt.Sprintf("mt%d%s%d", os.Getpid()%100000, tag, nsSeq.Add(1))
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	ns := &NS{Name: name}
	t.Cleanup(func() { ns.destroy() })
	ns.MustRun(t, "ip", "link", "set", "lo", "up")
	return ns
}

func (n *NS) destroy() {
	for i := 0; i < 20; i++ {
		out, _ := exec.Command("ip", "netns", "pids", n.Name).Output()
		pids := strings.Fields(string(out))
		if len(pids) == 0 {
			break
		}
		for _, p := range pids {
			exec.Command("kill", "-KILL", p).Run()
		}
		time.Sleep(50 * time.Millisecond)
	}
	exec.Command("ip", "netns", "del", n.Name).Run()
}

// Path is the namespace's bind-mount path.
func (n *NS) Path() string { return "/run/netns/" + n.Name }

// Command returns a command that runs inside the namespace.
func (n *NS) Command(args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", n.Name}, args...)...)
}

// Run runs a command in the namespace and returns its combined output.
func (n *NS) Run(args ...string) (string, error) {
	out, err := n.Command(args...).CombinedOutput()
	return string(out), err
}

// MustRun is Run that fails the test on error.
func (n *NS) MustRun(t testing.TB, args ...string) string {
	t.Helper()
	out, err := n.Run(args...)
	if err != nil {
		t.Fatalf("in %s: %s: %v\n%s", n.Name, strings.Join(args, " "), err, out)
	}
	return out
}

// Start starts a long-running command in the namespace; cleanup stops it.
func (n *NS) Start(t testing.TB, args ...string) *exec.Cmd {
	t.Helper()
	cmd := n.Command(args...)
	var buf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &buf, &buf
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", strings.Join(args, " "), err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() && buf.Len() > 0 {
			t.Logf("output of %s:\n%s", strings.Join(args, " "), buf.String())
		}
	})
	return cmd
}

var vethSeq atomic.Int64

// Veth joins namespaces a and b with a veth pair and gives each end its
// addresses (CIDR strings; IPv6 ones without DAD).
func Veth(t testing.TB, a *NS, aAddrs []string, b *NS, bAddrs []string) (aIf, bIf string) {
	t.Helper()
	id := vethSeq.Add(1)
	aIf, bIf = fmt.Sprintf("va%d", id), fmt.Sprintf("vb%d", id)
	tmpA := fmt.Sprintf("mta%d_%d", os.Getpid()%100000, id)
	tmpB := fmt.Sprintf("mtb%d_%d", os.Getpid()%100000, id)
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	run("ip", "link", "add", tmpA, "type", "veth", "peer", "name", tmpB)
	t.Cleanup(func() { exec.Command("ip", "link", "del", tmpA).Run() }) // if still on the host
	run("ip", "link", "set", tmpA, "netns", a.Name, "name", aIf)
	run("ip", "link", "set", tmpB, "netns", b.Name, "name", bIf)
	for _, side := range []struct {
		ns    *NS
		ifc   string
		addrs []string
	}{{a, aIf, aAddrs}, {b, bIf, bAddrs}} {
		for _, ad := range side.addrs {
			args := []string{"ip", "addr", "add", ad, "dev", side.ifc}
			if strings.Contains(ad, ":") {
				args = append(args, "nodad")
			}
			side.ns.MustRun(t, args...)
		}
		side.ns.MustRun(t, "ip", "link", "set", side.ifc, "up")
	}
	return aIf, bIf
}

// Buffer collects a command's output while the test reads it.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *Buffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *Buffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
