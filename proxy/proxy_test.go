package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/policy"
)

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t *testing.T) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() { c, _ := ln.Accept(); ch <- c }()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s := <-ch
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// TestRelayHalfClose: the guest side shuts its write half; the server sees
// EOF, then still answers, and the guest reads the answer.
func TestRelayHalfClose(t *testing.T) {
	guest, relayGuest := tcpPair(t)
	relayUp, server := tcpPair(t)
	done := make(chan struct{})
	go func() { Relay(relayGuest, relayUp, nil, nil); close(done) }()

	guest.Write([]byte("request"))
	guest.CloseWrite()
	got, err := io.ReadAll(server) // ends at the relayed FIN
	if err != nil || string(got) != "request" {
		t.Fatalf("server read %q, %v", got, err)
	}
	server.Write([]byte("answer after your FIN"))
	server.CloseWrite()
	ans, err := io.ReadAll(guest)
	if err != nil || string(ans) != "answer after your FIN" {
		t.Fatalf("guest read %q, %v", ans, err)
	}
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("Relay did not return after both directions closed")
	}
}

// TestRelayResetPropagates: a reset on one side reaches the other as a
// reset, not as a clean end of stream.
func TestRelayResetPropagates(t *testing.T) {
	guest, relayGuest := tcpPair(t)
	relayUp, server := tcpPair(t)
	go Relay(relayGuest, relayUp, nil, nil)
	guest.Write([]byte("x"))
	buf := make([]byte, 1)
	io.ReadFull(server, buf)
	server.SetLinger(0)
	server.Close() // RST
	guest.SetReadDeadline(time.Now().Add(3 * time.Second))
	_, err := guest.Read(buf)
	if err == nil || errors.Is(err, io.EOF) {
		t.Fatalf("guest read after the server's reset: %v, want a reset", err)
	}
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("guest saw nothing after the server's reset")
	}
}

func TestParseUpstream(t *testing.T) {
	for in, want := range map[string]string{
		"198.51.100.53":        "198.51.100.53:53",
		"198.51.100.53:5353":   "198.51.100.53:5353",
		"2001:db8::53":         "[2001:db8::53]:53",
		"[2001:db8::53]:5300":  "[2001:db8::53]:5300",
		"::ffff:198.51.100.53": "198.51.100.53:53",
	} {
		got, err := ParseUpstream(in)
		if err != nil || got != want {
			t.Errorf("ParseUpstream(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "resolver.example", "1.2.3.4:99999"} {
		if _, err := ParseUpstream(bad); err == nil {
			t.Errorf("ParseUpstream(%q): no error", bad)
		}
	}
}

func TestHostUpstreams(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	os.WriteFile(empty, nil, 0o644)
	if got := HostUpstreams(empty); len(got) != 0 {
		t.Errorf("empty resolv.conf: %v", got)
	}
	if got := HostUpstreams(filepath.Join(dir, "missing")); len(got) != 0 {
		t.Errorf("missing resolv.conf: %v", got)
	}
	rc := filepath.Join(dir, "resolv.conf")
	os.WriteFile(rc, []byte("# c\nnameserver 198.51.100.53\nnameserver 2001:db8::53\nsearch x\n"), 0o644)
	got := HostUpstreams(rc)
	if len(got) != 2 || got[0] != "198.51.100.53:53" || got[1] != "[2001:db8::53]:53" {
		t.Errorf("got %v", got)
	}
}

// dnsServer answers every A query with addr on a loopback UDP port.
func dnsServer(t *testing.T, addr string, rcode int) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		m := new(dns.Msg)
		m.SetRcode(q, rcode)
		if rcode == dns.RcodeSuccess {
			m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.ParseIP(addr)})
		}
		w.WriteMsg(m)
	})}
	go srv.ActivateAndServe()
	t.Cleanup(func() { srv.Shutdown() })
	return pc.LocalAddr().String()
}

// deadUpstream is a UDP port nobody answers on.
func deadUpstream(t *testing.T) string {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	return pc.LocalAddr().String()
}

func query(name string) *dns.Msg {
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(name), dns.TypeA)
	return q
}

