package stack

import (
	"encoding/binary"
	"net"
	"net/netip"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"

	"github.com/msbtap/msbtap/wire"
)

// DHCPLease is the lease time the gateway's DHCP server hands out.
const DHCPLease = 24 * time.Hour

// handleDHCP answers a DHCPv4 message from the guest (UDP 68 → 67) with
// the slot's address, the gateway as router and DNS server, and the MTU.
// Messages are parsed and built with github.com/insomniacslk/dhcp.
func (st *Stack) handleDHCP(payload []byte) {
	req, err := dhcpv4.FromBytes(payload)
	if err != nil || req.OpCode != dhcpv4.OpcodeBootRequest {
		return
	}
	p := st.o.Plan
	guest := p.GuestIPv4.Addr().AsSlice()
	gw := p.GatewayV4.AsSlice()
	var typ dhcpv4.MessageType
	switch req.MessageType() {
	case dhcpv4.MessageTypeDiscover:
		typ = dhcpv4.MessageTypeOffer
	case dhcpv4.MessageTypeRequest:
		want := req.RequestedIPAddress()
		if want == nil || want.IsUnspecified() {
			want = req.ClientIPAddr
		}
		if sid := req.ServerIdentifier(); sid != nil && !sid.Equal(gw) {
			return // the guest chose another server
		}
		typ = dhcpv4.MessageTypeAck
		if !net.IP(guest).Equal(want) {
			typ = dhcpv4.MessageTypeNak
		}
	case dhcpv4.MessageTypeInform:
		typ = dhcpv4.MessageTypeAck
	default:
		return // release, decline: nothing to do with one fixed lease
	}
	mask := net.CIDRMask(p.GuestIPv4.Bits(), 32)
	bcast := make(net.IP, 4)
	for i := range bcast {
		bcast[i] = guest[i] | ^mask[i]
	}
	mods := []dhcpv4.Modifier{
		dhcpv4.WithMessageType(typ),
		dhcpv4.WithServerIP(gw),
		dhcpv4.WithOption(dhcpv4.OptServerIdentifier(gw)),
	}
	if typ != dhcpv4.MessageTypeNak {
		if req.MessageType() != dhcpv4.MessageTypeInform {
			mods = append(mods, dhcpv4.WithYourIP(guest), dhcpv4.WithLeaseTime(uint32(DHCPLease/time.Second)))
		}
		mtu := make([]byte, 2)
		binary.BigEndian.PutUint16(mtu, uint16(p.MTU))
		mods = append(mods,
			dhcpv4.WithNetmask(mask),
			dhcpv4.WithRouter(gw),
			dhcpv4.WithOption(dhcpv4.OptDNS(gw)),
			dhcpv4.WithOption(dhcpv4.OptBroadcastAddress(bcast)),
			dhcpv4.WithGeneric(dhcpv4.OptionInterfaceMTU, mtu),
		)
	}
	resp, err := dhcpv4.NewReplyFromRequest(req, mods...)
	if err != nil {
		return
	}
	// The client has no address yet: answer to the broadcast address, which
	// every DHCP client accepts.
	st.r.SendUDP(netip.AddrPortFrom(p.GatewayV4, wire.PortDHCPServer), netip.AddrPortFrom(broadcast4, wire.PortDHCPClient), resp.ToBytes())
}
