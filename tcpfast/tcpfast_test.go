package tcpfast

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

var (
	remote4 = netip.MustParseAddrPort("198.51.100.7:80")
	remote6 = netip.MustParseAddrPort("[2001:db8::7]:80")
)

// pattern is n pseudo-random bytes from seed.
func pattern(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

// sumServer reads to EOF, answers with the SHA-256 of what it read and then
// n bytes of pattern(seed), and closes.
func sumServer(n int, seed uint64) func(c *net.TCPConn) {
	return func(c *net.TCPConn) {
		h := sha256.New()
		if _, err := io.Copy(h, c); err != nil {
			return
		}
		c.Write(h.Sum(nil))
		c.Write(pattern(seed, n))
	}
}

// bulk sends up bytes from the guest, half-closes, and reads the server's
// digest and down bytes back.
func bulk(t *testing.T, w *world, dst netip.AddrPort, up, down int, seed uint64) {
	t.Helper()
	c, err := w.dialGuest(dst)
	if err != nil {
		t.Fatalf("%s: dial: %v", dst, err)
	}
	defer c.Close()
	payload := pattern(seed+1, up)
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		if err == nil {
			err = c.CloseWrite()
		}
		errc <- err
	}()
	c.SetReadDeadline(time.Now().Add(60 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("%s: read: %v (got %d bytes); %+v\n%s", dst, err, len(got), w.tr.Stats(), w.tr.Debug())
	}
	if err := <-errc; err != nil {
		t.Fatalf("%s: write: %v", dst, err)
	}
	want := sha256.Sum256(payload)
	if len(got) < 32 || !bytes.Equal(got[:32], want[:]) {
		t.Fatalf("%s: the server got other bytes than the guest sent (%d bytes back)", dst, len(got))
	}
	if !bytes.Equal(got[32:], pattern(seed, down)) {
		t.Fatalf("%s: the guest got %d bytes, not the server's %d", dst, len(got)-32, down)
	}
}

func TestBulkBothWays(t *testing.T) {
	for _, tc := range []struct {
		name    string
		network string
		dst     netip.AddrPort
		mtu     int
		offload bool
	}{
		{"ipv4-1500", "tcp4", remote4, 1500, false},
		{"ipv6-1500", "tcp6", remote6, 1500, false},
		{"ipv4-1280", "tcp4", remote4, 1280, false},
		{"ipv4-9000", "tcp4", remote4, 9000, false},
		{"ipv6-65520", "tcp6", remote6, 65520, false},
		{"ipv4-65520-offload", "tcp4", remote4, 65520, true}, // one segment per GSO frame
	} {
		t.Run(tc.name, func(t *testing.T) {
			const n = 8 << 20
			srv := listen(t, tc.network, sumServer(n, 7))
			w := newWorld(t, srv, worldOpts{mtu: tc.mtu, offload: tc.offload})
			bulk(t, w, tc.dst, n, n, 7)
			w.waitEnded(1)
			if up, down := w.up.Load(), w.down.Load(); up != n || down != n+32 {
				t.Errorf("meters: up %d down %d, want %d and %d", up, down, n, n+32)
			}
			if a := w.tr.Active(); a != 0 {
				// closed connections linger a moment, then go
				time.Sleep(lingerTime + 100*time.Millisecond)
				if a := w.tr.Active(); a != 0 {
					t.Errorf("%d connections left in the translator", a)
				}
			}
		})
	}
}

// TestLossReorderDuplication: frames dropped, duplicated or reordered
// between the guest and the translator, each way and all at once; every
// byte arrives once, in order.
func TestLossReorderDuplication(t *testing.T) {
	for _, tc := range []struct {
		name          string
		toTr, toGuest *fault
	}{
		// gVisor's TCP as the guest recovers from a lost frame of its own
		// (no SACK: New Reno) with a timeout when a window loses more than
		// one: its loss rates stay low.
		{"drop-to-translator", &fault{drop: 0.002}, nil},
		{"drop-to-guest", nil, &fault{drop: 0.02}},
		{"dup-to-translator", &fault{dup: 0.02}, nil},
		{"dup-to-guest", nil, &fault{dup: 0.02}},
		{"reorder-to-translator", &fault{reorder: 0.03}, nil},
		{"reorder-to-guest", nil, &fault{reorder: 0.03}},
		{"all-both-ways", &fault{drop: 0.002, dup: 0.01, reorder: 0.01}, &fault{drop: 0.005, dup: 0.01, reorder: 0.01}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const n = 2 << 20
			srv := listen(t, "tcp4", sumServer(n, 11))
			w := newWorld(t, srv, worldOpts{toTr: tc.toTr, toGuest: tc.toGuest})
			bulk(t, w, remote4, n, n, 11)
			w.waitEnded(1)
			st := w.tr.Stats()
			t.Logf("stats %+v", st)
			if tc.toGuest != nil && tc.toGuest.n.Load() == 0 || tc.toTr != nil && tc.toTr.n.Load() == 0 {
				t.Errorf("no fault injected")
			}
			if tc.toGuest != nil && tc.toGuest.drop > 0 && st.Retransmits == 0 {
				t.Errorf("frames to the guest lost and nothing retransmitted: %+v", st)
			}
			if up, down := w.up.Load(), w.down.Load(); up != n || down != n+32 {
				t.Errorf("meters: up %d down %d, want %d and %d: a byte counted twice", up, down, n, n+32)
			}
			if st.HeldBytes != 0 {
				t.Errorf("%d bytes still held with the connection over", st.HeldBytes)
			}
		})
	}
}