func TestDNSFailover(t *testing.T) {
	good := dnsServer(t, "198.51.100.7", dns.RcodeSuccess)
	d, err := NewDNS(DNSOptions{Upstreams: []string{deadUpstream(t), good}, Timeout: 4 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	a := d.Resolve(context.Background(), netip.AddrPort{}, query("www.example.test"))
	if a.Rcode != dns.RcodeSuccess || len(a.Answer) != 1 {
		t.Fatalf("got %v", a)
	}
	// The upstream that answered is tried first from now on: fast.
	start := time.Now()
	a = d.Resolve(context.Background(), netip.AddrPort{}, query("www.example.test"))
	if a.Rcode != dns.RcodeSuccess || time.Since(start) > 500*time.Millisecond {
		t.Fatalf("second query: rcode %d after %s", a.Rcode, time.Since(start))
	}
}

func TestDNSServfailWhenAllFail(t *testing.T) {
	d, _ := NewDNS(DNSOptions{Upstreams: []string{deadUpstream(t)}, Timeout: 500 * time.Millisecond})
	defer d.Close()
	q := query("www.example.test")
	a := d.Resolve(context.Background(), netip.AddrPort{}, q)
	if a.Rcode != dns.RcodeServerFailure || a.Id != q.Id {
		t.Fatalf("got rcode %d id %d, want SERVFAIL for id %d", a.Rcode, a.Id, q.Id)
	}
	none, _ := NewDNS(DNSOptions{})
	defer none.Close()
	if a := none.Resolve(context.Background(), netip.AddrPort{}, q); a.Rcode != dns.RcodeServerFailure {
		t.Fatalf("no upstreams: rcode %d", a.Rcode)
	}
}

type captureReplier struct {
	mu   sync.Mutex
	udp  [][]byte
	echo int
	got  chan struct{}
}

func (c *captureReplier) SendUDP(src, dst netip.AddrPort, p []byte) bool {
	c.mu.Lock()
	c.udp = append(c.udp, append([]byte(nil), p...))
	c.mu.Unlock()
	select {
	case c.got <- struct{}{}:
	default:
	}
	return true
}

func (c *captureReplier) SendEchoReply(src, dst netip.Addr, id, seq uint16, p []byte) bool {
	return true
}

func TestDNSHandleUDPDropsGarbage(t *testing.T) {
	r := &captureReplier{got: make(chan struct{}, 1)}
	d, _ := NewDNS(DNSOptions{Replier: r})
	defer d.Close()
	src := netip.MustParseAddrPort("100.96.0.2:5000")
	dst := netip.MustParseAddrPort("100.96.0.1:53")
	for _, b := range [][]byte{nil, {1, 2, 3}} {
		if d.HandleUDP(src, dst, b) {
			t.Errorf("garbage %x accepted", b)
		}
	}
	if dropped := d.Stats().Dropped; dropped != 2 {
		t.Errorf("dropped: got %d, want 2", dropped)
	}
}

// TestDNSQuestionChecks: a message with more questions than one (a peer's
// forwarder checked only the first) or none gets FORMERR, over UDP and
// TCP; a name no host has (a NUL, an escaped dot, a space) gets
// NXDOMAIN; none of them goes upstream.
func TestDNSQuestionChecks(t *testing.T) {
	up := newRecordingUpstream(t)
	r := &captureReplier{got: make(chan struct{}, 8)}
	d, _ := NewDNS(DNSOptions{Upstreams: []string{up.addr}, Replier: r, Timeout: time.Second})
	defer d.Close()
	src := netip.MustParseAddrPort("100.96.0.2:5000")
	dst := netip.MustParseAddrPort("100.96.0.1:53")
	two := query("allowed.test")
	two.Question = append(two.Question, dns.Question{Name: "evil.test.", Qtype: dns.TypeA, Qclass: dns.ClassINET})
	none := query("allowed.test")
	none.Question = nil
	badNames := []string{`evil\000.test.`, `a\.b.test.`, `ev\032il.test.`}
	var msgs []*dns.Msg
	for _, name := range badNames {
		m := new(dns.Msg)
		m.Id = dns.Id()
		m.RecursionDesired = true
		m.Question = []dns.Question{{Name: name, Qtype: dns.TypeA, Qclass: dns.ClassINET}}
		msgs = append(msgs, m)
	}
	want := func(m *dns.Msg) int {
		if len(m.Question) != 1 {
			return dns.RcodeFormatError
		}
		return dns.RcodeNameError
	}
	for _, q := range append([]*dns.Msg{two, none}, msgs...) {
		b, err := q.Pack()
		if err != nil {
			t.Fatalf("%v: %v", q.Question, err)
		}
		d.HandleUDP(src, dst, b)
		select {
		case <-r.got:
		case <-time.After(2 * time.Second):
			t.Fatalf("%v: no answer over UDP", q.Question)
		}
		r.mu.Lock()
		last := r.udp[len(r.udp)-1]
		r.mu.Unlock()
		a := new(dns.Msg)
		if err := a.Unpack(last); err != nil || a.Id != q.Id || a.Rcode != want(q) {
			t.Errorf("UDP %v: rcode %s id %d (%v), want %s", q.Question, dns.RcodeToString[a.Rcode], a.Id, err, dns.RcodeToString[want(q)])
		}
	}
	guest, agent := net.Pipe()
	defer guest.Close()
	go d.ServeTCP(agent, netip.AddrPort{})
	gc := &dns.Conn{Conn: guest}
	guest.SetDeadline(time.Now().Add(3 * time.Second))
	for _, q := range []*dns.Msg{two, msgs[0]} {
		if err := gc.WriteMsg(q); err != nil {
			t.Fatal(err)
		}
		a, err := gc.ReadMsg()
		if err != nil || a.Rcode != want(q) {
			t.Fatalf("TCP %v: %v %v", q.Question, a, err)
		}
	}
	if got := up.queries(); len(got) != 0 {
		t.Errorf("the upstream saw %d queries", len(got))
	}
}

func TestDNSTruncatesToMTU(t *testing.T) {
	// An upstream with a huge answer (it truncates over UDP to the size
	// asked for, as real servers do, and answers whole over TCP); the
	// guest gets a truncated message that fits, with TC set so it retries
	// over TCP.
	pc, _ := net.ListenPacket("udp", "127.0.0.1:0")
	ln, err := net.Listen("tcp", pc.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	h := dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(q)
		m.Compress = true // about 3.2 KB: more than a 1500 MTU
		for i := 0; i < 200; i++ {
			m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.IPv4(198, 51, 100, byte(i))})
		}
		if _, udp := w.RemoteAddr().(*net.UDPAddr); udp {
			size := dns.MinMsgSize
			if opt := q.IsEdns0(); opt != nil {
				size = int(opt.UDPSize())
			}
			m.Truncate(size)
		}
		w.WriteMsg(m)
	})
	srv := &dns.Server{PacketConn: pc, Handler: h}
	tsrv := &dns.Server{Listener: ln, Handler: h}
	go srv.ActivateAndServe()
	go tsrv.ActivateAndServe()
	defer srv.Shutdown()
	defer tsrv.Shutdown()
	r := &captureReplier{got: make(chan struct{}, 1)}
	d, _ := NewDNS(DNSOptions{Upstreams: []string{pc.LocalAddr().String()}, Replier: r, MaxUDPPayload: 1452})
	defer d.Close()
	q := query("big.example.test")
	q.SetEdns0(4096, false)
	b, _ := q.Pack()
	d.HandleUDP(netip.MustParseAddrPort("100.96.0.2:5000"), netip.MustParseAddrPort("100.96.0.1:53"), b)
	select {
	case <-r.got:
	case <-time.After(5 * time.Second):
		t.Fatal("no answer")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.udp[0]) > 1452 {
		t.Fatalf("answer of %d bytes does not fit the MTU", len(r.udp[0]))
	}
	a := new(dns.Msg)
	if err := a.Unpack(r.udp[0]); err != nil || !a.Truncated {
		t.Fatalf("want a truncated answer: %v %v", err, a.Truncated)
	}
}

