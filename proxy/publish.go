package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// PortSpec is one published port: host address and port → guest port.
type PortSpec struct {
	Proto     string // "tcp" or "udp"
	Host      netip.AddrPort
	GuestPort uint16
}

func (p PortSpec) String() string {
	return fmt.Sprintf("%s→%d/%s", p.Host, p.GuestPort, p.Proto)
}

// ParsePublish parses [HOSTIP:]HOSTPORT[-END]:GUESTPORT[-END][/tcp|/udp].
// The host address defaults to 127.0.0.1; IPv6 addresses go in brackets.
func ParsePublish(s string) ([]PortSpec, error) {
	bad := func(why string) ([]PortSpec, error) {
		return nil, fmt.Errorf("--publish %q: %s (want [HOSTIP:]HOSTPORT[-END]:GUESTPORT[-END][/tcp|/udp])", s, why)
	}
	rest, proto := s, "tcp"
	if i := strings.LastIndexByte(rest, '/'); i >= 0 {
		proto, rest = rest[i+1:], rest[:i]
		if proto != "tcp" && proto != "udp" {
			return bad(fmt.Sprintf("protocol %q", proto))
		}
	}
	host := netip.AddrFrom4([4]byte{127, 0, 0, 1})
	if strings.HasPrefix(rest, "[") {
		end := strings.Index(rest, "]:")
		if end < 0 {
			return bad("unclosed '[' around the IPv6 host address")
		}
		a, err := netip.ParseAddr(rest[1:end])
		if err != nil || !a.Is6() {
			return bad(fmt.Sprintf("host address %q", rest[1:end]))
		}
		host, rest = a, rest[end+2:]
	}
	parts := strings.Split(rest, ":")
	switch len(parts) {
	case 2:
	case 3:
		a, err := netip.ParseAddr(parts[0])
		if err != nil || !a.Is4() {
			return bad(fmt.Sprintf("host address %q (IPv6 goes in brackets)", parts[0]))
		}
		host, parts = a, parts[1:]
	default:
		if len(parts) > 3 {
			return bad("an IPv6 host address goes in brackets, as in [::1]:8080:80")
		}
		return bad("wrong number of ':'")
	}
	h0, h1, err := parsePortRange(parts[0])
	if err != nil {
		return bad("host port: " + err.Error())
	}
	g0, g1, err := parsePortRange(parts[1])
	if err != nil {
		return bad("guest port: " + err.Error())
	}
	if h1-h0 != g1-g0 {
		return bad(fmt.Sprintf("host range has %d ports, guest range %d", h1-h0+1, g1-g0+1))
	}
	var out []PortSpec
	for i := 0; i <= int(h1-h0); i++ {
		out = append(out, PortSpec{Proto: proto, Host: netip.AddrPortFrom(host, h0+uint16(i)), GuestPort: g0 + uint16(i)})
	}
	return out, nil
}

func parsePortRange(s string) (lo, hi uint16, err error) {
	a, b, isRange := strings.Cut(s, "-")
	p := func(x string) (uint16, error) {
		n, err := strconv.Atoi(x)
		if err != nil || n < 1 || n > 65535 {
			return 0, fmt.Errorf("%q is not a port 1..65535", x)
		}
		return uint16(n), nil
	}
	if lo, err = p(a); err != nil {
		return 0, 0, err
	}
	hi = lo
	if isRange {
		if hi, err = p(b); err != nil {
			return 0, 0, err
		}
		if hi < lo {
			return 0, 0, fmt.Errorf("range %s ends before it starts", s)
		}
	}
	return lo, hi, nil
}

// PublishOptions connect published ports to the sandbox.
type PublishOptions struct {
	// DialGuest connects to the guest's port through the netstack.
	DialGuest func(ctx context.Context, port uint16) (net.Conn, error)
	// SendToGuest delivers a datagram to the guest's port, from the
	// gateway's port gwPort.
	SendToGuest func(gwPort, guestPort uint16, payload []byte) bool
	// Allow decides a new host client (the ingress policy).
	Allow func(proto string, client, listen netip.AddrPort) bool
	// UDPIdleTimeout ends idle UDP client sessions (default 60 s).
	UDPIdleTimeout time.Duration
	// DialTimeout bounds the connection to the guest (default 10 s).
	DialTimeout time.Duration
	Log         *slog.Logger
}

// Publisher serves published ports: a host listener per TCP port, a host
// socket per UDP port, relaying each client to the guest.
type Publisher struct {
	specs []PortSpec
	tcp   []net.Listener
	udp   []*net.UDPConn
	o     PublishOptions

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
	lastSeen  atomic.Int64
}

// Ingress UDP sessions use gateway ports from this range.
const (
	ingressPortFirst = 61000
	ingressPortLast  = 65535
)

// ListenPublished opens every host socket first, so that a port in use or a
// bad address fails start-up with nothing half-started.
func ListenPublished(specs []PortSpec) (*Publisher, error) {
	p := &Publisher{specs: specs}
	fail := func(err error) (*Publisher, error) {
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
			c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(s.Host))
			if err != nil {
				return fail(publishErr(s, err))
			}
			p.udp = append(p.udp, c)
		}
	}
	return p, nil
}

func publishErr(s PortSpec, err error) error {
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		return fmt.Errorf("--publish %s/%s: address already in use", s.Host, s.Proto)
	case errors.Is(err, syscall.EACCES):
		return fmt.Errorf("--publish %s/%s: binding a port below 1024 needs root or CAP_NET_BIND_SERVICE", s.Host, s.Proto)
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		return fmt.Errorf("--publish %s/%s: %s is not an address of this host", s.Host, s.Proto, s.Host.Addr())
	}
	return fmt.Errorf("--publish %s/%s: %w", s.Host, s.Proto, err)
}

