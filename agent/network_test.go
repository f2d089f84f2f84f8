package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/msbtap/msbtap/plan"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/tap/taptest"
)

// TestNetworkOnTaptest assembles a whole sandbox network without root and
// without a kernel device: the agent on a taptest device, a second gVisor
// stack as the guest, an echo server and a DNS server on the host's
// loopback. The guest resolves an allowed name, relays a TCP stream to
// the host, is refused a port the policy does not allow (with its line in
// the decision log), and then breaks a terminate rule: the termination
// happens once, tells the process side before it cuts the network and
// after, and nothing gets through from then on.
func TestNetworkOnTaptest(t *testing.T) {
	pl, err := plan.ForSlot(5)
	if err != nil {
		t.Fatal(err)
	}
	echo := listenEcho(t)
	closed := freePort(t) // nothing listens: the policy refuses it first
	fatal := freePort(t)
	upstream := serveDNS(t, "x.test.", "198.51.100.7")
	pol, err := policy.ParseFile([]byte(fmt.Sprintf(`{"default_action": "deny", "rules": [
		{"destination": {"group": "host"}, "protocols": ["tcp"], "ports": [{"start": %d, "end": %d}], "action": "allow"},
		{"destination": {"group": "host"}, "protocols": ["tcp"], "ports": [{"start": %d, "end": %d}], "action": "terminate"},
		{"destination": {"domain": "x.test"}, "action": "allow"}]}`, echo.Port(), echo.Port(), fatal, fatal)))
	if err != nil {
		t.Fatal(err)
	}
	auditLog := filepath.Join(t.TempDir(), "audit.log")
	var order []string
	var halts atomic.Int32
	dev := taptest.New(256)
	a, err := New(Config{Link: dev, Plan: pl, Policy: pol, DNSUpstreams: []string{upstream}, AuditLog: auditLog,
		Halt: Halt{
			Notify: func() { halts.Add(1); order = append(order, "notify") },
			Kill:   func() { order = append(order, "kill") },
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	g, err := taptest.NewGuest(dev, pl)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	gw := pl.GatewayV4

	// DNS: the gateway answers, from the upstream, a name the policy allows.
	if got := lookup(t, g, netip.AddrPortFrom(gw, 53), "x.test."); got != "198.51.100.7" {
		t.Fatalf("x.test resolved to %q, want 198.51.100.7", got)
	}
	// TCP: a stream to the host (the gateway's address) both ways.
	c, err := dialGuest(g, netip.AddrPortFrom(gw, echo.Port()))
	if err != nil {
		t.Fatalf("allowed flow: %v", err)
	}
	msg := strings.Repeat("through the agent ", 4096)
	go c.Write([]byte(msg))
	back := make([]byte, len(msg))
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, back); err != nil || string(back) != msg {
		t.Fatalf("echo: %v (%d bytes)", err, len(back))
	}
	c.Close()
	// A denial: reset at once, and logged.
	if c, err := dialGuest(g, netip.AddrPortFrom(gw, closed)); err == nil {
		c.Close()
		t.Fatalf("a flow to port %d the policy denies was connected", closed)
	}
	waitAudit(t, auditLog, func(r map[string]any) bool {
		return r["action"] == "deny" && r["dst"] == netip.AddrPortFrom(gw, closed).String()
	})
	// The termination: once, notify before kill, the violation handed on,
	// the network cut (the allowed port is refused now).
	if c, err := dialGuest(g, netip.AddrPortFrom(gw, fatal)); err == nil {
		c.Close()
		t.Fatal("the terminate rule's flow was connected")
	}
	select {
	case v := <-a.Terminated():
		if v.Proto != "tcp" || v.Dst != netip.AddrPortFrom(gw, fatal).String() || v.Rule == "" {
			t.Errorf("violation %+v", v)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no termination")
	}
	if c, err := dialGuest(g, netip.AddrPortFrom(gw, fatal)); err == nil {
		c.Close()
	}
	if c, err := dialGuest(g, netip.AddrPortFrom(gw, echo.Port())); err == nil {
		c.Close()
		t.Error("a flow got through after the termination")
	}
	if n := halts.Load(); n != 1 || strings.Join(order, ",") != "notify,kill" {
		t.Errorf("halt ran %d times, in order %v; want once, notify then kill", n, order)
	}
	waitAudit(t, auditLog, func(r map[string]any) bool { return r["action"] == "terminate" })
}

func dialGuest(g *taptest.Guest, dst netip.AddrPort) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return g.DialTCP(ctx, dst)
}

// lookup asks the guest's resolver (the gateway) for name's A record.
func lookup(t *testing.T, g *taptest.Guest, server netip.AddrPort, name string) string {
	t.Helper()
	c, err := g.DialUDP(server)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	q := new(dns.Msg)
	q.SetQuestion(name, dns.TypeA)
	b, _ := q.Pack()
	buf := make([]byte, 1500)
	for try := 0; try < 5; try++ { // the first query waits for ARP
		c.Write(b)
		c.SetReadDeadline(time.Now().Add(time.Second))
		n, err := c.Read(buf)
		if err != nil {
			continue
		}
		var m dns.Msg
		if err := m.Unpack(buf[:n]); err != nil {
			t.Fatal(err)
		}
		for _, rr := range m.Answer {
			if a, ok := rr.(*dns.A); ok {
				return a.A.String()
			}
		}
		return dns.RcodeToString[m.Rcode]
	}
	t.Fatal("no DNS answer")
	return ""
}

// serveDNS answers name with addr, on the loopback; it returns where.
func serveDNS(t *testing.T, name, addr string) string {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(q)
		if len(q.Question) == 1 && strings.EqualFold(q.Question[0].Name, name) && q.Question[0].Qtype == dns.TypeA {
			m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.ParseIP(addr)})
		} else {
			m.Rcode = dns.RcodeNameError
		}
		w.WriteMsg(m)
	})}
	started := make(chan struct{})
	srv.NotifyStartedFunc = func() { close(started) }
	go srv.ActivateAndServe()
	<-started
	t.Cleanup(func() { srv.Shutdown() })
	return pc.LocalAddr().String()
}