func TestUDPSessionsIdleOut(t *testing.T) {
	echo, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := echo.ReadFrom(buf)
			if err != nil {
				return
			}
			echo.WriteTo(buf[:n], from)
		}
	}()
	r := &captureReplier{got: make(chan struct{}, 1)}
	u := NewUDP(UDPOptions{Replier: r, IdleTimeout: 300 * time.Millisecond, MaxSessions: 2})
	defer u.Close()
	dst := netip.MustParseAddrPort(echo.LocalAddr().String())
	src := netip.MustParseAddrPort("100.96.0.2:4000")
	if _, err := u.Handle(src, dst, []byte("hi")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-r.got:
	case <-time.After(2 * time.Second):
		t.Fatal("no reply relayed")
	}
	u.Handle(netip.MustParseAddrPort("100.96.0.2:4001"), dst, []byte("x"))
	select {
	case <-r.got:
	case <-time.After(2 * time.Second):
		t.Fatal("no reply to the second session")
	}
	// Both sessions were answered: none gives way to a third.
	if _, err := u.Handle(netip.MustParseAddrPort("100.96.0.2:4002"), dst, []byte("x")); err != ErrLimit {
		t.Errorf("third session over a cap of 2 answered ones: %v, want ErrLimit", err)
	}
	deadline := time.Now().Add(3 * time.Second)
	for u.Stats().Active > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := u.Stats().Active; n != 0 {
		t.Fatalf("%d sessions still open after the idle timeout", n)
	}
	// A session that idled out is opened again by the next datagram.
	if _, err := u.Handle(src, dst, []byte("again")); err != nil {
		t.Fatalf("after idle timeout: %v", err)
	}
}

// TestUDPUnansweredSessionsGiveWay: a flood of sessions nobody answers
// neither holds the table for the idle timeout nor locks out a new flow:
// they expire after UnansweredTimeout, and at the cap the oldest of them
// makes room; an answered session stays.
func TestUDPUnansweredSessionsGiveWay(t *testing.T) {
	hole, _ := net.ListenPacket("udp", "127.0.0.1:0") // reads nothing, answers nothing
	defer hole.Close()
	echo, _ := net.ListenPacket("udp", "127.0.0.1:0")
	defer echo.Close()
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := echo.ReadFrom(buf)
			if err != nil {
				return
			}
			echo.WriteTo(buf[:n], from)
		}
	}()
	r := &captureReplier{got: make(chan struct{}, 1)}
	u := NewUDP(UDPOptions{Replier: r, IdleTimeout: time.Minute, UnansweredTimeout: 300 * time.Millisecond, MaxSessions: 3})
	defer u.Close()
	holeAddr, echoAddr := netip.MustParseAddrPort(hole.LocalAddr().String()), netip.MustParseAddrPort(echo.LocalAddr().String())
	u.Handle(netip.MustParseAddrPort("100.96.0.2:5000"), echoAddr, []byte("hi"))
	<-r.got
	for p := 6000; p < 6010; p++ { // a flood: each new session evicts the oldest unanswered one
		if _, err := u.Handle(netip.AddrPortFrom(netip.MustParseAddr("100.96.0.2"), uint16(p)), holeAddr, []byte("x")); err != nil {
			t.Fatalf("flood session %d: %v", p, err)
		}
	}
	if st := u.Stats(); st.Active != 3 || st.Evicted != 8 {
		t.Errorf("after the flood: %+v, want 3 active, 8 evicted", st)
	}
	deadline := time.Now().Add(3 * time.Second)
	for u.Stats().Active > 1 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := u.Stats().Active; n != 1 {
		t.Errorf("%d sessions open, want only the answered one after the unanswered timeout", n)
	}
}

