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
	if !p.o.Allow(policy.UDP, k.client, s.Host).Allowed() {
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
	sess = &ingressSession{key: k, sock: sock, gwPort: port, guestPort: s.GuestPort, v6: s.GuestV6}
	sess.lastSeen.Store(time.Now().UnixNano())
	p.sessions[k] = sess
	p.byGwPort[port] = sess
	p.accepted.Add(1)
	return sess
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
	_, _ = sess.sock.WriteToUDPAddrPort(payload, sess.key.client)
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
				}
			}
			p.mu.Unlock()
		}
	}
}
