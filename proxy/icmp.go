package proxy

import (
	"errors"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"

	"github.com/msbtap/msbtap/internal/sockopt"
)

// EchoOptions configure the ICMP echo relay.
type EchoOptions struct {
	Replier Replier
	// Timeout drops a request nobody answered (default 5 s).
	Timeout time.Duration
	// MaxInFlight caps requests waiting for their reply (default 64), and
	// MaxPerDst those to one address (default 8), so that a flood toward
	// one host leaves room for pings to others.
	MaxInFlight, MaxPerDst int
	Log                    *slog.Logger
}

// Echo relays the guest's echo requests to other hosts through one ICMP
// socket of the host per address family (an unprivileged datagram socket
// where the host allows them, a raw socket otherwise). Each request gets a
// sequence number of the relay's own; a reply is matched by it (and, on a
// raw socket, by the relay's identifier and the address it came from) and
// handed back with the guest's identifier and sequence number restored.
// Other ICMP types are never forwarded.
type Echo struct {
	o      EchoOptions
	closed atomic.Bool
	done   chan struct{}
	wg     sync.WaitGroup

	mu      sync.Mutex // mu protects socks, pending, perDst and nextSeq
	socks   [2]*echoSocket
	pending map[echoKey]*echoRequest
	perDst  map[netip.Addr]int
	nextSeq [2]uint16

	sent, replied, timedOut, dropped atomic.Uint64
}

// echoKey finds a request by address family and the relay's sequence.
type echoKey struct {
	v6  bool
	seq uint16
}

type echoRequest struct {
	src, dst netip.Addr
	id, seq  uint16 // the guest's
	deadline time.Time
}

type echoSocket struct {
	conn  net.PacketConn
	raw   bool // raw sockets see every ICMP message: match our identifier
	ident int
}