// TestUDPSprayChurnsItsOwnSessions: guest sockets spraying datagrams at
// many ports evict their own unanswered sessions, not one that another
// socket opened and that is still waiting for its reply (the stress test's
// UDP flood lost such a flow when the oldest of all gave way).
func TestUDPSprayChurnsItsOwnSessions(t *testing.T) {
	hole, _ := net.ListenPacket("udp", "127.0.0.1:0") // answers nothing
	defer hole.Close()
	u := NewUDP(UDPOptions{Replier: &captureReplier{}, UnansweredTimeout: time.Minute, MaxSessions: 8})
	defer u.Close()
	guest := netip.MustParseAddr("100.96.0.2")
	holeAddr := netip.MustParseAddrPort(hole.LocalAddr().String())
	waiting := udpKey{netip.AddrPortFrom(guest, 5000), holeAddr}
	if _, err := u.Handle(waiting.src, waiting.dst, []byte("question")); err != nil {
		t.Fatal(err)
	}
	for round := 0; round < 50; round++ {
		for sprayer := uint16(6000); sprayer < 6004; sprayer++ {
			dst := netip.AddrPortFrom(holeAddr.Addr(), 10000+uint16(round))
			if _, err := u.Handle(netip.AddrPortFrom(guest, sprayer), dst, []byte("x")); err != nil {
				t.Fatalf("spray from %d: %v", sprayer, err)
			}
		}
	}
	u.mu.Lock()
	_, kept := u.sessions[waiting]
	perSource := map[uint16]int{}
	for k := range u.sessions {
		perSource[k.src.Port()]++
	}
	u.mu.Unlock()
	if !kept {
		t.Error("the waiting session of another socket was evicted by the spray")
	}
	for port, n := range perSource {
		if n > 2 {
			t.Errorf("socket %d holds %d sessions, over its cap of 2 (a quarter of 8)", port, n)
		}
	}
	// A newcomer at the full table gets in, at the expense of a sprayer.
	newcomer := netip.AddrPortFrom(guest, 7000)
	if _, err := u.Handle(newcomer, holeAddr, []byte("hello")); err != nil {
		t.Fatalf("a new socket at the full table: %v", err)
	}
	if _, err := u.Handle(netip.AddrPortFrom(guest, 6000), netip.AddrPortFrom(holeAddr.Addr(), 20000), []byte("x")); err != nil {
		t.Fatal(err)
	}
	u.mu.Lock()
	_, kept = u.sessions[waiting]
	_, newKept := u.sessions[udpKey{newcomer, holeAddr}]
	n, sources := len(u.sessions), len(u.sources)
	u.mu.Unlock()
	if !kept || !newKept || n > 8 {
		t.Errorf("after a newcomer and more spray: waiting kept %v, newcomer kept %v, %d sessions (cap 8)", kept, newKept, n)
	}
	u.CloseSessions()
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		u.mu.Lock()
		n, sources = len(u.sessions), len(u.sources)
		u.mu.Unlock()
		if n == 0 && sources == 0 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n != 0 || sources != 0 {
		t.Errorf("after closing every session: %d sessions, %d sources left in the table", n, sources)
	}
}

// TestUDPSprayerThrottled: a socket at its cap of unanswered sessions has
// its new datagrams dropped before the policy or a socket is spent on them,
// until its oldest session has waited sprayTurnover; another socket opens
// sessions meanwhile.
func TestUDPSprayerThrottled(t *testing.T) {
	hole, _ := net.ListenPacket("udp", "127.0.0.1:0")
	defer hole.Close()
	var asked atomic.Int64
	u := NewUDP(UDPOptions{Replier: &captureReplier{}, MaxSessions: 16, // 4 per socket
		Allow: func(src, dst netip.AddrPort) *flow.Flow { asked.Add(1); return allowedUDP(src, dst) }})
	defer u.Close()
	guest := netip.MustParseAddr("100.96.0.2")
	sprayer := netip.AddrPortFrom(guest, 6000)
	to := func(port int) netip.AddrPort {
		return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port))
	}
	var limited int
	for p := 10000; p < 10100; p++ {
		switch _, err := u.Handle(sprayer, to(p), []byte("x")); err {
		case nil:
		case ErrLimit:
			limited++
		default:
			t.Fatal(err)
		}
	}
	if limited != 96 || asked.Load() != 4 {
		t.Errorf("100 ports from one socket: %d dropped at the cap, the policy asked %d times; want 96 and 4", limited, asked.Load())
	}
	if _, err := u.Handle(netip.AddrPortFrom(guest, 7000), to(10000), []byte("x")); err != nil {
		t.Errorf("another socket while the sprayer is throttled: %v", err)
	}
	time.Sleep(sprayTurnover + 100*time.Millisecond)
	if _, err := u.Handle(sprayer, to(20000), []byte("x")); err != nil {
		t.Errorf("the sprayer after its oldest session waited %s: %v", sprayTurnover, err)
	}
	if st := u.Stats(); st.Active != 5 || st.Evicted != 1 {
		t.Errorf("%+v, want 5 sessions (4 of the sprayer's) and 1 evicted", st)
	}
}

