package stack

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/msbtap/msbtap/publish"
	"github.com/msbtap/msbtap/wire"
)

// IngressUDP takes datagrams the guest sends to the gateway's ports that
// belong to published-port sessions.
type IngressUDP interface {
	HandleGuestReply(gwPort uint16, guestSrc netip.AddrPort, payload []byte) bool
}

// SetIngressUDP installs the handler of published UDP ports.
func (st *Stack) SetIngressUDP(h IngressUDP) { st.ingress.Store(&h) }

// DialGuest opens a TCP connection from the gateway to the guest's IPv4
// (or IPv6) address on port, through the netstack. A closed guest port
// fails at once (the guest answers RST) with publish.ErrGuestRefused.
func (st *Stack) DialGuest(ctx context.Context, port uint16, v6 bool) (net.Conn, error) {
	var wq waiter.Queue
	netProto, guest := ipv4.ProtocolNumber, st.o.Plan.GuestIPv4.Addr()
	if v6 {
		netProto, guest = ipv6.ProtocolNumber, st.o.Plan.GuestIPv6.Addr()
	}
	ep, terr := st.s.NewEndpoint(tcp.ProtocolNumber, netProto, &wq)
	if terr != nil {
		return nil, fmt.Errorf("guest endpoint: %s", terr)
	}
	entry, notify := waiter.NewChannelEntry(waiter.WritableEvents)
	wq.EventRegister(&entry)
	defer wq.EventUnregister(&entry)
	to := tcpip.FullAddress{NIC: nicID, Addr: wire.TCPIPAddr(guest), Port: port}
	terr = ep.Connect(to)
	if _, started := terr.(*tcpip.ErrConnectStarted); started {
		select {
		case <-ctx.Done():
			ep.Close()
			return nil, ctx.Err()
		case <-st.done:
			ep.Close()
			return nil, errors.New("gateway closed")
		case <-notify:
		}
		terr = ep.LastError()
	}
	if terr != nil {
		ep.Close()
		if _, refused := terr.(*tcpip.ErrConnectionRefused); refused {
			return nil, fmt.Errorf("connect to guest %s port %d: %w", guest, port, publish.ErrGuestRefused)
		}
		return nil, fmt.Errorf("connect to guest %s port %d: %s", guest, port, terr)
	}
	return &guestConn{TCPConn: gonet.NewTCPConn(&wq, ep), ep: ep}, nil
}

// SendUDPToGuest delivers a datagram from the gateway's address and port
// gwPort to the guest's port, over IPv4 or IPv6.
func (st *Stack) SendUDPToGuest(gwPort, guestPort uint16, v6 bool, payload []byte) bool {
	p := st.o.Plan
	gw, guest := p.GatewayV4, p.GuestIPv4.Addr()
	if v6 {
		gw, guest = p.GatewayV6, p.GuestIPv6.Addr()
	}
	return st.r.SendUDP(netip.AddrPortFrom(gw, gwPort), netip.AddrPortFrom(guest, guestPort), payload)
}
