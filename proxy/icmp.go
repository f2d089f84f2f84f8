package proxy

import (
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
)

// EchoOptions configure the ICMP echo relay.
type EchoOptions struct {
	Replier     Replier
	Timeout     time.Duration // default 5 s
	MaxInFlight int           // default 64
	Log         *slog.Logger
}

// Echo relays the guest's echo requests to other hosts through ICMP sockets
// of the host (unprivileged datagram sockets where the host allows them, raw
// sockets otherwise) and hands the replies back with the guest's identifier
// and sequence number restored. Other ICMP types are never forwarded.
type Echo struct {
	o      EchoOptions
	sem    chan struct{}
	wg     sync.WaitGroup
	done   chan struct{}
	closed atomic.Bool

	sent, replied, timedOut, dropped atomic.Uint64
}

// NewEcho returns an echo relay.
func NewEcho(o EchoOptions) *Echo {
	if o.Timeout <= 0 {
		o.Timeout = 5 * time.Second
	}
	if o.MaxInFlight <= 0 {
		o.MaxInFlight = 64
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	return &Echo{o: o, sem: make(chan struct{}, o.MaxInFlight), done: make(chan struct{})}
}

// Handle relays one echo request from the guest at src to dst. It returns
// false when the request was dropped (too many in flight, relay closed).
func (e *Echo) Handle(src, dst netip.Addr, id, seq uint16, payload []byte) bool {
	if e.closed.Load() {
		return false
	}
	select {
	case e.sem <- struct{}{}:
	default:
		e.dropped.Add(1)
		return false
	}
	data := append([]byte(nil), payload...)
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		defer func() { <-e.sem }()
		e.relay(src, dst, id, seq, data)
	}()
	return true
}

func (e *Echo) relay(src, dst netip.Addr, id, seq uint16, data []byte) {
	v6 := dst.Is6()
	conn, raw, err := listenICMP(v6)
	if err != nil {
		e.o.Log.Warn("icmp socket", "err", err)
		e.dropped.Add(1)
		return
	}
	defer conn.Close()
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		select {
		case <-e.done:
			conn.SetReadDeadline(time.Now())
		case <-stop:
		}
	}()

	ourID := int(id)
	if raw {
		ourID = int(rand.Uint32() & 0xffff)
	}
	var typ icmp.Type = ipv4.ICMPTypeEcho
	if v6 {
		typ = ipv6.ICMPTypeEchoRequest
	}
	msg := icmp.Message{Type: typ, Body: &icmp.Echo{ID: ourID, Seq: int(seq), Data: data}}
	wb, err := msg.Marshal(nil)
	if err != nil {
		return
	}
	var to net.Addr = &net.IPAddr{IP: dst.AsSlice()}
	if !raw {
		to = &net.UDPAddr{IP: dst.AsSlice()}
	}
	if _, err := conn.WriteTo(wb, to); err != nil {
		e.dropped.Add(1)
		return
	}
	e.sent.Add(1)
	deadline := time.Now().Add(e.o.Timeout)
	_ = conn.SetReadDeadline(deadline)
	proto := 1
	if v6 {
		proto = 58
	}
	rb := make([]byte, 65536)
	for {
		n, from, err := conn.ReadFrom(rb)
		if err != nil {
			e.timedOut.Add(1)
			return
		}
		rm, err := icmp.ParseMessage(proto, rb[:n])
		if err != nil {
			continue
		}
		if rm.Type != ipv4.ICMPTypeEchoReply && rm.Type != ipv6.ICMPTypeEchoReply {
			continue
		}
		echo, ok := rm.Body.(*icmp.Echo)
		if !ok || echo.Seq != int(seq) {
			continue
		}
		if raw && (echo.ID != ourID || !sameIP(from, dst)) {
			continue
		}
		e.replied.Add(1)
		e.o.Replier.SendEchoReply(dst, src, id, seq, echo.Data)
		return
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
func listenICMP(v6 bool) (c *icmp.PacketConn, raw bool, err error) {
	dgram, rawNet, addr := "udp4", "ip4:icmp", "0.0.0.0"
	if v6 {
		dgram, rawNet, addr = "udp6", "ip6:ipv6-icmp", "::"
	}
	if c, err = icmp.ListenPacket(dgram, addr); err == nil {
		return c, false, nil
	}
	c, err2 := icmp.ListenPacket(rawNet, addr)
	if err2 != nil {
		return nil, false, err
	}
	return c, true, nil
}

// Close stops relaying and waits for requests in flight.
func (e *Echo) Close() {
	if e.closed.CompareAndSwap(false, true) {
		close(e.done)
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
	return EchoStats{InFlight: len(e.sem), Sent: e.sent.Load(), Replied: e.replied.Load(),
		TimedOut: e.timedOut.Load(), Dropped: e.dropped.Load()}
}