// TestUDPReplySizedPerFamily: a reply that fits a packet over IPv4 but not
// over IPv6 (its header is 20 bytes longer) is not sent to an IPv6 guest
// in a frame larger than the MTU.
func TestUDPReplySizedPerFamily(t *testing.T) {
	big, err := net.ListenPacket("udp", "[::1]:0")
	if err != nil {
		t.Skipf("skipping: no IPv6 loopback: %v", err)
	}
	defer big.Close()
	go func() {
		buf := make([]byte, 2048)
		for {
			_, from, err := big.ReadFrom(buf)
			if err != nil {
				return
			}
			big.WriteTo(make([]byte, 1460), from) // fits 1500 over IPv4 (1488), not IPv6 (1508)
		}
	}()
	r := &captureReplier{got: make(chan struct{}, 1)}
	u := NewUDP(UDPOptions{Replier: r, MaxPayload4: 1472, MaxPayload6: 1452})
	defer u.Close()
	if _, err := u.Handle(netip.MustParseAddrPort("[fd42:6d73:62::2]:4000"), netip.MustParseAddrPort(big.LocalAddr().String()), []byte("hi")); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for u.Stats().TooBig == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.udp) != 0 || u.Stats().TooBig != 1 {
		t.Errorf("a 1460-byte reply to an IPv6 guest: %d sent, %d counted too big; want 0 and 1", len(r.udp), u.Stats().TooBig)
	}
}

func TestUDPDenied(t *testing.T) {
	u := NewUDP(UDPOptions{Replier: &captureReplier{}, Allow: func(src, dst netip.AddrPort) *flow.Flow {
		return flow.Of(policy.Flow{Proto: policy.UDP, Src: src, Dst: dst}, policy.Decision{Action: policy.Deny})
	}})
	defer u.Close()
	if _, err := u.Handle(netip.MustParseAddrPort("100.96.0.2:1"), netip.MustParseAddrPort("127.0.0.1:9"), nil); err != ErrDenied {
		t.Fatalf("got %v, want ErrDenied", err)
	}
	if u.Stats().Active != 0 {
		t.Fatal("a denied flow opened a session")
	}
}

func BenchmarkRelay(b *testing.B) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(io.Discard, c); c.Close() }()
		}
	}()
	ln2, _ := net.Listen("tcp", "127.0.0.1:0")
	defer ln2.Close()
	go func() {
		c, _ := ln2.Accept()
		up, _ := net.Dial("tcp", ln.Addr().String())
		Relay(c, up, nil, nil)
	}()
	c, _ := net.Dial("tcp", ln2.Addr().String())
	buf := make([]byte, 64<<10)
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		c.Write(buf)
	}
	c.Close()
}

// FuzzDNSQuery: whatever the guest sends to port 53 is answered or dropped,
// never a crash.
func FuzzDNSQuery(f *testing.F) {
	q, _ := query("www.example.test").Pack()
	f.Add(q)
	f.Add([]byte{0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0})
	r := &captureReplier{got: make(chan struct{}, 1)}
	d, _ := NewDNS(DNSOptions{Replier: r, Timeout: 50 * time.Millisecond})
	defer d.Close()
	src := netip.MustParseAddrPort("100.96.0.2:5000")
	dst := netip.MustParseAddrPort("100.96.0.1:53")
	f.Fuzz(func(t *testing.T, b []byte) {
		d.HandleUDP(src, dst, b)
	})
}

type echoReply struct {
	src, dst netip.Addr
	id, seq  uint16
	data     string
}

type echoCapture struct {
	captureReplier
	replies chan echoReply
}

func (c *echoCapture) SendEchoReply(src, dst netip.Addr, id, seq uint16, p []byte) bool {
	c.replies <- echoReply{src, dst, id, seq, string(p)}
	return true
}

