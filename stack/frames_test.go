package stack

import (
	"net"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/msbtap/msbtap/plan"
)

// The tests build the guest's frames and read the gateway's replies with
// gVisor's header package directly, never with the code under test.

func taddr(a netip.Addr) tcpip.Address {
	if a.Is4() {
		return tcpip.AddrFrom4(a.As4())
	}
	return tcpip.AddrFrom16(a.As16())
}

func ethFrame(dst, src net.HardwareAddr, proto tcpip.NetworkProtocolNumber, payload []byte) []byte {
	b := make([]byte, header.EthernetMinimumSize+len(payload))
	header.Ethernet(b).Encode(&header.EthernetFields{SrcAddr: tcpip.LinkAddress(src), DstAddr: tcpip.LinkAddress(dst), Type: proto})
	copy(b[header.EthernetMinimumSize:], payload)
	return b
}

// ipPacket wraps l4 (whose checksum the caller filled in) in an IPv4 or
// IPv6 header.
func ipPacket(src, dst netip.Addr, proto tcpip.TransportProtocolNumber, l4 []byte) []byte {
	if src.Is4() {
		b := make([]byte, header.IPv4MinimumSize+len(l4))
		ip := header.IPv4(b)
		ip.Encode(&header.IPv4Fields{TotalLength: uint16(len(b)), TTL: 64, Protocol: uint8(proto), SrcAddr: taddr(src), DstAddr: taddr(dst)})
		ip.SetChecksum(^ip.CalculateChecksum())
		copy(b[header.IPv4MinimumSize:], l4)
		return b
	}
	b := make([]byte, header.IPv6MinimumSize+len(l4))
	header.IPv6(b).Encode(&header.IPv6Fields{PayloadLength: uint16(len(l4)), TransportProtocol: proto, HopLimit: 64, SrcAddr: taddr(src), DstAddr: taddr(dst)})
	copy(b[header.IPv6MinimumSize:], l4)
	return b
}

func guestFrame(p plan.Plan, ip []byte) []byte {
	proto := header.IPv4ProtocolNumber
	if header.IPVersion(ip) == header.IPv6Version {
		proto = header.IPv6ProtocolNumber
	}
	return ethFrame(p.GatewayMAC, p.GuestMAC, proto, ip)
}

func arpRequest(p plan.Plan, target netip.Addr) []byte {
	a := header.ARP(make([]byte, header.ARPSize))
	a.SetIPv4OverEthernet()
	a.SetOp(header.ARPRequest)
	copy(a.HardwareAddressSender(), p.GuestMAC)
	g, tg := p.GuestIPv4.Addr().As4(), target.As4()
	copy(a.ProtocolAddressSender(), g[:])
	copy(a.ProtocolAddressTarget(), tg[:])
	return ethFrame(net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, p.GuestMAC, header.ARPProtocolNumber, a)
}

func echoRequest(p plan.Plan, dst netip.Addr, id, seq uint16) []byte {
	src := p.GuestIPv4.Addr()
	if dst.Is6() {
		src = p.GuestIPv6.Addr()
		m := header.ICMPv6(make([]byte, header.ICMPv6EchoMinimumSize+16))
		m.SetType(header.ICMPv6EchoRequest)
		m.SetIdent(id)
		m.SetSequence(seq)
		copy(m.Payload(), "msbtap-echo-test")
		m.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: m, Src: taddr(src), Dst: taddr(dst)}))
		return guestFrame(p, ipPacket(src, dst, header.ICMPv6ProtocolNumber, m))
	}
	m := header.ICMPv4(make([]byte, header.ICMPv4MinimumSize+16))
	m.SetType(header.ICMPv4Echo)
	m.SetIdent(id)
	m.SetSequence(seq)
	copy(m.Payload(), "msbtap-echo-test")
	m.SetChecksum(^checksum.Checksum(m, 0))
	return guestFrame(p, ipPacket(src, dst, header.ICMPv4ProtocolNumber, m))
}

