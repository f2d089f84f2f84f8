package proxy

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

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

// allowedUDP is a UDP flow allowed, in no table.
func allowedUDP(src, dst netip.AddrPort) *flow.Flow {
	return flow.Of(policy.Flow{Proto: policy.UDP, Src: src, Dst: dst}, policy.Decision{Action: policy.Allow})
}