// TestEchoSharesOneSocketPerFamily: requests from two guest pings with the
// same identifier space and sequence go out through one socket per family
// and each reply comes back with its own guest identifier and sequence.
func TestEchoSharesOneSocketPerFamily(t *testing.T) {
	if c, _, err := listenICMP(false); err != nil {
		t.Skipf("skipping: no ICMP socket (needs root or ping_group_range): %v", err)
	} else {
		c.Close()
	}
	r := &echoCapture{replies: make(chan echoReply, 8)}
	e := NewEcho(EchoOptions{Replier: r, Timeout: 2 * time.Second})
	defer e.Close()
	guest := netip.MustParseAddr("100.96.0.2")
	guest6 := netip.MustParseAddr("fd42:6d73:62::2")
	want := map[echoReply]bool{}
	for i, dst := range []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.1"), netip.IPv6Loopback()} {
		src := guest
		if dst.Is6() {
			src = guest6
		}
		id := uint16(100 + i)
		data := fmt.Sprintf("ping-%d", i)
		if !e.Handle(src, dst, id, 1, []byte(data)) {
			t.Fatalf("request %d dropped", i)
		}
		want[echoReply{dst, src, id, 1, data}] = true
	}
	for len(want) > 0 {
		select {
		case got := <-r.replies:
			if !want[got] {
				t.Errorf("unexpected reply %+v", got)
			}
			delete(want, got)
		case <-time.After(3 * time.Second):
			t.Fatalf("replies missing: %+v", want)
		}
	}
	e.mu.Lock()
	open := 0
	for _, s := range e.socks {
		if s != nil {
			open++
		}
	}
	e.mu.Unlock()
	if open != 2 {
		t.Errorf("%d sockets open, want one per family", open)
	}
	if st := e.Stats(); st.Sent != 3 || st.Replied != 3 || st.InFlight != 0 {
		t.Errorf("stats %+v", st)
	}
}

// recordingUpstream answers every query with one A record and remembers
// what it received.
type recordingUpstream struct {
	mu   sync.Mutex
	got  []*dns.Msg
	addr string
	// mangle, when set, changes the answer before it is sent.
	mangle func(*dns.Msg)
}

func newRecordingUpstream(t *testing.T) *recordingUpstream {
	u := &recordingUpstream{}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		u.mu.Lock()
		u.got = append(u.got, q.Copy())
		mangle := u.mangle
		u.mu.Unlock()
		m := new(dns.Msg)
		m.SetReply(q)
		m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.IPv4(198, 51, 100, 7)})
		if mangle != nil {
			mangle(m)
		}
		w.WriteMsg(m)
	})}
	go srv.ActivateAndServe()
	t.Cleanup(func() { srv.Shutdown() })
	u.addr = pc.LocalAddr().String()
	return u
}

func (u *recordingUpstream) queries() []*dns.Msg {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]*dns.Msg(nil), u.got...)
}

// TestDNSForwardsAFreshQuery: what reaches the upstream is the agent's own
// message, never the guest's: random ID, opcode QUERY, class IN, a known
// type, a minimal OPT; the guest gets its ID and question back.
func TestDNSForwardsAFreshQuery(t *testing.T) {
	up := newRecordingUpstream(t)
	d, _ := NewDNS(DNSOptions{Upstreams: []string{up.addr}, Timeout: 2 * time.Second})
	defer d.Close()
	q := query("WwW.Example.TEST")
	q.Id = 4242
	q.SetEdns0(4096, true)
	opt := q.IsEdns0()
	opt.Option = append(opt.Option, &dns.EDNS0_SUBNET{Code: dns.EDNS0SUBNET, Family: 1, SourceNetmask: 24, Address: net.IPv4(100, 96, 0, 0).To4()},
		&dns.EDNS0_LOCAL{Code: 65001, Data: []byte("secret-from-the-guest")})
	a := d.Resolve(context.Background(), netip.AddrPort{}, q)
	if a.Rcode != dns.RcodeSuccess || a.Id != 4242 || a.Question[0].Name != "WwW.Example.TEST." || len(a.Answer) != 1 {
		t.Fatalf("guest's answer: id %d question %v rcode %d", a.Id, a.Question, a.Rcode)
	}
	got := up.queries()
	if len(got) != 1 {
		t.Fatalf("upstream saw %d queries", len(got))
	}
	u := got[0]
	if u.Id == 4242 || u.Opcode != dns.OpcodeQuery || u.Question[0].Qclass != dns.ClassINET {
		t.Errorf("upstream query: id %d opcode %d class %d", u.Id, u.Opcode, u.Question[0].Qclass)
	}
	uo := u.IsEdns0()
	if uo == nil || len(uo.Option) != 0 || uo.UDPSize() != upstreamEDNSSize || !uo.Do() {
		t.Errorf("upstream OPT: %v, want size %d, DO, no options", uo, upstreamEDNSSize)
	}

	// Messages that are not plain queries never go upstream.
	for _, tc := range []struct {
		name string
		make func() *dns.Msg
	}{
		{"update", func() *dns.Msg { m := query("example.test"); m.Opcode = dns.OpcodeUpdate; return m }},
		{"notify", func() *dns.Msg { m := query("example.test"); m.Opcode = dns.OpcodeNotify; return m }},
		{"axfr", func() *dns.Msg { m := new(dns.Msg); m.SetAxfr("example.test."); return m }},
		{"any", func() *dns.Msg { m := new(dns.Msg); m.SetQuestion("example.test.", dns.TypeANY); return m }},
		{"chaos", func() *dns.Msg { m := query("version.bind"); m.Question[0].Qclass = dns.ClassCHAOS; return m }},
	} {
		a := d.Resolve(context.Background(), netip.AddrPort{}, tc.make())
		if a.Rcode != dns.RcodeNotImplemented {
			t.Errorf("%s: rcode %s, want NOTIMP", tc.name, dns.RcodeToString[a.Rcode])
		}
	}
	if n := len(up.queries()); n != 1 {
		t.Errorf("upstream saw %d queries, want only the plain one", n)
	}
}

