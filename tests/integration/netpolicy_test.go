package integration

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/ipv4"

	"github.com/msbtap/msbtap/internal/testkit/testenv"
	"github.com/msbtap/msbtap/netns"
)

// TestHostBehindCIDR: a CIDR rule around the host's own address does not
// reach the host: not its address on the test internet (IPv4 and IPv6), not
// an address it gains after msbtap started, not an AnyIP route, not another
// sandbox's port published there. A rule naming the host group does.
func TestHostBehindCIDR(t *testing.T) {
	w := testenv.NewWorld(t)
	dir := t.TempDir()
	// A service of the host, on every address of its namespace.
	ready := filepath.Join(dir, "host-any-ready")
	w.Host.Start(t, w.Testhost, "serve", "--http", ":7010", "--ready", ready)
	// Another sandbox, whose port 80 is published on the host's address.
	other := testenv.NewNS(t, "o")
	oready := filepath.Join(dir, "other-ready")
	other.Start(t, w.Testhost, "serve", "--http", "0.0.0.0:80", "--ready", oready)
	w.Host.Start(t, w.Msbtap, "run", "--netns", other.Name, "--dns-upstream", testenv.DNSHost4,
		"--publish", testenv.HostInet4+":7011:80")
	waitFor(t, 10*time.Second, "the host's and the other sandbox's servers", func() bool {
		_, err1 := os.Stat(ready)
		_, err2 := os.Stat(oready)
		return err1 == nil && err2 == nil
	})
	waitFor(t, 15*time.Second, "the other sandbox's published port", func() bool {
		out, _ := w.Host.Run(w.Testhost, "dial", testenv.HostInet4+":7011")
		return strings.TrimSpace(out) == "connected"
	})

	cidr := `{"destination": {"cidr": "198.51.100.0/24"}, "protocols": ["tcp"], "action": "allow"},
		{"destination": {"cidr": "2001:db8::/32"}, "protocols": ["tcp"], "action": "allow"}`
	w.StartAgent(t, "--policy", writePolicy(t, `{"default_action": "deny", "rules": [`+cidr+`]}`))
	if ok, out := reach(t, w, "tcp", testenv.WebHost4+":80"); !ok {
		t.Fatalf("the CIDR rule's range: blocked: %s", out)
	}
	// Gained after msbtap started: an address, and an AnyIP route.
	w.Host.MustRun(t, "ip", "addr", "add", "198.51.100.77/32", "dev", "lo")
	w.Host.MustRun(t, "ip", "route", "add", "local", "198.51.100.128/28", "dev", "lo")
	hostDsts := []string{testenv.HostInet4 + ":7010", "[" + testenv.HostInet6 + "]:7010", "198.51.100.77:7010",
		"198.51.100.130:7010", testenv.HostInet4 + ":7011"}
	for _, dst := range hostDsts {
		// Each is really there: the host reaches it.
		if out, _ := w.Host.Run(w.Testhost, "dial", dst); strings.TrimSpace(out) != "connected" {
			t.Fatalf("%s from the host itself: %s", dst, out)
		}
		start := time.Now()
		if ok, out := reach(t, w, "tcp", dst); ok || time.Since(start) > 3*time.Second {
			t.Errorf("the host's %s under a CIDR rule: ok=%v %q after %s, want a prompt refusal", dst, ok, out, time.Since(start))
		}
	}
	w.StopAgent(t)

	w.StartAgent(t, "--policy", writePolicy(t, `{"default_action": "deny", "rules": [`+cidr+`,
		{"destination": {"group": "host"}, "protocols": ["tcp"], "ports": [{"start": 7010, "end": 7011}], "action": "allow"}]}`))
	for _, dst := range hostDsts {
		if ok, out := reach(t, w, "tcp", dst); !ok {
			t.Errorf("the host's %s under a host rule: blocked: %s", dst, out)
		}
	}
}

