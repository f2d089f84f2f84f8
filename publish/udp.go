package publish

import (
	"errors"
	"net"
	"net/netip"
	"time"

	"github.com/msbtap/msbtap/internal/portspec"
	"github.com/msbtap/msbtap/policy"
)

func (p *Ports) routineReadUDP(idx int, sock *net.UDPConn, s portspec.Spec) {
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
		if !sess.fl.Up.Shaper.Allow(n) {
			continue // over the sandbox's rate: a datagram cannot wait
		}
		sess.fl.Up.Bytes.Add(uint64(n))
		p.o.SendToGuest(sess.gwPort, sess.guestPort, sess.v6, buf[:n])
	}
}

// udpSession finds or opens the session of one host client.
func (p *Ports) udpSession(k udpClientKey, sock *net.UDPConn, s portspec.Spec) *ingressSession {
	p.mu.Lock()
	sess := p.sessions[k]
	p.mu.Unlock()
	if sess != nil {
		return sess
	}
	fl := p.o.Allow(policy.UDP, k.client, s.Host)
	if !fl.Allowed() {
		p.denied.Add(1)
		return nil
	}
	p.mu.Lock()
	if sess = p.sessions[k]; sess != nil {
		p.mu.Unlock()
		return sess
	}
	port, ok := p.allocPortLocked()
	if !ok {
		p.mu.Unlock()
		p.failed.Add(1)
		return nil
	}
	sess = &ingressSession{key: k, sock: sock, gwPort: port, guestPort: s.GuestPort, v6: s.GuestV6, fl: fl}
	sess.lastSeen.Store(time.Now().UnixNano())
	p.sessions[k] = sess
	p.byGwPort[port] = sess
	p.accepted.Add(1)
	p.mu.Unlock()
	// Outside the lock: a flow opened after a cut is reset at once, which
	// forgets the session.
	fl.Open(func() { p.forget(sess) })
	if _, still := p.session(k); !still {
		return nil
	}
	return sess
}

// session returns client k's session, if it has one.
func (p *Ports) session(k udpClientKey) (*ingressSession, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	s, ok := p.sessions[k]
	return s, ok
}

// forget ends a UDP client's session (flows close, revocation, a cut).
func (p *Ports) forget(s *ingressSession) {
	p.mu.Lock()
	if p.sessions[s.key] == s {
		delete(p.sessions, s.key)
		delete(p.byGwPort, s.gwPort)
	}
	p.mu.Unlock()
	s.fl.Close()
}

func (p *Ports) allocPortLocked() (uint16, bool) {
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
func (p *Ports) HandleGuestReply(gwPort uint16, guestSrc netip.AddrPort, payload []byte) bool {
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
	if sess.fl.Down.Shaper.Allow(len(payload)) {
		sess.fl.Down.Bytes.Add(uint64(len(payload)))
		_, _ = sess.sock.WriteToUDPAddrPort(payload, sess.key.client)
	}
	return true
}

func (p *Ports) routineSweepUDP() {
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
					s.fl.Close()
				}
			}
			p.mu.Unlock()
		}
	}
}