// listenEcho serves an echo on the loopback.
func listenEcho(t *testing.T) netip.AddrPort {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// freePort is a loopback TCP port nothing listens on (now).
func freePort(t *testing.T) uint16 {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).AddrPort().Port()
}

// waitAudit waits for a decision-log line that match says yes to.
func waitAudit(t *testing.T, path string, match func(map[string]any) bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if f, err := os.Open(path); err == nil {
			sc := bufio.NewScanner(f)
			for sc.Scan() {
				var r map[string]any
				if json.Unmarshal(sc.Bytes(), &r) == nil && match(r) {
					f.Close()
					return
				}
			}
			f.Close()
		}
		time.Sleep(50 * time.Millisecond)
	}
	b, _ := os.ReadFile(path)
	t.Fatalf("no such line in the decision log:\n%s", b)
}

// TestTwoNetworksInOneProcess: two agents, each on its own link with its
// own plan, serve their guests at once and close without leaving a
// goroutine behind (goleak in TestMain): nothing in New is process-wide.
func TestTwoNetworksInOneProcess(t *testing.T) {
	echo := listenEcho(t)
	pol, err := policy.ParseFile([]byte(fmt.Sprintf(`{"default_action": "deny", "rules": [
		{"destination": {"group": "host"}, "protocols": ["tcp"], "ports": [{"start": %d, "end": %d}], "action": "allow"}]}`, echo.Port(), echo.Port())))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 2)
	for _, slot := range []int{11, 12} {
		pl, err := plan.ForSlot(slot)
		if err != nil {
			t.Fatal(err)
		}
		dev := taptest.New(256)
		a, err := New(Config{Link: dev, Plan: pl, Policy: pol, DNSUpstreams: []string{"127.0.0.1:1"}})
		if err != nil {
			t.Fatal(err)
		}
		g, err := taptest.NewGuest(dev, pl)
		if err != nil {
			a.Close()
			t.Fatal(err)
		}
		go func() {
			defer a.Close()
			defer g.Close()
			c, err := dialGuest(g, netip.AddrPortFrom(pl.GatewayV4, echo.Port()))
			if err != nil {
				done <- fmt.Errorf("slot %d: %v", slot, err)
				return
			}
			defer c.Close()
			msg := fmt.Sprintf("slot %d", slot)
			c.Write([]byte(msg))
			b := make([]byte, len(msg))
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(c, b); err != nil || string(b) != msg {
				done <- fmt.Errorf("slot %d: echo %q, %v", slot, b, err)
				return
			}
			done <- nil
		}()
	}
	for range 2 {
		if err := <-done; err != nil {
			t.Error(err)
		}
	}
}