// udpCatcher listens on every IPv4 address of ns at port and reports the
// destination address of each datagram that arrives.
func udpCatcher(t *testing.T, ns *testenv.NS, port int) (got func() []string) {
	t.Helper()
	h, err := netns.Open(ns.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	var pc net.PacketConn
	if err := netns.Do(h, func() (err error) {
		pc, err = net.ListenPacket("udp4", fmt.Sprintf("0.0.0.0:%d", port))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	p := ipv4.NewPacketConn(pc)
	if err := p.SetControlMessage(ipv4.FlagDst, true); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var seen []string
	done := make(chan struct{})
	go func() {
		defer close(done)
		b := make([]byte, 2048)
		for {
			_, cm, _, err := p.ReadFrom(b)
			if err != nil {
				return
			}
			if cm != nil {
				mu.Lock()
				seen = append(seen, cm.Dst.String())
				mu.Unlock()
			}
		}
	}()
	t.Cleanup(func() { pc.Close(); <-done })
	return func() []string {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(seen)
	}
}

// ifaceWith returns the name of ns's interface that has addr.
func ifaceWith(t *testing.T, ns *testenv.NS, addr string) string {
	t.Helper()
	f := strings.Fields(ns.MustRun(t, "ip", "-o", "addr", "show", "to", addr))
	if len(f) < 2 {
		t.Fatalf("no interface of %s has %s", ns.Name, addr)
	}
	return f[1]
}

// TestBroadcastNeverLeaves: UDP from the sandbox to the directed broadcast
// of a subnet of the host (198.51.100.255), or of a subnet the host gains
// while msbtap runs (192.0.2.255), never reaches that segment, under
// public-only and under CIDR rules around them; unicast to the same port
// does.
func TestBroadcastNeverLeaves(t *testing.T) {
	w := testenv.NewWorld(t)
	const port = 7020
	got := udpCatcher(t, w.Inet, port)
	send := func(dst string) {
		t.Helper()
		// Bounded: a tenth of a second of datagrams to one port.
		if out, err := w.Guest.Run(w.Testhost, "udpflood", "-dst", dst, "-lo", fmt.Sprint(port), "-hi", fmt.Sprint(port), "-seconds", "0.1"); err != nil {
			t.Fatalf("udpflood %s: %v: %s", dst, err, out)
		}
	}
	hostIf, inetIf := ifaceWith(t, w.Host, testenv.HostInet4), ifaceWith(t, w.Inet, testenv.Inet4)
	for _, pol := range []string{"public-only", writePolicy(t, `{"default_action": "deny", "rules": [
		{"destination": {"cidr": "198.51.100.0/24"}, "protocols": ["udp"], "action": "allow"},
		{"destination": {"cidr": "192.0.2.0/24"}, "protocols": ["udp"], "action": "allow"}]}`)} {
		w.StartAgent(t, "--policy", pol)
		// A subnet the host gains after msbtap started, on the segment.
		w.Host.MustRun(t, "ip", "addr", "add", "192.0.2.1/24", "dev", hostIf)
		w.Inet.MustRun(t, "ip", "addr", "add", "192.0.2.2/24", "dev", inetIf)
		before := len(got())
		send("198.51.100.255")
		send("192.0.2.255")
		send(testenv.Inet4) // the control: the catcher hears unicast
		waitFor(t, 5*time.Second, "the unicast datagrams", func() bool { return len(got()) > before })
		time.Sleep(100 * time.Millisecond)
		for _, dst := range got()[before:] {
			if dst != testenv.Inet4 {
				t.Errorf("%s: the segment got a datagram to %s", pol, dst)
				break
			}
		}
		w.StopAgent(t)
		w.Host.MustRun(t, "ip", "addr", "del", "192.0.2.1/24", "dev", hostIf)
		w.Inet.MustRun(t, "ip", "addr", "del", "192.0.2.2/24", "dev", inetIf)
	}
}