// TestDNSRefusesAnAnswerToAnotherQuestion: an upstream (or a spoofer)
// answering a different question gets SERVFAIL, not the guest's trust.
func TestDNSRefusesAnAnswerToAnotherQuestion(t *testing.T) {
	up := newRecordingUpstream(t)
	up.mu.Lock()
	up.mangle = func(m *dns.Msg) { m.Question[0].Name = "other.example.test." }
	up.mu.Unlock()
	d, _ := NewDNS(DNSOptions{Upstreams: []string{up.addr}, Timeout: time.Second})
	defer d.Close()
	if a := d.Resolve(context.Background(), netip.AddrPort{}, query("www.example.test")); a.Rcode != dns.RcodeServerFailure {
		t.Errorf("rcode %s, want SERVFAIL", dns.RcodeToString[a.Rcode])
	}
}

// TestDNSOverTCPIsBounded: connections past the cap are refused; one
// connection answers at most MaxTCPQueries and closes when idle.
func TestDNSOverTCPIsBounded(t *testing.T) {
	up := newRecordingUpstream(t)
	d, _ := NewDNS(DNSOptions{Upstreams: []string{up.addr}, MaxTCPConns: 2, MaxTCPQueries: 3, TCPIdleTimeout: 200 * time.Millisecond})
	defer d.Close()
	r1, ok1 := d.TryTCP()
	r2, ok2 := d.TryTCP()
	if !ok1 || !ok2 {
		t.Fatal("slots under the cap refused")
	}
	if _, ok := d.TryTCP(); ok {
		t.Fatal("a third connection over a cap of 2")
	}
	guest, agent := net.Pipe()
	done := make(chan struct{})
	go func() { d.ServeTCP(agent, netip.AddrPort{}); close(done) }()
	gc := &dns.Conn{Conn: guest}
	answered := 0
	for i := 0; i < 5; i++ {
		if err := gc.WriteMsg(query("www.example.test")); err != nil {
			break
		}
		if _, err := gc.ReadMsg(); err != nil {
			break
		}
		answered++
	}
	<-done
	r1()
	if answered != 3 {
		t.Errorf("answered %d queries on one connection, want 3", answered)
	}
	// An idle connection is closed.
	guest, agent = net.Pipe()
	start := time.Now()
	d.ServeTCP(agent, netip.AddrPort{})
	r2()
	if took := time.Since(start); took > time.Second {
		t.Errorf("idle connection held for %s", took)
	}
	guest.Close()
	if st := d.Stats(); st.TCPConns != 0 || st.TCPOverCap != 1 {
		t.Errorf("stats %+v", st)
	}
}

// TestDNSCloseRacesQueries: queries that arrive while the forwarder closes
// are dropped, never a panic (sync: WaitGroup reused).
func TestDNSCloseRacesQueries(t *testing.T) {
	for round := 0; round < 20; round++ {
		d, _ := NewDNS(DNSOptions{Replier: &captureReplier{got: make(chan struct{}, 1)}, Timeout: 10 * time.Millisecond})
		b, _ := query("www.example.test").Pack()
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for g := 0; g < 4; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					select {
					case <-stop:
						return
					default:
						d.HandleUDP(netip.MustParseAddrPort("100.96.0.2:5000"), netip.MustParseAddrPort("100.96.0.1:53"), b)
					}
				}
			}()
		}
		time.Sleep(2 * time.Millisecond)
		d.Close()
		close(stop)
		wg.Wait()
	}
}

// TestEchoPerDestinationCap: requests to one address stop at MaxPerDst
// while another address still gets through.
func TestEchoPerDestinationCap(t *testing.T) {
	if c, _, err := listenICMP(false); err != nil {
		t.Skipf("skipping: no ICMP socket (needs root or ping_group_range): %v", err)
	} else {
		c.Close()
	}
	r := &echoCapture{replies: make(chan echoReply, 64)}
	e := NewEcho(EchoOptions{Replier: r, MaxPerDst: 2})
	defer e.Close()
	src := netip.MustParseAddr("100.96.0.2")
	e.mu.Lock() // hold replies back: nothing leaves the table while we count
	e.perDst[netip.MustParseAddr("127.0.0.1")] = 2
	e.mu.Unlock()
	if e.Handle(src, netip.MustParseAddr("127.0.0.1"), 1, 1, nil) {
		t.Error("a third request to one address went out over MaxPerDst 2")
	}
	if !e.Handle(src, netip.MustParseAddr("127.0.0.2"), 1, 1, nil) {
		t.Error("a request to another address was refused")
	}
	if st := e.Stats(); st.Dropped != 1 {
		t.Errorf("dropped %d, want 1", st.Dropped)
	}
}

