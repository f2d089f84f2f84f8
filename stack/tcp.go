package stack

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/proxy"
	"github.com/msbtap/msbtap/tcpfast"
	"github.com/msbtap/msbtap/wire"
)

// forwarderWindow is the receive window offered to the guest on a new
// connection (Tailscale found 1 MiB a good default).
const forwarderWindow = 1 << 20

// maxInFlight bounds the guest handshakes gVisor's forwarder holds (each a
// goroutine) while their upstream dial runs; past it a SYN is dropped and
// the guest retransmits. Every request is completed on every path, so a
// slot is never lost. Pending dials have a smaller budget of their own
// (dials.go), so quick handshakes always find room.
const maxInFlight = 256

// tcpRelay completes the guest's TCP handshakes only after the upstream
// dial succeeded, then relays the streams.
type tcpRelay struct {
	st     *Stack
	active atomic.Int64 // established relays
	dials  *dialBudget
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex // mu protects conns, closed and wg.Add
	conns  map[*guestConn]struct{}
	closed bool
}

func newTCPRelay(st *Stack) *tcpRelay {
	t := &tcpRelay{st: st, conns: make(map[*guestConn]struct{}), dials: newDialBudget(st.o.MaxPendingDials)}
	t.ctx, t.cancel = context.WithCancel(context.Background())
	fwd := tcp.NewForwarder(st.s, forwarderWindow, maxInFlight, t.handle)
	st.s.SetTransportProtocolHandler(tcp.ProtocolNumber, fwd.HandlePacket)
	return t
}

// guestConn is the guest's end of a relayed connection; Reset aborts it
// with a RST.
type guestConn struct {
	*gonet.TCPConn
	ep tcpip.Endpoint
}

func (g *guestConn) Reset() { g.ep.Abort() }

func (t *tcpRelay) handle(r *tcp.ForwarderRequest) {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		r.Complete(true)
		return
	}
	t.wg.Add(1)
	t.mu.Unlock()
	defer t.wg.Done()
	st := t.st
	id := r.ID()
	dst := netip.AddrPortFrom(wire.NetipAddr(id.LocalAddress), id.LocalPort)
	src := netip.AddrPortFrom(wire.NetipAddr(id.RemoteAddress), id.RemotePort)

	if dst.Port() == wire.PortDNS {
		t.serveDNS(r, src)
		return
	}
	fl, ok := t.decided(r, src, dst)
	if !ok {
		return
	}
	if t.active.Load() >= int64(st.o.MaxConnections) {
		st.stats.overCap.Add(1)
		r.Complete(true)
		return
	}
	if st.cut.Load() || !st.dialAllowed(fl) { // an ask answered after a cut dials nothing
		r.Complete(true)
		return
	}
	pd, ctx, err := t.dials.acquire(t.ctx, dst.Addr())
	if err != nil {
		st.stats.dialRefused.Add(1)
		st.o.Log.Debug("tcp dial refused", "src", src, "dst", dst, "err", err)
		r.Complete(true)
		return
	}
	up, err := st.dialUp(ctx, fl)
	t.dials.release(pd, err)
	if err != nil {
		st.stats.dialFailed.Add(1)
		st.o.Log.Debug("tcp dial failed", "src", src, "dst", dst, "err", err)
		r.Complete(true)
		return
	}
	if st.cut.Load() { // cut while it dialled (the table resets one that slips past this)
		up.Close()
		r.Complete(true)
		return
	}
	// Established connections have their cap; pending dials had theirs.
	if t.active.Add(1) > int64(st.o.MaxConnections) {
		t.active.Add(-1)
		st.stats.overCap.Add(1)
		up.Close()
		r.Complete(true)
		return
	}
	defer t.active.Add(-1)
	c, ok := t.accept(r)
	if !ok {
		up.Close()
		return
	}
	st.stats.total.Add(1)
	t.track(c, true)
	defer t.track(c, false)
	fl.Open(func() { c.Reset(); proxy.ResetConn(up) })
	defer fl.Close()
	if st.o.HandleTCP != nil && st.o.WantsTCP(fl) {
		err = st.o.HandleTCP(t.ctx, fl, c, up)
	} else {
		_, _, err = proxy.Relay(c, up, &fl.Up, &fl.Down)
	}
	if err != nil {
		st.stats.relayFailed.Add(1)
		st.o.Log.Debug("tcp relay ended with an error", "src", src, "dst", dst, "err", err)
	}
}

// serveDNS answers DNS over TCP itself: a small cap of its own, not the
// relayed connections'.
func (t *tcpRelay) serveDNS(r *tcp.ForwarderRequest, src netip.AddrPort) {
	release, ok := t.st.dns.TryTCP()
	if !ok {
		r.Complete(true)
		return
	}
	defer release()
	c, ok := t.accept(r)
	if !ok {
		return
	}
	t.track(c, true)
	defer t.track(c, false)
	t.st.dns.ServeTCP(c, src)
}

// decided returns the flow of the connection the forwarder hands over,
// decided at its SYN, with an ask answered; it completes the request
// itself when the flow may not go on. A SYN whose record is gone (it
// waited in the forwarder longer than the table keeps one) is decided
// again, as a new flow.
func (t *tcpRelay) decided(r *tcp.ForwarderRequest, src, dst netip.AddrPort) (*flow.Flow, bool) {
	st := t.st
	// Taken at once: the dial that follows may take seconds, longer than
	// the table keeps a record.
	fl, ok := st.syns.take(synKey{src, dst})
	if !ok {
		if fl = st.decide(policy.Flow{Proto: policy.TCP, Src: src, Dst: dst}); !fl.Allowed() {
			// Refused, or an ask with no record of its SYN to hold it by.
			r.Complete(true)
			return nil, false
		}
		return fl, true
	}
	if fl.Decision.Action == policy.Ask {
		// Held: no SYN-ACK and no dial until the question is answered;
		// the forwarder drops the guest's retransmitted SYNs meanwhile.
		fl.Decision = st.o.Ask(t.ctx, fl.Flow, fl.Decision)
		st.report(fl)
		if !fl.Allowed() {
			r.Complete(st.o.DenyMode == DenyReject) // completed either way: the forwarder's slot is freed
			return nil, false
		}
	}
	return fl, true
}