func tcpSegment(src, dst netip.AddrPort, flags header.TCPFlags, seq uint32) []byte {
	t := header.TCP(make([]byte, header.TCPMinimumSize))
	t.Encode(&header.TCPFields{SrcPort: src.Port(), DstPort: dst.Port(), SeqNum: seq, DataOffset: header.TCPMinimumSize, Flags: flags, WindowSize: 65535})
	xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, taddr(src.Addr()), taddr(dst.Addr()), uint16(len(t)))
	t.SetChecksum(^t.CalculateChecksum(xsum))
	return ipPacket(src.Addr(), dst.Addr(), header.TCPProtocolNumber, t)
}

func synFrame(p plan.Plan, dst netip.AddrPort) []byte {
	src := netip.AddrPortFrom(p.GuestIPv4.Addr(), 40000)
	if dst.Addr().Is6() {
		src = netip.AddrPortFrom(p.GuestIPv6.Addr(), 40000)
	}
	return guestFrame(p, tcpSegment(src, dst, header.TCPFlagSyn, 1000))
}

func udpPacket(src, dst netip.AddrPort, payload []byte) []byte {
	u := header.UDP(make([]byte, header.UDPMinimumSize+len(payload)))
	u.Encode(&header.UDPFields{SrcPort: src.Port(), DstPort: dst.Port(), Length: uint16(len(u))})
	copy(u.Payload(), payload)
	xsum := header.PseudoHeaderChecksum(header.UDPProtocolNumber, taddr(src.Addr()), taddr(dst.Addr()), uint16(len(u)))
	u.SetChecksum(^checksum.Checksum(u, xsum))
	return ipPacket(src.Addr(), dst.Addr(), header.UDPProtocolNumber, u)
}

// reply is a decoded frame from the gateway to the guest.
type reply struct {
	eth header.Ethernet
	v4  header.IPv4
	v6  header.IPv6
	l4  []byte
	src netip.Addr
	dst netip.Addr
}

// decode parses b with gVisor's header package; ok is false for anything
// but a well-formed IPv4 or IPv6 frame.
func decode(b []byte) (r reply, ok bool) {
	if len(b) < header.EthernetMinimumSize {
		return r, false
	}
	r.eth = header.Ethernet(b)
	ip := b[header.EthernetMinimumSize:]
	switch r.eth.Type() {
	case header.IPv4ProtocolNumber:
		r.v4 = header.IPv4(ip)
		if !r.v4.IsValid(len(ip)) || !r.v4.IsChecksumValid() {
			return r, false
		}
		r.l4 = r.v4.Payload()
		r.src = netip.AddrFrom4(r.v4.SourceAddress().As4())
		r.dst = netip.AddrFrom4(r.v4.DestinationAddress().As4())
	case header.IPv6ProtocolNumber:
		r.v6 = header.IPv6(ip)
		if !r.v6.IsValid(len(ip)) {
			return r, false
		}
		r.l4 = r.v6.Payload()
		r.src = netip.AddrFrom16(r.v6.SourceAddress().As16())
		r.dst = netip.AddrFrom16(r.v6.DestinationAddress().As16())
	default:
		return r, false
	}
	return r, true
}

func (r reply) proto() tcpip.TransportProtocolNumber {
	if r.v4 != nil {
		return r.v4.TransportProtocol()
	}
	return r.v6.TransportProtocol()
}

// l4ChecksumOK verifies the transport checksum with gVisor's helpers.
func (r reply) l4ChecksumOK() bool {
	switch r.proto() {
	case header.ICMPv4ProtocolNumber:
		return checksum.Checksum(r.l4, 0) == 0xffff
	case header.ICMPv6ProtocolNumber:
		m := header.ICMPv6(r.l4)
		return m.Checksum() == header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: m, Src: taddr(r.src), Dst: taddr(r.dst)})
	}
	xsum := header.PseudoHeaderChecksum(r.proto(), taddr(r.src), taddr(r.dst), uint16(len(r.l4)))
	return checksum.Checksum(r.l4, xsum) == 0xffff
}
