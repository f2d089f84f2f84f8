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

// guestServers starts HTTP on 80 and 81, a half-close server on 7001 and
// UDP echo on 7002 inside the sandbox.
func guestServers(t *testing.T, w *testenv.World) {
	t.Helper()
	ready := filepath.Join(t.TempDir(), "guest-ready")
	w.Guest.Start(t, w.Testhost, "serve", "--http", "0.0.0.0:80", "--http", "0.0.0.0:81",
		"--halfclose", "0.0.0.0:7001", "--udp-echo", "0.0.0.0:7002", "--ready", ready)
	waitFor(t, 10*time.Second, "guest servers", func() bool { _, err := os.Stat(ready); return err == nil })
}

func TestPublishTCP(t *testing.T) {
	testenv.RequireTools(t, "curl", "sha256sum")
	w := testenv.NewWorld(t)
	w.StartAgent(t, "-p", "18080:80", "--publish", "127.0.0.1:18090-18091:80-81", "-p", "[::1]:18080:80", "-p", "18085:85", "-p", "17001:7001")
	guestServers(t, w)

	for _, url := range []string{"http://127.0.0.1:18080/", "http://127.0.0.1:18090/", "http://127.0.0.1:18091/", "http://[::1]:18080/"} {
		out := w.Host.MustRun(t, "curl", "-sS", "--max-time", "10", url)
		if !strings.Contains(out, "hello from testhost") {
			t.Errorf("%s: %q", url, out)
		}
	}
	// Half-close through the published port: the host client shuts its
	// write side and still gets the guest server's answer.
	out := w.Host.MustRun(t, w.Testhost, "halfclose", "127.0.0.1:17001", "1000000")
	if want := fmt.Sprintf("1000000 %s", pattern.SHA256(1000000)); strings.TrimSpace(out) != want {
		t.Errorf("half-close through a published port: got %q, want %q", out, want)
	}

	// Nothing listens on guest port 85: the host client is reset at once.
	start := time.Now()
	cmd := w.Host.Command("curl", "-sS", "--max-time", "5", "http://127.0.0.1:18085/")
	b, _ := cmd.CombinedOutput()
	if code := cmd.ProcessState.ExitCode(); code != 56 && code != 52 && code != 7 {
		t.Errorf("closed guest port: curl exit %d (%s), want a reset", code, b)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("closed guest port: took %s to fail, want a prompt reset", took)
	}
}

func TestPublishBulkIntegrity(t *testing.T) {
	forOffloads(t, testPublishBulkIntegrity)
}

func testPublishBulkIntegrity(t *testing.T, offload string) {
	testenv.RequireTools(t, "curl", "sha256sum")
	w := testenv.NewWorld(t)
	w.StartAgent(t, "-p", "18080:80", "--offload", offload)
	guestServers(t, w)
	const n = 100 << 20
	want := pattern.SHA256(n)
	out := w.Host.MustRun(t, "sh", "-c", fmt.Sprintf("curl -sS --fail --max-time 120 'http://127.0.0.1:18080/bytes?n=%d' | sha256sum", n))
	if got := strings.Fields(out)[0]; got != want {
		t.Errorf("download through the published port: sha256 %s, want %s", got, want)
	}
	file := filepath.Join(t.TempDir(), "upload")
	f, _ := os.Create(file)
	io.Copy(f, pattern.Reader(n))
	f.Close()
	out = w.Host.MustRun(t, "curl", "-sS", "--fail", "--max-time", "120", "-H", "Expect:", "--data-binary", "@"+file, "http://127.0.0.1:18080/sha256")
	if got := strings.TrimSpace(out); got != fmt.Sprintf("%d %s", n, want) {
		t.Errorf("upload through the published port: guest saw %q", got)
	}
}

func TestPublishUDP(t *testing.T) {
	w := testenv.NewWorld(t)
	w.StartAgent(t, "-p", "17002:7002/udp")
	guestServers(t, w)
	for i := 0; i < 3; i++ { // separate clients, separate sessions
		msg := fmt.Sprintf("udp-through-published-port-%d", i)
		out := w.Host.MustRun(t, w.Testhost, "udp", "127.0.0.1:17002", msg)
		if strings.TrimSpace(out) != msg {
			t.Errorf("echo: %q, want %q", out, msg)
		}
	}
}