// MapDst returns the host address a TCP flow to a is dialed at (the
// gateway's addresses map to the host's loopback).
func (st *Stack) MapDst(a netip.AddrPort) netip.AddrPort { return st.o.MapDst(a) }

// dialUp opens the upstream connection of the allowed TCP flow f: through
// Options.Dial when set (the upstream proxy), else directly. Every relayed
// TCP flow's host side is opened here, so that nothing bypasses the hook.
func (st *Stack) dialUp(ctx context.Context, fl *flow.Flow) (net.Conn, error) {
	to := st.o.MapDst(fl.Dst)
	ctx, cancel := context.WithTimeout(ctx, st.o.DialTimeout)
	defer cancel()
	if st.o.Dial != nil {
		return st.o.Dial(ctx, fl, to)
	}
	nd := net.Dialer{KeepAlive: 30 * time.Second}
	return nd.DialContext(ctx, "tcp", to.String())
}

// accept completes the guest's handshake and returns its connection; on
// failure it resets the guest.
func (t *tcpRelay) accept(r *tcp.ForwarderRequest) (*guestConn, bool) {
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		r.Complete(true)
		return nil, false
	}
	r.Complete(false)
	so := ep.SocketOptions()
	so.SetKeepAlive(true)
	idle := tcpip.KeepaliveIdleOption(60 * time.Second)
	intvl := tcpip.KeepaliveIntervalOption(15 * time.Second)
	_ = ep.SetSockOpt(&idle)
	_ = ep.SetSockOpt(&intvl)
	return &guestConn{TCPConn: gonet.NewTCPConn(&wq, ep), ep: ep}, true
}

func (t *tcpRelay) track(c *guestConn, add bool) {
	t.mu.Lock()
	if add {
		t.conns[c] = struct{}{}
	} else {
		delete(t.conns, c)
	}
	t.mu.Unlock()
}

// close cancels pending dials and resets every relayed connection; new
// handshakes are refused from now on.
func (t *tcpRelay) close() {
	t.cancel()
	t.mu.Lock()
	t.closed = true
	t.mu.Unlock()
	t.resetAll()
}

// resetAll resets every relayed connection, both ends.
func (t *tcpRelay) resetAll() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for c := range t.conns {
		c.Reset()
		c.Close()
	}
}

func (t *tcpRelay) wait() { t.wg.Wait() }

// fastEligible says whether a TCP flow takes the fast path: one the
// policy allowed outright (an ask is held in the forwarder until its
// answer), which the agent has no need to read (no name check, domain deny
// rule to enforce, HTTP rule, secret or interception), while no rate paces
// the sandbox (pacing is the relay's).
func (st *Stack) fastEligible(fl *flow.Flow) bool {
	if st.fast == nil || !fl.Allowed() {
		return false
	}
	if st.o.HandleTCP != nil && st.o.WantsTCP != nil && st.o.WantsTCP(fl) {
		return false
	}
	return st.up.Rate() <= 0 && st.down.Rate() <= 0
}

// openFast opens an allowed flow on the fast path at its SYN: the same
// checks as the relay's (dial time, --max-connections), the flow in the
// table with its meters, reset both ways by flows close and revocation.
func (st *Stack) openFast(p *wire.Packet, seg wire.TCPSegment, fl *flow.Flow) {
	if !st.dialAllowed(fl) {
		st.r.sendTCPReset(p, seg)
		return
	}
	t := st.tcp
	if t.active.Add(1) > int64(st.o.MaxConnections) {
		t.active.Add(-1)
		st.stats.overCap.Add(1)
		st.r.sendTCPReset(p, seg)
		return
	}
	// A reset (flows close, revocation, a cut) may come before the
	// translator has the connection: it is remembered, and the opener
	// resets the connection once it has it.
	var h atomic.Pointer[tcpfast.Conn]
	var ended atomic.Bool
	fl.Open(func() {
		ended.Store(true)
		if c := h.Load(); c != nil {
			c.Reset()
		}
	})
	done := func() {
		fl.Close()
		t.active.Add(-1)
	}
	c, err := st.fast.Open(p, seg, tcpfast.Flow{Dial: st.o.MapDst(fl.Dst), Up: &fl.Up.Bytes, Down: &fl.Down.Bytes, Done: done})
	if err != nil {
		done()
		st.o.Log.Debug("fast path: tcp open failed", "src", fl.Src, "dst", fl.Dst, "err", err)
		if !errors.Is(err, tcpfast.ErrRefused) { // a refusal is in the translator's counts, and was answered
			st.stats.dialFailed.Add(1)
			st.r.sendTCPReset(p, seg)
		}
		return
	}
	h.Store(c)
	if ended.Load() || st.cut.Load() { // the translator's ResetAll may have run before it had c
		c.Reset()
		return
	}
	st.stats.total.Add(1)
	st.o.Log.Debug("tcp flow on the fast path", "id", fl.ID, "src", fl.Src, "dst", fl.Dst)
}
