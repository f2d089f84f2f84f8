package taptest

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"

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
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"

	"github.com/msbtap/msbtap/plan"
)

// Guest is a sandbox made of a second gVisor netstack on the far side of
// a Device: what it sends is what the agent reads from the device, what
// the agent writes reaches it. It has the plan's guest addresses and
// routes through the gateway, as a real guest configured by msbtap has.
type Guest struct {
	s      *gstack.Stack
	cancel context.CancelFunc
	wg     sync.WaitGroup
	once   sync.Once
}

// NewGuest starts a guest on dev; Close stops it.
func NewGuest(dev *Device, p plan.Plan) (*Guest, error) {
	ch := channel.New(512, uint32(p.MTU), tcpip.LinkAddress(p.GuestMAC))
	s := gstack.New(gstack.Options{
		NetworkProtocols:   []gstack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol, arp.NewProtocol},
		TransportProtocols: []gstack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
	})
	if err := s.CreateNIC(1, ethernet.New(ch)); err != nil {
		s.Destroy()
		return nil, fmt.Errorf("guest NIC: %s", err)
	}
	for _, a := range []netip.Prefix{p.GuestIPv4, p.GuestIPv6} {
		proto := ipv4.ProtocolNumber
		if a.Addr().Is6() {
			proto = ipv6.ProtocolNumber
		}
		pa := tcpip.ProtocolAddress{Protocol: proto, AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpip.AddrFromSlice(a.Addr().AsSlice()), PrefixLen: a.Bits()}}
		if err := s.AddProtocolAddress(1, pa, gstack.AddressProperties{}); err != nil {
			s.Destroy()
			return nil, fmt.Errorf("guest address %s: %s", a, err)
		}
	}
	any4, _ := tcpip.NewSubnet(tcpip.AddrFrom4([4]byte{}), tcpip.MaskFromBytes(make([]byte, 4)))
	any6, _ := tcpip.NewSubnet(tcpip.AddrFrom16([16]byte{}), tcpip.MaskFromBytes(make([]byte, 16)))
	s.SetRouteTable([]tcpip.Route{
		{Destination: any4, Gateway: tcpip.AddrFromSlice(p.GatewayV4.AsSlice()), NIC: 1},
		{Destination: any6, Gateway: tcpip.AddrFromSlice(p.GatewayV6.AsSlice()), NIC: 1},
	})
	ctx, cancel := context.WithCancel(context.Background())
	g := &Guest{s: s, cancel: cancel}
	g.wg.Add(2)
	go func() { // guest → agent
		defer g.wg.Done()
		for {
			pkt := ch.ReadContext(ctx)
			if pkt == nil {
				return
			}
			var b []byte
			for _, v := range pkt.AsSlices() {
				b = append(b, v...)
			}
			pkt.DecRef()
			select {
			case dev.in <- b:
			case <-ctx.Done():
				return
			case <-dev.done:
				return
			}
		}
	}()
	go func() { // agent → guest
		defer g.wg.Done()
		for {
			select {
			case <-ctx.Done():
				return
			case b := <-dev.Written:
				pkt := gstack.NewPacketBuffer(gstack.PacketBufferOptions{Payload: buffer.MakeWithData(b)})
				ch.InjectInbound(header.EthernetProtocolAll, pkt)
				pkt.DecRef()
			}
		}
	}()
	return g, nil
}

func proto(a netip.Addr) tcpip.NetworkProtocolNumber {
	if a.Is4() {
		return ipv4.ProtocolNumber
	}
	return ipv6.ProtocolNumber
}

func full(a netip.AddrPort) tcpip.FullAddress {
	return tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFromSlice(a.Addr().AsSlice()), Port: a.Port()}
}

// DialTCP connects from the guest to dst.
func (g *Guest) DialTCP(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	return gonet.DialContextTCP(ctx, g.s, full(dst), proto(dst.Addr()))
}

// DialUDP opens a UDP socket of the guest's, connected to dst.
func (g *Guest) DialUDP(dst netip.AddrPort) (net.Conn, error) {
	raddr := full(dst)
	return gonet.DialUDP(g.s, nil, &raddr, proto(dst.Addr()))
}

// Close stops the guest.
func (g *Guest) Close() {
	g.once.Do(func() {
		g.cancel()
		g.wg.Wait()
		g.s.Close()
		g.s.Wait()
	})
}