// TestPublishToIPv6OnlyGuest: a guest server that listens on its IPv6
// address only is reached through a plain published TCP port (the IPv4
// address refuses, so the relay tries IPv6), and through /tcp6 and /udp6.
func TestPublishToIPv6OnlyGuest(t *testing.T) {
	testenv.RequireTools(t, "curl")
	w := testenv.NewWorld(t)
	w.StartAgent(t, "-p", "18080:8081", "-p", "18081:8081/tcp6", "-p", "17003:7003/udp6")
	ready := filepath.Join(t.TempDir(), "guest6-ready")
	w.Guest.Start(t, w.Testhost, "serve", "--http", "[fd42:6d73:62::2]:8081", "--udp-echo", "[fd42:6d73:62::2]:7003", "--ready", ready)
	waitFor(t, 10*time.Second, "guest servers", func() bool { _, err := os.Stat(ready); return err == nil })
	if _, err := w.Guest.Run(w.Testhost, "dial", "100.96.0.2:8081"); err == nil {
		t.Fatal("the guest server answers on IPv4 too: the test proves nothing")
	}
	for _, url := range []string{"http://127.0.0.1:18080/", "http://127.0.0.1:18081/"} {
		out, err := w.Host.Run("curl", "-sS", "--max-time", "5", url)
		if err != nil || !strings.Contains(out, "hello from testhost") {
			t.Errorf("%s: %v %q", url, err, out)
		}
	}
	if out := w.Host.MustRun(t, w.Testhost, "udp", "127.0.0.1:17003", "v6-echo"); strings.TrimSpace(out) != "v6-echo" {
		t.Errorf("udp6: %q", out)
	}
}

func TestPublishConcurrentClients(t *testing.T) {
	w := testenv.NewWorld(t)
	w.StartAgent(t, "-p", "18080:80")
	guestServers(t, w)
	out := w.Host.MustRun(t, w.Testhost, "conc", "http://127.0.0.1:18080/slow?ms=200", "100")
	if strings.TrimSpace(out) != "ok=100 failed=0" {
		t.Errorf("100 concurrent clients: %s", out)
	}
}

func TestPublishIngressDeny(t *testing.T) {
	testenv.RequireTools(t, "curl")
	w := testenv.NewWorld(t)
	pol := writePolicy(t, `{"default_action": "deny", "rules": [
		{"direction": "ingress", "source": {"cidr": "127.0.0.0/8"}, "ports": [{"start": 18081}], "action": "deny"},
		{"direction": "ingress", "source": {"cidr": "::1"}, "action": "deny"}]}`)
	audit := filepath.Join(t.TempDir(), "audit.jsonl")
	w.StartAgent(t, "--policy", pol, "--audit-log", audit, "-p", "18080:80", "-p", "18081:81", "-p", "[::1]:18080:80", "-p", "17002:7002/udp", "-p", "[::1]:17002:7002/udp")
	guestServers(t, w)
	// No ingress rule matches 18080 over IPv4: allowed (default_action is for egress).
	if out := w.Host.MustRun(t, "curl", "-sS", "--max-time", "5", "http://127.0.0.1:18080/"); !strings.Contains(out, "hello") {
		t.Errorf("allowed client: %q", out)
	}
	for _, url := range []string{"http://127.0.0.1:18081/", "http://[::1]:18080/"} {
		if out, err := w.Host.Run("curl", "-sS", "--max-time", "5", url); err == nil {
			t.Errorf("%s: denied client got through: %s", url, out)
		}
	}
	if out := w.Host.MustRun(t, w.Testhost, "udp", "127.0.0.1:17002", "ok"); strings.TrimSpace(out) != "ok" {
		t.Errorf("allowed udp client: %q", out)
	}
	if out, err := w.Host.Run(w.Testhost, "udp", "[::1]:17002", "no"); err == nil {
		t.Errorf("denied udp client got an answer: %s", out)
	}
	w.StopAgent(t)
	b, _ := os.ReadFile(audit)
	if !strings.Contains(string(b), `"direction":"ingress","proto":"tcp"`) || !strings.Contains(string(b), `"action":"deny"`) {
		t.Errorf("ingress decisions not logged:\n%s", b)
	}
}

func TestPublishStartupErrors(t *testing.T) {
	w := testenv.NewWorld(t)
	w.Host.Start(t, w.Testhost, "serve", "--http", "127.0.0.1:18070")
	waitFor(t, 5*time.Second, "a server holding the port", func() bool {
		_, err := w.Host.Run(w.Testhost, "dial", "127.0.0.1:18070")
		return err == nil
	})
	for _, tc := range []struct {
		spec, want string
	}{
		{"18070:80", "address already in use"},
		{"18080:80/sctp", `protocol "sctp"`},
		{"18080-18082:80-81", "host range has 3 ports, guest range 2"},
		{"70000:80", "host port"},
		{"::1:18080:80", "brackets"},
		{"192.0.2.250:18080:80", "not an address of this host"},
	} {
		out, err := w.Host.Run(w.Msbtap, "run", "--netns", w.Guest.Name, "-p", tc.spec)
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if err == nil || len(lines) != 1 || !strings.Contains(out, tc.want) {
			t.Errorf("-p %s: want a one-line error mentioning %q, got %v:\n%s", tc.spec, tc.want, err, out)
		}
	}
	if _, err := w.Guest.Run("ip", "link", "show", "eth0"); err == nil {
		t.Errorf("a failed start left the TAP behind")
	}
}