func (p *Publisher) closeSockets() {
	for _, l := range p.tcp {
		l.Close()
	}
	for _, c := range p.udp {
		c.Close()
	}
}

// Start begins serving the published ports.
func (p *Publisher) Start(o PublishOptions) {
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
		o.Allow = func(string, netip.AddrPort, netip.AddrPort) bool { return true }
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

func (p *Publisher) routineAcceptTCP(ln net.Listener, s PortSpec) {
	defer p.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				p.o.Log.Error("published port stopped", "port", s.String(), "err", err)
			}
			return
		}
		p.wg.Add(1)
		go p.serveTCP(c.(*net.TCPConn), s)
	}
}

func (p *Publisher) serveTCP(c *net.TCPConn, s PortSpec) {
	defer p.wg.Done()
	client := c.RemoteAddr().(*net.TCPAddr).AddrPort()
	if !p.o.Allow("tcp", client, s.Host) {
		p.denied.Add(1)
		reset(c)
		return
	}
	ctx, cancel := context.WithTimeout(p.ctx, p.o.DialTimeout)
	g, err := p.o.DialGuest(ctx, s.GuestPort)
	cancel()
	if err != nil {
		// Nothing listens on the guest port (or the guest is gone): the
		// host client sees a reset at once, not a hang.
		p.failed.Add(1)
		p.o.Log.Debug("published port: guest refused", "port", s.String(), "client", client, "err", err)
		reset(c)
		return
	}
	p.accepted.Add(1)
	if !p.track(c, g) {
		reset(c)
		reset(g)
		return
	}
	Relay(c, g)
	p.untrack(c, g)
}

func (p *Publisher) track(cs ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ctx.Err() != nil {
		return false
	}
	for _, c := range cs {
		p.conns[c] = struct{}{}
	}
	return true
}

func (p *Publisher) untrack(cs ...net.Conn) {
	p.mu.Lock()
	for _, c := range cs {
		delete(p.conns, c)
	}
	p.mu.Unlock()
}

func (p *Publisher) routineReadUDP(idx int, sock *net.UDPConn, s PortSpec) {
	defer p.wg.Done()
	buf := make([]byte, 65536)
	for {
		n, from, err := sock.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		sess := p.udpSession(udpClientKey{idx, from}, sock, s)
		if sess == nil {
			continue
		}
		sess.lastSeen.Store(time.Now().UnixNano())
		p.o.SendToGuest(sess.gwPort, sess.guestPort, buf[:n])
	}
}

// udpSession finds or opens the session of one host client.
func (p *Publisher) udpSession(k udpClientKey, sock *net.UDPConn, s PortSpec) *ingressSession {
	p.mu.Lock()
	sess := p.sessions[k]
	p.mu.Unlock()
	if sess != nil {
		return sess
	}
	if !p.o.Allow("udp", k.client, s.Host) {
		p.denied.Add(1)
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if sess = p.sessions[k]; sess != nil {
		return sess
	}
	port, ok := p.allocPortLocked()
	if !ok {
		p.failed.Add(1)
		return nil
	}
	sess = &ingressSession{key: k, sock: sock, gwPort: port, guestPort: s.GuestPort}
	sess.lastSeen.Store(time.Now().UnixNano())
	p.sessions[k] = sess
	p.byGwPort[port] = sess
	p.accepted.Add(1)
	return sess
}

func (p *Publisher) allocPortLocked() (uint16, bool) {
	for i := 0; i <= ingressPortLast-ingressPortFirst; i++ {
		port := p.nextPort
		p.nextPort++
		if p.nextPort > ingressPortLast || p.nextPort < ingressPortFirst {
			p.nextPort = ingressPortFirst
		}
		if _, used := p.byGwPort[port]; !used {
			return port, true
		}
	}
	return 0, false
}

// HandleGuestReply takes a datagram the guest sent to the gateway's port
// gwPort; it reports whether that port belongs to a published-port session
// (and the datagram was relayed to its host client).
func (p *Publisher) HandleGuestReply(gwPort uint16, guestSrc netip.AddrPort, payload []byte) bool {
	if p == nil || gwPort < ingressPortFirst {
		return false
	}
	p.mu.Lock()
	sess := p.byGwPort[gwPort]
	p.mu.Unlock()
	if sess == nil || guestSrc.Port() != sess.guestPort {
		return false
	}
	sess.lastSeen.Store(time.Now().UnixNano())
	_, _ = sess.sock.WriteToUDPAddrPort(payload, sess.key.client)
	return true
}

func (p *Publisher) routineSweepUDP() {
	defer p.wg.Done()
	t := time.NewTicker(p.o.UDPIdleTimeout / 4)
	defer t.Stop()
	for {
		select {
		case <-p.ctx.Done():
			return
		case now := <-t.C:
			p.mu.Lock()
			for k, s := range p.sessions {
				if now.Sub(time.Unix(0, s.lastSeen.Load())) >= p.o.UDPIdleTimeout {
					delete(p.sessions, k)
					delete(p.byGwPort, s.gwPort)
				}
			}
			p.mu.Unlock()
		}
	}
}

// Stats returns clients accepted, denied by the ingress policy, and failed
// (guest refused, no free port).
func (p *Publisher) Stats() (accepted, denied, failed uint64) {
	return p.accepted.Load(), p.denied.Load(), p.failed.Load()
}

// Close stops listening, resets relayed connections and waits. Safe to call
// on a Publisher that was never started, and more than once.
func (p *Publisher) Close() {
	if p == nil {
		return
	}
	if p.cancel != nil {
		p.cancel()
	}
	p.closeSockets()
	p.mu.Lock()
	for c := range p.conns {
		reset(c)
	}
	p.mu.Unlock()
	p.wg.Wait()
}
