package stack

import (
	"context"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/policy"
)

// TestCutDuringDial: a termination (Cut) that comes while a TCP flow's
// upstream dial is still under way leaves that flow refused: the dial
// that completes after the cut is never relayed to the guest.
func TestCutDuringDial(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	up := ln.Addr().(*net.TCPAddr).AddrPort()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("hello from upstream"))
			defer c.Close()
		}
	}()
	dialing, release := make(chan struct{}), make(chan struct{})
	st, sh, p := newTestStackWith(t, Options{
		Policy: policy.AllowAll{},
		Dial: func(ctx context.Context, fl *flow.Flow, to netip.AddrPort) (net.Conn, error) {
			close(dialing)
			<-release
			var d net.Dialer
			return d.DialContext(context.Background(), "tcp", up.String())
		},
	})
	g := newGuestStack(t, sh, p)
	type res struct {
		c   net.Conn
		err error
	}
	done := make(chan res, 1)
	go func() {
		c, err := g.dial(t, netip.MustParseAddrPort("198.51.100.9:80"))
		done <- res{c, err}
	}()
	select {
	case <-dialing:
	case <-time.After(5 * time.Second):
		t.Fatal("no upstream dial")
	}
	st.Cut()
	close(release)
	r := <-done
	if r.err == nil {
		defer r.c.Close()
		r.c.SetReadDeadline(time.Now().Add(2 * time.Second))
		b := make([]byte, 64)
		if n, err := r.c.Read(b); n > 0 || err == nil {
			t.Errorf("a flow dialled across the cut was relayed: read %q, %v", b[:n], err)
		}
	}
}

// switchable allows everything until deny is set.
type switchable struct{ deny *atomic.Bool }

func (s switchable) Check(policy.Flow) policy.Decision {
	if s.deny.Load() {
		return policy.Decision{Action: policy.Deny, Rule: 1}
	}
	return policy.Decision{Action: policy.Allow, Rule: 0}
}

// TestRevokeDuringDial: a revocation while a TCP flow's upstream dial is
// under way reaches that flow too: the policy that now denies it is
// applied as it opens, and nothing from upstream reaches the guest.
func TestRevokeDuringDial(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	up := ln.Addr().(*net.TCPAddr).AddrPort()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("hello from upstream"))
			defer c.Close()
		}
	}()
	var deny atomic.Bool
	dialing, release := make(chan struct{}), make(chan struct{})
	st, sh, p := newTestStackWith(t, Options{
		Policy: switchable{&deny},
		Dial: func(ctx context.Context, fl *flow.Flow, to netip.AddrPort) (net.Conn, error) {
			close(dialing)
			<-release
			var d net.Dialer
			return d.DialContext(context.Background(), "tcp", up.String())
		},
	})
	g := newGuestStack(t, sh, p)
	done := make(chan net.Conn, 1)
	go func() {
		c, _ := g.dial(t, netip.MustParseAddrPort("198.51.100.9:80"))
		done <- c
	}()
	select {
	case <-dialing:
	case <-time.After(5 * time.Second):
		t.Fatal("no upstream dial")
	}
	deny.Store(true)
	st.Revoke()
	close(release)
	if c := <-done; c != nil {
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		b := make([]byte, 64)
		if n, err := c.Read(b); n > 0 || err == nil {
			t.Errorf("a flow dialled across a revocation that denies it was relayed: read %q, %v", b[:n], err)
		}
	}
}