// NewEcho returns an echo relay. Its sockets open at the first request.
func NewEcho(o EchoOptions) *Echo {
	if o.Timeout <= 0 {
		o.Timeout = 5 * time.Second
	}
	if o.MaxInFlight <= 0 {
		o.MaxInFlight = 64
	}
	if o.MaxPerDst <= 0 {
		o.MaxPerDst = min(8, o.MaxInFlight)
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	return &Echo{o: o, done: make(chan struct{}), pending: make(map[echoKey]*echoRequest), perDst: make(map[netip.Addr]int)}
}

func family(v6 bool) int {
	if v6 {
		return 1
	}
	return 0
}

// Handle relays one echo request from the guest at src to dst. It returns
// false when the request was dropped (too many in flight, no socket, relay
// closed).
func (e *Echo) Handle(src, dst netip.Addr, id, seq uint16, payload []byte) bool {
	if e.closed.Load() {
		return false
	}
	v6 := dst.Is6()
	e.mu.Lock()
	if len(e.pending) >= e.o.MaxInFlight || e.perDst[dst] >= e.o.MaxPerDst {
		e.mu.Unlock()
		e.dropped.Add(1)
		return false
	}
	sock, err := e.socketLocked(v6)
	if err != nil {
		e.mu.Unlock()
		e.o.Log.Warn("icmp socket", "err", err)
		e.dropped.Add(1)
		return false
	}
	var k echoKey
	for {
		k = echoKey{v6, e.nextSeq[family(v6)]}
		e.nextSeq[family(v6)]++
		if e.pending[k] == nil {
			break // MaxInFlight < 65536: a free one comes soon
		}
	}
	e.pending[k] = &echoRequest{src: src, dst: dst, id: id, seq: seq, deadline: time.Now().Add(e.o.Timeout)}
	e.perDst[dst]++
	e.mu.Unlock()

	var typ icmp.Type = ipv4.ICMPTypeEcho
	if v6 {
		typ = ipv6.ICMPTypeEchoRequest
	}
	// Marshal copies payload; the guest's frame goes back to the pool.
	wb, err := (&icmp.Message{Type: typ, Body: &icmp.Echo{ID: sock.ident, Seq: int(k.seq), Data: payload}}).Marshal(nil)
	var to net.Addr = &net.IPAddr{IP: dst.AsSlice()}
	if !sock.raw {
		to = &net.UDPAddr{IP: dst.AsSlice()}
	}
	if err == nil {
		_, err = sock.conn.WriteTo(wb, to)
	}
	if err != nil {
		e.mu.Lock()
		e.forgetLocked(k)
		e.mu.Unlock()
		e.dropped.Add(1)
		return false
	}
	e.sent.Add(1)
	return true
}

// socketLocked returns the family's socket, opening it (and its reader and
// sweeper) on first use.
func (e *Echo) socketLocked(v6 bool) (*echoSocket, error) {
	f := family(v6)
	if s := e.socks[f]; s != nil {
		return s, nil
	}
	if e.closed.Load() { // Close already closed the sockets it saw
		return nil, net.ErrClosed
	}
	conn, raw, err := listenICMP(v6)
	if err != nil {
		return nil, err
	}
	s := &echoSocket{conn: conn, raw: raw}
	if raw {
		s.ident = int(rand.Uint32() & 0xffff)
	}
	e.socks[f] = s
	first := e.socks[1-f] == nil
	e.wg.Add(1)
	go e.routineReplies(s, v6)
	if first {
		e.wg.Add(1)
		go e.routineSweep()
	}
	return s, nil
}

// routineReplies reads the socket's ICMP messages and hands each echo reply
// that answers a pending request to the guest.
func (e *Echo) routineReplies(s *echoSocket, v6 bool) {
	defer e.wg.Done()
	proto := 1
	if v6 {
		proto = 58
	}
	rb := make([]byte, 65536)
	for {
		n, from, err := s.conn.ReadFrom(rb)
		if err != nil {
			if errors.Is(err, net.ErrClosed) || e.closed.Load() {
				return
			}
			continue
		}
		rm, err := icmp.ParseMessage(proto, rb[:n])
		if err != nil || (rm.Type != ipv4.ICMPTypeEchoReply && rm.Type != ipv6.ICMPTypeEchoReply) {
			continue
		}
		echo, ok := rm.Body.(*icmp.Echo)
		if !ok || (s.raw && echo.ID != s.ident) {
			continue
		}
		k := echoKey{v6, uint16(echo.Seq)}
		e.mu.Lock()
		r := e.pending[k]
		if r == nil || !sameIP(from, r.dst) {
			e.mu.Unlock()
			continue
		}
		e.forgetLocked(k)
		e.mu.Unlock()
		e.replied.Add(1)
		e.o.Replier.SendEchoReply(r.dst, r.src, r.id, r.seq, echo.Data)
	}
}

// routineSweep forgets requests nobody answered in time.
func (e *Echo) routineSweep() {
	defer e.wg.Done()
	t := time.NewTicker(e.o.Timeout / 5)
	defer t.Stop()
	for {
		select {
		case <-e.done:
			return
		case now := <-t.C:
			e.mu.Lock()
			for k, r := range e.pending {
				if now.After(r.deadline) {
					e.forgetLocked(k)
					e.timedOut.Add(1)
				}
			}
			e.mu.Unlock()
		}
	}
}

func sameIP(a net.Addr, want netip.Addr) bool {
	var ip net.IP
	switch a := a.(type) {
	case *net.IPAddr:
		ip = a.IP
	case *net.UDPAddr:
		ip = a.IP
	default:
		return false
	}
	got, ok := netip.AddrFromSlice(ip)
	return ok && got.Unmap() == want.Unmap()
}

// listenICMP opens an unprivileged ICMP socket, or a raw one when the host's
// ping_group_range does not allow the former. raw says which it got.
func listenICMP(v6 bool) (c net.PacketConn, raw bool, err error) {
	dgram, rawNet, addr := "udp4", "ip4:icmp", "0.0.0.0"
	if v6 {
		dgram, rawNet, addr = "udp6", "ip6:ipv6-icmp", "::"
	}
	// icmp.ListenPacket opens the datagram kind with a plain socket(2),
	// without Go's SO_BROADCAST; the raw kind would come from the net
	// package, which sets it, so it is opened here without. On Linux both
	// read and write ICMP messages alone (the IPv4 header stripped).
	if c, err = icmp.ListenPacket(dgram, addr); err == nil {
		return c, false, nil
	}
	c, err2 := sockopt.ListenPacket(rawNet, addr)
	if err2 != nil {
		return nil, false, err
	}
	return c, true, nil
}

// forgetLocked drops request k.
func (e *Echo) forgetLocked(k echoKey) {
	if r := e.pending[k]; r != nil {
		delete(e.pending, k)
		if e.perDst[r.dst]--; e.perDst[r.dst] <= 0 {
			delete(e.perDst, r.dst)
		}
	}
}

// Forget drops every request in flight: their replies, if any come, are
// not delivered.
func (e *Echo) Forget() {
	e.mu.Lock()
	clear(e.pending)
	clear(e.perDst)
	e.mu.Unlock()
}

// Close stops relaying: the sockets close and their goroutines end.
func (e *Echo) Close() {
	if e.closed.CompareAndSwap(false, true) {
		close(e.done)
		e.mu.Lock()
		for _, s := range e.socks {
			if s != nil {
				s.conn.Close()
			}
		}
		e.mu.Unlock()
	}
	e.wg.Wait()
}

// EchoStats are the echo relay's counters.
type EchoStats struct {
	// InFlight requests wait for their reply now.
	InFlight int
	// Sent requests, Replied ones, ones TimedOut, and ones Dropped (too
	// many in flight, no socket, send failed).
	Sent, Replied, TimedOut, Dropped uint64
}

// Stats returns the relay's counters.
func (e *Echo) Stats() EchoStats {
	e.mu.Lock()
	n := len(e.pending)
	e.mu.Unlock()
	return EchoStats{InFlight: n, Sent: e.sent.Load(), Replied: e.replied.Load(),
		TimedOut: e.timedOut.Load(), Dropped: e.dropped.Load()}
}