// TestDNSCache: a repeated query is answered from the cache (TTLs counted
// down), not upstream; a failure is never cached.
func TestDNSCache(t *testing.T) {
	up := newRecordingUpstream(t)
	d, _ := NewDNS(DNSOptions{Upstreams: []string{up.addr}, Timeout: time.Second})
	defer d.Close()
	for i := 0; i < 3; i++ {
		a := d.Resolve(context.Background(), netip.AddrPort{}, query("www.example.test"))
		if a.Rcode != dns.RcodeSuccess || len(a.Answer) != 1 || a.Answer[0].Header().Ttl > 60 {
			t.Fatalf("answer %d: %v", i, a)
		}
	}
	if n := len(up.queries()); n != 1 {
		t.Errorf("upstream saw %d queries, want 1", n)
	}
	if st := d.Stats(); st.CacheHits != 2 || st.Cached != 1 {
		t.Errorf("stats %+v", st)
	}
	up.mu.Lock()
	up.mangle = func(m *dns.Msg) { m.Rcode = dns.RcodeServerFailure; m.Answer = nil }
	up.mu.Unlock()
	for i := 0; i < 2; i++ {
		d.Resolve(context.Background(), netip.AddrPort{}, query("fail.example.test"))
	}
	if n := len(up.queries()); n != 3 {
		t.Errorf("upstream saw %d queries, want every SERVFAIL asked again (3)", n)
	}
}

// TestDNSFloodIsBounded: a flood of new names stops at the upstream rate
// and the in-flight cap, the cache stays within its tables, and a name
// already cached is still answered during it.
func TestDNSFloodIsBounded(t *testing.T) {
	up := newRecordingUpstream(t)
	r := &captureReplier{got: make(chan struct{}, 1)}
	d, _ := NewDNS(DNSOptions{Upstreams: []string{up.addr}, Replier: r, UpstreamRate: 50, MaxInFlight: 4, CacheSize: 8})
	defer d.Close()
	src, dst := netip.MustParseAddrPort("100.96.0.2:5000"), netip.MustParseAddrPort("100.96.0.1:53")
	known, _ := query("www.example.test").Pack()
	d.HandleUDP(src, dst, known)
	<-r.got
	for i := 0; i < 500; i++ {
		b, _ := query(fmt.Sprintf("r%d.flood.example.test", i)).Pack()
		d.HandleUDP(src, dst, b)
	}
	if !d.HandleUDP(src, dst, known) {
		t.Error("a cached name was not answered during the flood")
	}
	st := d.Stats()
	if st.RateLimited+st.Dropped < 400 || len(up.queries()) > 100 {
		t.Errorf("upstream saw %d queries; rate limited %d, dropped %d", len(up.queries()), st.RateLimited, st.Dropped)
	}
	deadline := time.Now().Add(2 * time.Second)
	for d.Stats().InFlight > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if st := d.Stats(); st.Cached > 8+2 {
		t.Errorf("%d answers cached, tables of 8 and 2", st.Cached)
	}
}

// TestDNSCacheSweepsExpired: answers that expire leave the cache on their
// own, without another query to push them out, and the table's map is made
// anew once it has emptied (a flood of random names otherwise left a full
// table of dead answers pinning the heap it had grown).
func TestDNSCacheSweepsExpired(t *testing.T) {
	defer func(d time.Duration) { sweepEvery = d }(sweepEvery)
	sweepEvery = 50 * time.Millisecond
	c := newDNSCache(64)
	defer c.close()
	for i := 0; i < 100; i++ {
		q := query(fmt.Sprintf("r%d.flood.example.test", i))
		a := new(dns.Msg)
		a.SetRcode(q, dns.RcodeNameError)
		a.Ns = []dns.RR{&dns.SOA{Hdr: dns.RR_Header{Name: "example.test.", Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: 1}, Minttl: 1}}
		c.put(q, a)
	}
	keep := query("www.example.test")
	a := new(dns.Msg)
	a.SetReply(keep)
	a.Answer = []dns.RR{&dns.A{Hdr: dns.RR_Header{Name: "www.example.test.", Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.IPv4(198, 51, 100, 10)}}
	c.put(keep, a)
	if n := c.len(); n != 17 { // 16 negative (a quarter of 64) and 1
		t.Fatalf("%d cached, want 17", n)
	}
	deadline := time.Now().Add(5 * time.Second)
	for c.len() > 1 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := c.len(); n != 1 || c.get(keep) == nil {
		t.Fatalf("%d cached after the negative answers expired, want the live one only", n)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.neg.peak != 0 || len(c.neg.m) != 0 {
		t.Errorf("negative table: peak %d, %d in map; want a new empty map", c.neg.peak, len(c.neg.m))
	}
	if c.sweep == nil {
		t.Error("no sweep pending while an entry is cached")
	}
}

// allowedUDP is a UDP flow allowed, in no table.
func allowedUDP(src, dst netip.AddrPort) *flow.Flow {
	return flow.Of(policy.Flow{Proto: policy.UDP, Src: src, Dst: dst}, policy.Decision{Action: policy.Allow})
}
