package wire

import (
	"encoding/binary"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// The builders below write a whole IP packet (header and transport) into b,
// which the caller sizes with the matching ...Len function, and return the
// number of bytes written. They never allocate.

// DefaultHopLimit is the TTL / hop limit of packets the gateway writes.
const DefaultHopLimit = 64

// PutEthernet writes an Ethernet header into b.
func PutEthernet(b []byte, dst, src [6]byte, etherType uint16) {
	header.Ethernet(b).Encode(&header.EthernetFields{
		SrcAddr: tcpip.LinkAddress(src[:]),
		DstAddr: tcpip.LinkAddress(dst[:]),
		Type:    tcpip.NetworkProtocolNumber(etherType),
	})
}

// PutIPHeader writes an IPv4 or IPv6 header (by src's family) for a packet
// carrying l4Len bytes of protocol proto, and returns its length. IPv4
// headers get DF and a complete checksum.
func PutIPHeader(b []byte, src, dst netip.Addr, proto uint8, l4Len int, id uint16, hopLimit uint8) int {
	if src.Is4() {
		h := header.IPv4(b)
		h.Encode(&header.IPv4Fields{
			TotalLength: uint16(header.IPv4MinimumSize + l4Len),
			ID:          id,
			Flags:       header.IPv4FlagDontFragment,
			TTL:         hopLimit,
			Protocol:    proto,
			SrcAddr:     TCPIPAddr(src),
			DstAddr:     TCPIPAddr(dst),
		})
		h.SetChecksum(^h.CalculateChecksum())
		return header.IPv4MinimumSize
	}
	header.IPv6(b).Encode(&header.IPv6Fields{
		PayloadLength:     uint16(l4Len),
		TransportProtocol: tcpip.TransportProtocolNumber(proto),
		HopLimit:          hopLimit,
		SrcAddr:           TCPIPAddr(src),
		DstAddr:           TCPIPAddr(dst),
	})
	return header.IPv6MinimumSize
}

// UDPLen is the IP-layer length of a UDP datagram carrying n bytes.
func UDPLen(v6 bool, n int) int { return IPHeaderLen(v6) + header.UDPMinimumSize + n }

// PutUDP writes a UDP datagram from src to dst.
func PutUDP(b []byte, src, dst netip.AddrPort, payload []byte, id uint16) int {
	l4 := header.UDPMinimumSize + len(payload)
	ipl := PutIPHeader(b, src.Addr(), dst.Addr(), ProtoUDP, l4, id, DefaultHopLimit)
	u := header.UDP(b[ipl : ipl+l4])
	u.Encode(&header.UDPFields{SrcPort: src.Port(), DstPort: dst.Port(), Length: uint16(l4)})
	copy(u.Payload(), payload)
	sum := ^checksum.Checksum(u, PseudoSum(src.Addr(), dst.Addr(), ProtoUDP, l4))
	if sum == 0 {
		sum = 0xffff // zero means "no checksum"
	}
	u.SetChecksum(sum)
	return ipl + l4
}

// EchoReplyLen is the IP-layer length of an echo reply carrying n bytes.
func EchoReplyLen(v6 bool, n int) int { return IPHeaderLen(v6) + header.ICMPv4MinimumSize + n }

// PutEchoReply writes an ICMP (or ICMPv6, by src's family) echo reply from
// src to dst with the given identifier and sequence number.
func PutEchoReply(b []byte, src, dst netip.Addr, ident, seq uint16, payload []byte, id uint16) int {
	l4 := header.ICMPv4MinimumSize + len(payload)
	if src.Is4() {
		ipl := PutIPHeader(b, src, dst, ProtoICMP, l4, id, DefaultHopLimit)
		m := header.ICMPv4(b[ipl : ipl+l4])
		m.SetType(header.ICMPv4EchoReply)
		m.SetCode(0)
		m.SetIdent(ident)
		m.SetSequence(seq)
		m.SetChecksum(0)
		copy(m.Payload(), payload)
		m.SetChecksum(^checksum.Checksum(m, 0))
		return ipl + l4
	}
	ipl := PutIPHeader(b, src, dst, ProtoICMPv6, l4, id, DefaultHopLimit)
	m := header.ICMPv6(b[ipl : ipl+l4])
	m.SetType(header.ICMPv6EchoReply)
	m.SetCode(0)
	m.SetIdent(ident)
	m.SetSequence(seq)
	copy(m.Payload(), payload)
	setICMPv6Checksum(m, src, dst)
	return ipl + l4
}

func setICMPv6Checksum(m header.ICMPv6, src, dst netip.Addr) {
	m.SetChecksum(0)
	m.SetChecksum(^checksum.Checksum(m, PseudoSum(src, dst, ProtoICMPv6, len(m))))
}

// TCPResetLen is the IP-layer length of a TCP reset.
func TCPResetLen(v6 bool) int { return IPHeaderLen(v6) + header.TCPMinimumSize }

// PutTCPReset writes the RST that answers segment s of packet p, as a closed
// port would (RFC 9293 3.10.7.1). It returns 0 when s is itself a reset.
func PutTCPReset(b []byte, p *Packet, s TCPSegment, id uint16) int {
	if s.Flags&TCPFlagRST != 0 {
		return 0
	}
	f := header.TCPFields{SrcPort: s.DstPort, DstPort: s.SrcPort, DataOffset: header.TCPMinimumSize}
	if s.Flags&TCPFlagACK != 0 {
		// <SEQ=SEG.ACK><CTL=RST>
		f.SeqNum, f.Flags = s.Ack, header.TCPFlagRst
	} else {
		// <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>
		segLen := uint32(len(p.L4) - s.HdrLen)
		if s.Flags&TCPFlagSYN != 0 {
			segLen++
		}
		if s.Flags&TCPFlagFIN != 0 {
			segLen++
		}
		f.AckNum, f.Flags = s.Seq+segLen, header.TCPFlagRst|header.TCPFlagAck
	}
	ipl := PutIPHeader(b, p.Dst, p.Src, ProtoTCP, header.TCPMinimumSize, id, DefaultHopLimit)
	t := header.TCP(b[ipl : ipl+header.TCPMinimumSize])
	t.Encode(&f)
	t.SetChecksum(^checksum.Checksum(t, PseudoSum(p.Dst, p.Src, ProtoTCP, header.TCPMinimumSize)))
	return ipl + header.TCPMinimumSize
}

// Unreach is the reason an ICMP destination-unreachable gives.
type Unreach uint8

// Unreachable reasons.
const (
	// AdminProhibited: the policy refused the flow.
	AdminProhibited Unreach = iota
	// PortUnreachable: nothing takes this port (QUIC refused, so that
	// clients fall back to TCP at once).
	PortUnreachable
)

// unreachQuote bounds the quoted packet as the RFCs ask: the whole error in
// 576 bytes for IPv4 (RFC 1812), 1280 for IPv6 (RFC 4443).
func unreachQuote(p *Packet) []byte {
	limit := 576 - header.IPv4MinimumSize - header.ICMPv4MinimumSize
	if p.V6 {
		limit = header.IPv6MinimumMTU - header.IPv6MinimumSize - header.ICMPv6MinimumSize
	}
	if len(p.IP) > limit {
		return p.IP[:limit]
	}
	return p.IP
}

// UnreachableLen is the IP-layer length of the error PutUnreachable writes
// for p.
func UnreachableLen(p *Packet) int {
	return IPHeaderLen(p.V6) + header.ICMPv4MinimumSize + len(unreachQuote(p))
}

// PutUnreachable writes an ICMP destination-unreachable from the address
// from to the sender of p, quoting as much of p as the RFCs allow.
func PutUnreachable(b []byte, p *Packet, from netip.Addr, why Unreach, id uint16) int {
	quote := unreachQuote(p)
	l4 := header.ICMPv4MinimumSize + len(quote)
	if !p.V6 {
		ipl := PutIPHeader(b, from, p.Src, ProtoICMP, l4, id, DefaultHopLimit)
		m := header.ICMPv4(b[ipl : ipl+l4])
		m.SetType(header.ICMPv4DstUnreachable)
		m.SetCode(header.ICMPv4AdminProhibited)
		if why == PortUnreachable {
			m.SetCode(header.ICMPv4PortUnreachable)
		}
		clear(m[2:header.ICMPv4MinimumSize])
		copy(m[header.ICMPv4MinimumSize:], quote)
		m.SetChecksum(^checksum.Checksum(m, 0))
		return ipl + l4
	}
	ipl := PutIPHeader(b, from, p.Src, ProtoICMPv6, l4, id, DefaultHopLimit)
	m := header.ICMPv6(b[ipl : ipl+l4])
	m.SetType(header.ICMPv6DstUnreachable)
	m.SetCode(header.ICMPv6Prohibited)
	if why == PortUnreachable {
		m.SetCode(header.ICMPv6PortUnreachable)
	}
	m.SetTypeSpecific(0)
	copy(m[header.ICMPv6MinimumSize:], quote)
	setICMPv6Checksum(m, from, p.Src)
	return ipl + l4
}

// RouterAdvert is what the gateway announces as the sandbox's IPv6 router.
type RouterAdvert struct {
	GatewayMAC [6]byte
	Prefix     netip.Prefix // on-link and autonomous (SLAAC)
	MTU        uint32
	DNS        netip.Addr // RDNSS (RFC 8106)
}

// Router advertisement constants.
const (
	raRouterLifetime  = 1800  // s
	raValidLifetime   = 86400 // s
	raPreferred       = 14400 // s
	raRDNSSLifetime   = 1800  // s
	ndpMTUOptionType  = 5
	ndpHopLimit       = 255 // RFC 4861: every NDP message
	raPrefixOptionLen = 30
)

// AllNodes is the IPv6 all-nodes multicast address and its MAC.
var (
	AllNodes    = netip.MustParseAddr("ff02::1")
	AllNodesMAC = [6]byte{0x33, 0x33, 0, 0, 0, 1}
)

func (ra *RouterAdvert) options() header.NDPOptionsSerializer {
	pi := make(header.NDPPrefixInformation, raPrefixOptionLen)
	pi[0] = byte(ra.Prefix.Bits())
	pi[1] = 0xc0 // on-link, autonomous
	binary.BigEndian.PutUint32(pi[2:6], raValidLifetime)
	binary.BigEndian.PutUint32(pi[6:10], raPreferred)
	a := ra.Prefix.Masked().Addr().As16()
	copy(pi[14:30], a[:])
	rdnss := make(header.NDPRecursiveDNSServer, 6+16)
	binary.BigEndian.PutUint32(rdnss[2:6], raRDNSSLifetime)
	d := ra.DNS.As16()
	copy(rdnss[6:], d[:])
	return header.NDPOptionsSerializer{
		header.NDPSourceLinkLayerAddressOption(tcpip.LinkAddress(ra.GatewayMAC[:])),
		pi,
		rdnss,
	}
}

// RouterAdvertLen is the IP-layer length of the advertisement.
func (ra *RouterAdvert) Len() int {
	return header.IPv6MinimumSize + header.ICMPv6HeaderSize + header.NDPRAMinimumSize + ra.options().Length() + 8
}

// Put writes the advertisement, from the gateway's link-local address to
// all nodes: the gateway is the default router, the prefix is on-link and
// autonomous, with the MTU and the DNS server.
func (ra *RouterAdvert) Put(b []byte) int {
	src := GatewayLinkLocal(ra.GatewayMAC)
	opts := ra.options()
	l4 := header.ICMPv6HeaderSize + header.NDPRAMinimumSize + opts.Length() + 8
	ipl := PutIPHeader(b, src, AllNodes, ProtoICMPv6, l4, 0, ndpHopLimit)
	m := header.ICMPv6(b[ipl : ipl+l4])
	m.SetType(header.ICMPv6RouterAdvert)
	m.SetCode(0)
	body := m[header.ICMPv6HeaderSize:]
	clear(body[:header.NDPRAMinimumSize])
	body[0] = DefaultHopLimit // current hop limit
	binary.BigEndian.PutUint16(body[2:4], raRouterLifetime)
	o := body[header.NDPRAMinimumSize:]
	n := header.NDPOptions(o).Serialize(opts)
	// The MTU option, which gVisor's serializer lacks.
	mtu := o[n : n+8]
	mtu[0], mtu[1], mtu[2], mtu[3] = ndpMTUOptionType, 1, 0, 0
	binary.BigEndian.PutUint32(mtu[4:8], ra.MTU)
	setICMPv6Checksum(m, src, AllNodes)
	return ipl + l4
}
