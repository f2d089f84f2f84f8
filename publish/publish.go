// Package publish serves the sandbox's published ports: host listeners
// and sockets whose clients are relayed to a port of the guest, through the
// ingress policy.
package publish

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/internal/fielderr"
	"github.com/msbtap/msbtap/internal/portspec"
	"github.com/msbtap/msbtap/internal/sockopt"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/proxy"
)

// Options connect published ports to the sandbox.
type Options struct {
	// DialGuest connects to the guest's port through the netstack, at its
	// IPv6 address or its IPv4 one.
	DialGuest func(ctx context.Context, port uint16, v6 bool) (net.Conn, error)
	// SendToGuest delivers a datagram to the guest's port (at its IPv6 or
	// IPv4 address), from the gateway's port gwPort.
	SendToGuest func(gwPort, guestPort uint16, v6 bool, payload []byte) bool
	// Allow decides a new host client (the ingress policy) and returns its
	// flow: a TCP client's is open in its table while it is relayed, its
	// meters counting (up: from the host client into the sandbox).
	Allow func(proto policy.Proto, client, listen netip.AddrPort) *flow.Flow
	// UDPIdleTimeout ends idle UDP client sessions (default 60 s).
	UDPIdleTimeout time.Duration
	// DialTimeout bounds the connection to the guest (default 10 s).
	DialTimeout time.Duration
	Log         *slog.Logger
}

// Ports serves published ports: a host listener per TCP port, a host
// socket per UDP port, relaying each client to the guest.
type Ports struct {
	specs []portspec.Spec
	tcp   []net.Listener
	udp   []*net.UDPConn
	o     Options

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex // mu protects conns, sessions, byGwPort, nextPort
	conns    map[net.Conn]struct{}
	sessions map[udpClientKey]*ingressSession
	byGwPort map[uint16]*ingressSession
	nextPort uint16

	accepted, denied, failed atomic.Uint64
}

type udpClientKey struct {
	listen int
	client netip.AddrPort
}

type ingressSession struct {
	key       udpClientKey
	sock      *net.UDPConn
	gwPort    uint16
	guestPort uint16
	v6        bool
	lastSeen  atomic.Int64
	// fl is the client's flow: listed, closed and revoked like any, its
	// meters counting and pacing the datagrams (Up: into the sandbox).
	fl *flow.Flow
}

// ErrGuestRefused means nothing listens on the guest's port at that address
// (the guest answered the connection with a reset).
var ErrGuestRefused = errors.New("guest refused the connection")

// Ingress UDP sessions use gateway ports from this range.
const (
	ingressPortFirst = 61000
	ingressPortLast  = 65535
)

// Listen opens every host socket first, so that a port in use or a
// bad address fails start-up with nothing half-started.
func Listen(specs []portspec.Spec) (*Ports, error) {
	p := &Ports{specs: specs}
	fail := func(err error) (*Ports, error) {
		p.closeSockets()
		return nil, err
	}
	for _, s := range specs {
		switch s.Proto {
		case "tcp":
			ln, err := net.Listen("tcp", s.Host.String())
			if err != nil {
				return fail(publishErr(s, err))
			}
			p.tcp = append(p.tcp, ln)
		case "udp":
			c, err := sockopt.ListenPacket("udp", s.Host.String())
			if err != nil {
				return fail(publishErr(s, err))
			}
			p.udp = append(p.udp, c.(*net.UDPConn))
		}
	}
	return p, nil
}

func publishErr(s portspec.Spec, err error) error {
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		return fielderr.New("publish", "%s/%s: address already in use", s.Host, s.Proto)
	case errors.Is(err, syscall.EACCES):
		return fielderr.New("publish", "%s/%s: binding a port below 1024 needs root or CAP_NET_BIND_SERVICE", s.Host, s.Proto)
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		return fielderr.New("publish", "%s/%s: %s is not an address of this host", s.Host, s.Proto, s.Host.Addr())
	}
	return fielderr.New("publish", "%s/%s: %w", s.Host, s.Proto, err)
}

func (p *Ports) closeSockets() {
	for _, l := range p.tcp {
		l.Close()
	}
	for _, c := range p.udp {
		c.Close()
	}
}

// Start begins serving the published ports.
func (p *Ports) Start(o Options) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.UDPIdleTimeout <= 0 {
		o.UDPIdleTimeout = 60 * time.Second
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = 10 * time.Second
	}
	if o.Allow == nil {
		o.Allow = func(proto policy.Proto, client, listen netip.AddrPort) *flow.Flow {
			return flow.Of(policy.Flow{Direction: policy.Ingress, Proto: proto, Src: client, Dst: listen}, policy.Decision{Action: policy.Allow})
		}
	}
	p.o = o
	p.ctx, p.cancel = context.WithCancel(context.Background())
	p.conns = make(map[net.Conn]struct{})
	p.sessions = make(map[udpClientKey]*ingressSession)
	p.byGwPort = make(map[uint16]*ingressSession)
	p.nextPort = ingressPortFirst
	ti, ui := 0, 0
	for _, s := range p.specs {
		switch s.Proto {
		case "tcp":
			p.wg.Add(1)
			go p.routineAcceptTCP(p.tcp[ti], s)
			ti++
		case "udp":
			p.wg.Add(1)
			go p.routineReadUDP(ui, p.udp[ui], s)
			ui++
		}
	}
	if ui > 0 {
		p.wg.Add(1)
		go p.routineSweepUDP()
	}
}

// Stats returns clients accepted, denied by the ingress policy, and failed
// (guest refused, no free port).
func (p *Ports) Stats() (accepted, denied, failed uint64) {
	return p.accepted.Load(), p.denied.Load(), p.failed.Load()
}

// ResetAll resets every relayed connection and forgets every UDP client
// session; the listeners stay.
func (p *Ports) ResetAll() {
	if p == nil || p.conns == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		proxy.ResetConn(c)
	}
	for _, s := range p.sessions {
		s.fl.Close()
	}
	clear(p.sessions)
	clear(p.byGwPort)
}

// Close stops listening, resets relayed connections and waits. Safe to call
// on a Ports that was never started, and more than once.
func (p *Ports) Close() {
	if p == nil {
		return
	}
	if p.cancel != nil {
		p.cancel()
	}
	p.closeSockets()
	p.mu.Lock()
	for c := range p.conns {
		proxy.ResetConn(c)
	}
	p.mu.Unlock()
	p.wg.Wait()
}
