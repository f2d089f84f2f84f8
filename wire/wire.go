// Package wire holds the wire formats the gateway reads from and writes to
// the guest: the constants, the frame-size arithmetic, and parsing and
// building of IPv4, IPv6, TCP, UDP, ICMP and NDP, all through gVisor's
// header package.
package wire

import (
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// EtherTypes the gateway looks at.
const (
	EtherTypeIPv4 = uint16(header.IPv4ProtocolNumber)
	EtherTypeARP  = uint16(header.ARPProtocolNumber)
	EtherTypeIPv6 = uint16(header.IPv6ProtocolNumber)
)

// Link-layer sizes.
const (
	// EthHdrLen is the length of an Ethernet header.
	EthHdrLen = header.EthernetMinimumSize
	// VLANTagLen is the room left in every frame for one 802.1Q tag.
	VLANTagLen = 4
	// MaxIPPacket is the largest IP packet (and so the largest GSO segment).
	MaxIPPacket = 65535
)

// Transport protocol numbers.
const (
	ProtoICMP   = uint8(header.ICMPv4ProtocolNumber)
	ProtoTCP    = uint8(header.TCPProtocolNumber)
	ProtoUDP    = uint8(header.UDPProtocolNumber)
	ProtoICMPv6 = uint8(header.ICMPv6ProtocolNumber)
)

// Ports the gateway answers itself.
const (
	PortDNS        uint16 = 53
	PortDHCPServer uint16 = 67
	PortDHCPClient uint16 = 68
)

// TCP flags as they appear in the header's flag byte.
const (
	TCPFlagFIN = uint8(header.TCPFlagFin)
	TCPFlagSYN = uint8(header.TCPFlagSyn)
	TCPFlagRST = uint8(header.TCPFlagRst)
	TCPFlagACK = uint8(header.TCPFlagAck)
)

// Sizes are the frame and buffer sizes that follow from a link's MTU.
type Sizes struct {
	// MTU is the link's MTU.
	MTU int
	// MaxFrame is the largest frame accepted from the guest: the MTU plus
	// an Ethernet header and a VLAN tag, or with offload a whole 64 KiB
	// TSO segment in one frame.
	MaxFrame int
	// Buffer is the size of a frame buffer: larger than MaxFrame, so that a
	// read of an oversized frame is recognised instead of truncated.
	Buffer int
}

// SizesFor computes the sizes for a link of the given MTU, with or without
// TCP segmentation offload.
func SizesFor(mtu int, offload bool) Sizes {
	s := Sizes{MTU: mtu, MaxFrame: EthHdrLen + VLANTagLen + mtu}
	if offload {
		s.MaxFrame = EthHdrLen + VLANTagLen + MaxIPPacket
	}
	s.Buffer = s.MaxFrame + 256
	return s
}

// MaxUDPPayload is the largest UDP payload that fits one packet of the MTU
// to the guest, over IPv6 or IPv4.
func (s Sizes) MaxUDPPayload(v6 bool) int {
	return s.MTU - IPHeaderLen(v6) - header.UDPMinimumSize
}

// IPHeaderLen is the length of the IP header the gateway writes.
func IPHeaderLen(v6 bool) int {
	if v6 {
		return header.IPv6MinimumSize
	}
	return header.IPv4MinimumSize
}

// TCPIPAddr converts an address for gVisor.
func TCPIPAddr(a netip.Addr) tcpip.Address {
	if a.Is4() {
		return tcpip.AddrFrom4(a.As4())
	}
	return tcpip.AddrFrom16(a.As16())
}

// NetipAddr converts an address from gVisor.
func NetipAddr(a tcpip.Address) netip.Addr {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return ip
}

// GatewayLinkLocal is the EUI-64 link-local address gVisor's netstack gives
// itself from its MAC, which the gateway answers NDP for.
func GatewayLinkLocal(mac [6]byte) netip.Addr {
	return NetipAddr(header.LinkLocalAddr(tcpip.LinkAddress(mac[:])))
}
