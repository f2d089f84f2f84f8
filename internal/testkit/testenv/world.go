package testenv

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Addresses of the test world. The host namespace (where msbtap runs, as it
// would on a real host) reaches the "internet" namespace over a veth on
// TEST-NET-2 and 2001:db8::/32, and the "private" namespace on a 10.x
// address. Every world has its own namespaces, so tests can run in parallel.
const (
	HostInet4 = "198.51.100.1"
	Inet4     = "198.51.100.2"
	WebHost4  = "198.51.100.10" // HTTP :80, half-close :7001, UDP echo :7002, UDP size :7004, TCP echo :7005, HTTPS :443 (untrusted :8443), banner :22
	DNSHost4  = "198.51.100.53" // DNS :53
	HostInet6 = "2001:db8::1"
	Inet6     = "2001:db8::2"
	WebHost6  = "2001:db8::10"
	HostPriv4 = "10.77.0.1"
	PrivHost4 = "10.77.0.2" // HTTP :80, UDP echo :7002
	HostPriv6 = "fd77::1"
	PrivHost6 = "fd77::2" // HTTP :80, UDP echo :7002
	// HostLoopbackPort is an HTTP server (TCP) and UDP echo on the host
	// namespace's 127.0.0.1 and ::1: "the host itself".
	HostLoopbackPort = "8080"
	// RebindDomain is a public name the test DNS server answers with a
	// private address.
	RebindDomain = "rebind.example.test"
	TestDomain   = "www.example.test"
	OtherDomain  = "other.example.test"
)

// World is one test's set of namespaces with test servers and, once started,
// msbtap attached to Guest.
type World struct {
	Host, Guest, Inet, Priv *NS
	Msbtap, Testhost        string
	// TestCA is the CA certificate (PEM file) of the test internet's HTTPS
	// servers, which serve TestDomain and OtherDomain.
	TestCA string
	// RequestLog has a "METHOD HOST PATH" line for every request the test
	// internet's HTTP and HTTPS servers got.
	RequestLog string

	// DNSUpstream, if set, is the resolver StartAgent gives msbtap
	// instead of the world's own test DNS server (DNSHost4).
	DNSUpstream string

	Agent    *exec.Cmd
	AgentLog *Buffer
	agentErr chan error
}

// NewWorld builds the namespaces and starts the test servers.
func NewWorld(t testing.TB) *World {
	t.Helper()
	RequireRoot(t)
	RequireTools(t, "ip")
	w := &World{}
	w.Msbtap, w.Testhost = Binaries(t)
	w.Host = NewNS(t, "h")
	w.Guest = NewNS(t, "g")
	w.Inet = NewNS(t, "i")
	w.Priv = NewNS(t, "p")
	Veth(t, w.Host, []string{HostInet4 + "/24", HostInet6 + "/64"}, w.Inet, []string{Inet4 + "/24", WebHost4 + "/24", DNSHost4 + "/24", Inet6 + "/64", WebHost6 + "/64"})
	Veth(t, w.Host, []string{HostPriv4 + "/24", HostPriv6 + "/64"}, w.Priv, []string{PrivHost4 + "/24", PrivHost6 + "/64"})

	// The guest resolves through the gateway: `ip netns exec` bind-mounts
	// /etc/netns/NAME/resolv.conf over /etc/resolv.conf.
	etc := filepath.Join("/etc/netns", w.Guest.Name)
	if err := os.MkdirAll(etc, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(etc) })
	if err := os.WriteFile(filepath.Join(etc, "resolv.conf"), []byte("nameserver 100.96.0.1\noptions timeout:2 attempts:2\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	os.Chmod(dir, 0o755) // the sandbox's user reads the test CA
	w.TestCA = filepath.Join(dir, "test-ca.pem")
	w.RequestLog = filepath.Join(dir, "requests.log")
	ready := filepath.Join(dir, "inet-ready")
	w.Inet.Start(t, w.Testhost, "serve",
		"--http", WebHost4+":80", "--http", "["+WebHost6+"]:80",
		"--halfclose", WebHost4+":7001", "--halfclose", "["+WebHost6+"]:7001",
		"--udp-echo", WebHost4+":7002", "--udp-echo", "["+WebHost6+"]:7002",
		"--udp-size", WebHost4+":7004", "--udp-size", "["+WebHost6+"]:7004",
		"--echo", WebHost4+":7005",
		"--https", WebHost4+":443", "--https", "["+WebHost6+"]:443", "--https-untrusted", WebHost4+":8443",
		"--tls-names", TestDomain+","+OtherDomain, "--tls-ca-out", w.TestCA, "--request-log", w.RequestLog,
		"--banner", WebHost4+":22",
		"--dns", DNSHost4+":53",
		"--record", TestDomain+"="+WebHost4, "--record", TestDomain+"="+WebHost6,
		"--record", OtherDomain+"="+WebHost4,
		"--record", RebindDomain+"=10.0.0.1",
		"--ready", ready)
	pready := filepath.Join(dir, "priv-ready")
	w.Priv.Start(t, w.Testhost, "serve", "--http", PrivHost4+":80", "--http", "["+PrivHost6+"]:80",
		"--udp-echo", PrivHost4+":7002", "--udp-echo", "["+PrivHost6+"]:7002", "--ready", pready)
	hready := filepath.Join(dir, "host-ready")
	w.Host.Start(t, w.Testhost, "serve", "--http", "127.0.0.1:"+HostLoopbackPort, "--http", "[::1]:"+HostLoopbackPort,
		"--udp-echo", "127.0.0.1:"+HostLoopbackPort, "--udp-echo", "[::1]:"+HostLoopbackPort, "--ready", hready)
	waitFile(t, ready)
	waitFile(t, pready)
	waitFile(t, hready)
	return w
}

func waitFile(t testing.TB, path string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := os.Stat(path); err == nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("test servers not ready: %s never appeared", path)
}

// StartAgent runs msbtap in the host namespace attached to the guest
// namespace, with the test DNS server as upstream and any extra flags, and
// waits until it reports ready on --ready-fd. Cleanup stops it with SIGTERM
// and checks that it exits cleanly.
func (w *World) StartAgent(t testing.TB, extra ...string) {
	t.Helper()
	dns := DNSHost4
	if w.DNSUpstream != "" {
		dns = w.DNSUpstream
	}
	args := []string{w.Msbtap, "run", "--netns", w.Guest.Name, "--dns-upstream", dns, "--ready-fd", "3", "--log-level", "debug"}
	if fp := os.Getenv("MSBTAP_TEST_FAST_PATH"); fp != "" {
		// Run any test with the TCP fast path on (or off); a test's own
		// --fast-path, after it, wins.
		args = append(args, "--fast-path", fp)
	}
	args = append(args, extra...)
	cmd := w.Host.Command(args...)
	w.AgentLog = &Buffer{}
	cmd.Stdout, cmd.Stderr = w.AgentLog, w.AgentLog
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.ExtraFiles = []*os.File{pw}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start msbtap: %v", err)
	}
	pw.Close()
	w.Agent = cmd
	w.agentErr = make(chan error, 1)
	go func() { w.agentErr <- cmd.Wait() }()
	t.Cleanup(func() {
		w.StopAgent(t)
		if t.Failed() {
			t.Logf("msbtap log:\n%s", w.AgentLog.String())
		}
	})
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(pr).ReadString('\n')
		pr.Close()
		line <- s
	}()
	select {
	case s := <-line:
		if strings.TrimSpace(s) != "ready" {
			t.Fatalf("msbtap did not get ready (ready-fd said %q); log:\n%s", s, w.AgentLog.String())
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("msbtap not ready after 15 s; log:\n%s", w.AgentLog.String())
	}
}

// StopAgent sends SIGTERM to msbtap and waits for it; it fails the test if
// msbtap does not exit cleanly within 10 s. Safe to call twice.
func (w *World) StopAgent(t testing.TB) error {
	if w.Agent == nil {
		return nil
	}
	cmd := w.Agent
	w.Agent = nil
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-w.agentErr:
		if err != nil {
			t.Errorf("msbtap exited with %v after SIGTERM", err)
		}
		return err
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-w.agentErr
		t.Errorf("msbtap did not exit within 10 s of SIGTERM")
		return fmt.Errorf("timeout")
	}
}

// AgentPID is the pid of the running msbtap (ip netns exec execs it, so
// the pid is msbtap's own).
func (w *World) AgentPID() int { return w.Agent.Process.Pid }
