package stack

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/link/ethernet"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	gstack "gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"

	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/plan"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/rings"
)

// guestStack is a second gVisor netstack playing the guest: its frames go
// into the gateway's tx ring and the gateway's frames come back to it, so a
// real TCP client runs against the gateway without a TAP or root.
type guestStack struct {
	s *gstack.Stack
}

func newGuestStack(t *testing.T, sh *rings.Shared, p plan.Plan) *guestStack {
	t.Helper()
	ch := channel.New(512, uint32(p.MTU), tcpip.LinkAddress(p.GuestMAC))
	s := gstack.New(gstack.Options{
		NetworkProtocols:   []gstack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol, arp.NewProtocol},
		TransportProtocols: []gstack.TransportProtocolFactory{tcp.NewProtocol},
	})
	if err := s.CreateNIC(1, ethernet.New(ch)); err != nil {
		t.Fatal(err)
	}
	for _, a := range []netip.Prefix{p.GuestIPv4, p.GuestIPv6} {
		proto := ipv4.ProtocolNumber
		if a.Addr().Is6() {
			proto = ipv6.ProtocolNumber
		}
		pa := tcpip.ProtocolAddress{Protocol: proto, AddressWithPrefix: tcpip.AddressWithPrefix{Address: taddr(a.Addr()), PrefixLen: a.Bits()}}
		if err := s.AddProtocolAddress(1, pa, gstack.AddressProperties{}); err != nil {
			t.Fatal(err)
		}
	}
	s.SetRouteTable([]tcpip.Route{
		{Destination: anySubnet(4), Gateway: taddr(p.GatewayV4), NIC: 1},
		{Destination: anySubnet(16), Gateway: taddr(p.GatewayV6), NIC: 1},
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	go func() { // guest → gateway
		defer func() { done <- struct{}{} }()
		for {
			pkt := ch.ReadContext(ctx)
			if pkt == nil {
				return
			}
			f := sh.Frames.Get()
			for _, v := range pkt.AsSlices() {
				f.B = append(f.B, v...)
			}
			pkt.DecRef()
			sh.PushTx(f)
			sh.TxWake.Wake()
		}
	}()
	go func() { // gateway → guest
		defer func() { done <- struct{}{} }()
		for {
			select {
			case <-ctx.Done():
				return
			case <-sh.RxWake.C():
			}
			for {
				f, ok := sh.PopRx() // PopRx: the bytes queued go down, as the TAP writer has them
				if !ok {
					break
				}
				pkt := gstack.NewPacketBuffer(gstack.PacketBufferOptions{Payload: buffer.MakeWithData(f.B)})
				sh.Frames.Put(f)
				ch.InjectInbound(header.EthernetProtocolAll, pkt)
				pkt.DecRef()
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		<-done
		s.Close()
		s.Wait()
	})
	return &guestStack{s: s}
}

func (g *guestStack) dial(t *testing.T, dst netip.AddrPort) (net.Conn, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	proto := ipv4.ProtocolNumber
	if dst.Addr().Is6() {
		proto = ipv6.ProtocolNumber
	}
	return gonet.DialContextTCP(ctx, g.s, tcpip.FullAddress{NIC: 1, Addr: taddr(dst.Addr()), Port: dst.Port()}, proto)
}

// TestTCPRelayThroughNetstack: a guest connects to a "remote" address that
// the gateway maps to a loopback listener; bytes go both ways whole, and
// each side's half-close reaches the other.
func TestTCPRelayThroughNetstack(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	up := ln.Addr().(*net.TCPAddr).AddrPort()
	const n = 1 << 20
	// The server reads to EOF, answers with the SHA-256 of what it got,
	// then sends n bytes and closes.
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				h := sha256.New()
				io.Copy(h, c)
				c.Write(h.Sum(nil))
				io.Copy(c, io.LimitReader(zeros{}, n))
			}()
		}
	}()
	var (
		mu        sync.Mutex
		decisions []policy.Flow
	)
	_, sh, p := newTestStackWith(t, Options{
		Policy:     policy.AllowAll{},
		MapDst:     func(netip.AddrPort) netip.AddrPort { return up },
		OnDecision: func(fl *flow.Flow) { mu.Lock(); decisions = append(decisions, fl.Flow); mu.Unlock() },
	})
	g := newGuestStack(t, sh, p)
	for _, dst := range []netip.AddrPort{netip.MustParseAddrPort("198.51.100.9:80"), netip.MustParseAddrPort("[2001:db8::9]:80")} {
		c, err := g.dial(t, dst)
		if err != nil {
			t.Fatalf("%s: dial through the gateway: %v", dst, err)
		}
		payload := bytes.Repeat([]byte("msbtap"), n/6)
		if _, err := c.Write(payload); err != nil {
			t.Fatal(err)
		}
		if err := c.(*gonet.TCPConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		got, err := io.ReadAll(c)
		c.Close()
		if err != nil {
			t.Fatalf("%s: read: %v", dst, err)
		}
		want := sha256.Sum256(payload)
		if len(got) != 32+n || !bytes.Equal(got[:32], want[:]) {
			t.Fatalf("%s: got %d bytes (want %d) digest match %v", dst, len(got), 32+n, len(got) >= 32 && bytes.Equal(got[:32], want[:]))
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(decisions) != 2 || decisions[0].Proto != policy.TCP || decisions[0].Dst.Port() != 80 {
		t.Errorf("decisions: %+v, want one TCP decision per connection", decisions)
	}
}

// TestTCPRelayRefusedUpstream: when the upstream refuses, the guest's
// connect fails at once with a reset, and no connection is counted.
func TestTCPRelayRefusedUpstream(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	st, sh, p := newTestStackWith(t, Options{MapDst: func(netip.AddrPort) netip.AddrPort { return closed }})
	g := newGuestStack(t, sh, p)
	start := time.Now()
	_, err := g.dial(t, netip.MustParseAddrPort("198.51.100.9:81"))
	if err == nil || !errors.Is(err, syscall.ECONNREFUSED) && !bytes.Contains([]byte(err.Error()), []byte("refused")) {
		t.Fatalf("dial: got %v, want connection refused", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("refused after %s", took)
	}
	m := st.Metrics()
	if m.Failures["tcp_dial_failed"] != 1 || m.Flows[0].Total != 0 {
		t.Errorf("metrics: dial failures %d, tcp total %d", m.Failures["tcp_dial_failed"], m.Flows[0].Total)
	}
}

type zeros struct{}

func (zeros) Read(b []byte) (int, error) {
	clear(b)
	return len(b), nil
}
