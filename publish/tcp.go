package publish

import (
	"context"
	"errors"
	"net"

	"github.com/msbtap/msbtap/internal/portspec"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/proxy"
)

func (p *Ports) routineAcceptTCP(ln net.Listener, s portspec.Spec) {
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

func (p *Ports) serveTCP(c *net.TCPConn, s portspec.Spec) {
	defer p.wg.Done()
	client := c.RemoteAddr().(*net.TCPAddr).AddrPort()
	fl := p.o.Allow(policy.TCP, client, s.Host)
	if !fl.Allowed() {
		p.denied.Add(1)
		proxy.ResetConn(c)
		return
	}
	ctx, cancel := context.WithTimeout(p.ctx, p.o.DialTimeout)
	g, err := p.o.DialGuest(ctx, s.GuestPort, s.GuestV6)
	if err != nil && !s.GuestV6 && errors.Is(err, ErrGuestRefused) {
		// Nothing on the guest's IPv4 address: many servers listen on
		// [::] only.
		g, err = p.o.DialGuest(ctx, s.GuestPort, true)
	}
	cancel()
	if err != nil {
		// Nothing listens on the guest port (or the guest is gone): the
		// host client sees a reset at once, not a hang.
		p.failed.Add(1)
		p.o.Log.Debug("published port: guest refused", "port", s.String(), "client", client, "err", err)
		proxy.ResetConn(c)
		return
	}
	p.accepted.Add(1)
	if !p.track(c, g) {
		proxy.ResetConn(c)
		proxy.ResetConn(g)
		return
	}
	fl.Open(func() { proxy.ResetConn(c); proxy.ResetConn(g) })
	defer fl.Close()
	proxy.Relay(c, g, &fl.Up, &fl.Down)
	p.untrack(c, g)
}

func (p *Ports) track(cs ...net.Conn) bool {
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

func (p *Ports) untrack(cs ...net.Conn) {
	p.mu.Lock()
	for _, c := range cs {
		delete(p.conns, c)
	}
	p.mu.Unlock()
}