// TestServerClosesFirst: the server sends and half-closes before reading;
// the guest reads to EOF, then sends, and the server sees it all.
func TestServerClosesFirst(t *testing.T) {
	const n = 1 << 20
	got := make(chan []byte, 1)
	srv := listen(t, "tcp4", func(c *net.TCPConn) {
		c.Write(pattern(3, n))
		c.CloseWrite()
		b, _ := io.ReadAll(c)
		got <- b
	})
	w := newWorld(t, srv, worldOpts{})
	c, err := w.dialGuest(remote4)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(b, pattern(3, n)) {
		t.Fatalf("guest read %d bytes, err %v", len(b), err)
	}
	// Half-closed by the server: the guest still sends.
	if _, err := c.Write(pattern(4, n)); err != nil {
		t.Fatal(err)
	}
	c.CloseWrite()
	select {
	case b := <-got:
		if !bytes.Equal(b, pattern(4, n)) {
			t.Fatalf("server read %d bytes, not the guest's %d", len(b), n)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the server never got the guest's bytes and FIN")
	}
	w.waitEnded(1)
}

func TestRefusedConnect(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	w := newWorld(t, closed, worldOpts{})
	start := time.Now()
	_, err = w.dialGuest(remote4)
	if err == nil || !strings.Contains(err.Error(), "refused") {
		t.Fatalf("dial: %v, want connection refused", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("refused after %s", d)
	}
	if st := w.tr.Stats(); st.Refused != 1 {
		t.Errorf("stats: %+v, want one refusal", st)
	}
}

// TestResetFromServer: a server that aborts (SO_LINGER 0) resets the
// guest's connection.
func TestResetFromServer(t *testing.T) {
	srv := listen(t, "tcp4", func(c *net.TCPConn) {
		b := make([]byte, 5)
		io.ReadFull(c, b)
		c.SetLinger(0)
	})
	w := newWorld(t, srv, worldOpts{})
	c, err := w.dialGuest(remote4)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("hello"))
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = c.Read(make([]byte, 10))
	if err == nil || !strings.Contains(err.Error(), "reset") {
		t.Fatalf("guest read: %v, want connection reset", err)
	}
	w.waitEnded(1)
}

// TestResetFromGuest: the guest aborting its side resets the server's.
func TestResetFromGuest(t *testing.T) {
	res := make(chan error, 1)
	srv := listen(t, "tcp4", func(c *net.TCPConn) {
		c.Write(pattern(1, 1<<20)) // the guest reads none of it
		_, err := io.ReadAll(c)
		res <- err
	})
	w := newWorld(t, srv, worldOpts{})
	c, err := w.dialGuest(remote4)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	c.Close() // unread data: gVisor, as Linux, resets
	select {
	case err := <-res:
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("server read: %v, want ECONNRESET", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the server was never reset")
	}
	w.waitEnded(1)
}

// TestResetBothWays: Conn.Reset (flows close, revocation) resets the guest
// and the server.
func TestResetBothWays(t *testing.T) {
	res := make(chan error, 1)
	srv := listen(t, "tcp6", func(c *net.TCPConn) {
		_, err := io.ReadAll(c)
		res <- err
	})
	w := newWorld(t, srv, worldOpts{})
	c, err := w.dialGuest(remote6)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("x"))
	time.Sleep(50 * time.Millisecond)
	w.mu.Lock()
	h := w.conns[0]
	w.mu.Unlock()
	h.Reset()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || !strings.Contains(err.Error(), "reset") {
		t.Fatalf("guest read: %v, want reset", err)
	}
	select {
	case err := <-res:
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("server read: %v, want ECONNRESET", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the server was never reset")
	}
	w.waitEnded(1)
}

// TestZeroWindowGuestReader: a guest that stops reading shuts its window;
// the data waits in the host socket and all of it arrives once it reads.
func TestZeroWindowGuestReader(t *testing.T) {
	const n = 8 << 20
	srv := listen(t, "tcp4", func(c *net.TCPConn) { c.Write(pattern(5, n)) })
	w := newWorld(t, srv, worldOpts{guestRcvBuf: 64 << 10})
	c, err := w.dialGuest(remote4)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	time.Sleep(2 * time.Second) // the window is shut meanwhile
	if d := w.down.Load(); d >= n {
		t.Fatalf("the guest got %d bytes without reading", d)
	}
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(b, pattern(5, n)) {
		t.Fatalf("guest read %d of %d bytes, err %v", len(b), n, err)
	}
}

// TestZeroWindowServerReader: a server that stops reading fills its
// socket; the guest is held by the window, and everything arrives.
func TestZeroWindowServerReader(t *testing.T) {
	const n = 16 << 20
	got := make(chan []byte, 1)
	srv := listen(t, "tcp4", func(c *net.TCPConn) {
		c.SetReadBuffer(64 << 10)
		time.Sleep(2 * time.Second)
		b, _ := io.ReadAll(c)
		got <- b
	})
	w := newWorld(t, srv, worldOpts{})
	c, err := w.dialGuest(remote4)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(pattern(6, n))
		if err == nil {
			err = c.CloseWrite()
		}
		errc <- err
	}()
	select {
	case b := <-got:
		if !bytes.Equal(b, pattern(6, n)) {
			t.Fatalf("server read %d of %d bytes", len(b), n)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the server never got everything")
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// TestKeepaliveAnswered: the guest's keepalive probes get ACKs, so an idle
// connection outlives the probes' count.
func TestKeepaliveAnswered(t *testing.T) {
	srv := listen(t, "tcp4", func(c *net.TCPConn) { io.Copy(c, c) })
	w := newWorld(t, srv, worldOpts{})
	c, err := w.dialKeepalive(remote4)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("ping"))
	b := make([]byte, 4)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatal(err)
	}
	// Keepalive: idle 1 s, interval 1 s, 2 probes unanswered end it.
	before := w.tr.Stats().SegmentsFromGuest
	time.Sleep(4 * time.Second)
	after := w.tr.Stats().SegmentsFromGuest
	if after-before < 2 {
		t.Errorf("%d segments from the idle guest, want keepalive probes", after-before)
	}
	c.Write([]byte("pong"))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "pong" {
		t.Fatalf("after the probes: %q %v", b, err)
	}
}

// TestEndedConnectionsLeaveTheTick: connections that are over linger for
// stray segments outside the tick's round (a connection rate of thousands
// a second would otherwise have the tick visit thousands), and are
// forgotten once their time is out.
func TestEndedConnectionsLeaveTheTick(t *testing.T) {
	const n = 20
	ends := make(chan error, n)
	srv := listen(t, "tcp4", func(c *net.TCPConn) {
		b := make([]byte, 5)
		if _, err := io.ReadFull(c, b); err != nil {
			ends <- err
			return
		}
		c.Write(b)
		_, err := io.ReadAll(c) // to the guest's FIN
		ends <- err
	})
	w := newWorld(t, srv, worldOpts{})
	for i := 0; i < n; i++ {
		c, err := w.dialGuest(remote4)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		c.Write([]byte("hello"))
		b := make([]byte, 5)
		if _, err := io.ReadFull(c, b); err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	for i := 0; i < n; i++ {
		select {
		case err := <-ends:
			if err != nil {
				t.Errorf("server: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("a server never saw the guest's FIN")
		}
	}
	w.waitEnded(n)
	w.tr.mu.Lock()
	live, lingering, known := len(w.tr.live), w.tr.lingerq.len(), len(w.tr.conns)
	w.tr.mu.Unlock()
	if live != 0 || lingering != known || known == 0 {
		t.Errorf("after %d ended: %d in the tick's round, %d lingering, %d known", n, live, lingering, known)
	}
	deadline := time.Now().Add(lingerTime + 2*time.Second)
	for w.tr.Active() > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d connections still known %s after they ended", w.tr.Active(), lingerTime+2*time.Second)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// fullListener is a loopback listener whose accept queue is full (backlog
// 0, one connection never accepted): a connect to it stays under way, its
// SYNs dropped, as to a host that never answers.
func fullListener(t *testing.T) netip.AddrPort {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(sa.(*unix.SockaddrInet4).Port))
	c, err := net.DialTimeout("tcp4", addr.String(), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return addr
}

// TestConnectsUnderWayAreCapped: past MaxConnecting host connects under
// way, a new one resets the oldest (a SYN flood at addresses that never
// answer cannot hold every connection the sandbox may have), and the
// guest of the one reset sees it at once.
func TestConnectsUnderWayAreCapped(t *testing.T) {
	w := newWorld(t, fullListener(t), worldOpts{maxConnecting: 2})
	errs := make(chan error, 3)
	for i := 0; i < 3; i++ {
		go func() {
			c, err := w.dialGuest(remote4)
			if err == nil {
				c.Close()
			}
			errs <- err
		}()
		time.Sleep(200 * time.Millisecond) // in this order: the first is the oldest
	}
	select {
	case err := <-errs:
		if err == nil {
			t.Fatal("a connect to a full listener succeeded")
		}
	case <-time.After(3 * time.Second):
		t.Fatalf("no connect reset past the cap (evicted %d)", w.tr.Stats().Evicted)
	}
	if s := w.tr.Stats(); s.Evicted != 1 {
		t.Errorf("%d connects evicted, want 1", s.Evicted)
	}
	w.tr.mu.Lock()
	n := w.tr.nConnecting
	w.tr.mu.Unlock()
	if n != 2 {
		t.Errorf("%d connects under way, want 2", n)
	}
}
