package wire

import (
	"net/netip"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// Packet is the network layer of a guest frame. Its slices alias the frame.
type Packet struct {
	V6       bool
	Src, Dst netip.Addr
	// Proto is the transport protocol, after any IPv6 extension headers.
	Proto uint8
	// Frag says the packet is a fragment (or part of a fragmented datagram);
	// then FragID, FragOffset (bytes) and FragMore are its fragment fields,
	// FragNext the protocol of the fragmentable part (IPv4: the protocol;
	// IPv6: the fragment header's next header) and FragData that part.
	Frag       bool
	FragID     uint32
	FragOffset int
	FragMore   bool
	FragNext   uint8
	FragData   []byte
	// CsumDone says the transport checksum needs no verification (the guest
	// left it to the gateway with checksum offload, or validated it).
	CsumDone bool
	// IP is the whole IP packet, trimmed to its stated length; L4 the
	// transport header and payload.
	IP, L4 []byte
}

// Parse parses the IPv4 or IPv6 packet b. It reports false for anything
// malformed: bad version, short or inconsistent lengths, a bad IPv4 header
// checksum, broken IPv6 extension headers.
func Parse(b []byte, v6 bool) (p Packet, ok bool) {
	if v6 {
		return parseIPv6(b)
	}
	return parseIPv4(b)
}

func parseIPv4(b []byte) (p Packet, ok bool) {
	h := header.IPv4(b)
	if !h.IsValid(len(b)) || !h.IsChecksumValid() {
		return p, false
	}
	total := int(h.TotalLength())
	p.Frag = h.More() || h.FragmentOffset() != 0
	p.Proto = h.Protocol()
	if p.Frag {
		p.FragID, p.FragOffset, p.FragMore, p.FragNext = uint32(h.ID()), int(h.FragmentOffset()), h.More(), h.Protocol()
		p.FragData = b[h.HeaderLength():total]
	}
	p.Src = netip.AddrFrom4([4]byte(h.SourceAddressSlice()))
	p.Dst = netip.AddrFrom4([4]byte(h.DestinationAddressSlice()))
	p.IP = b[:total]
	p.L4 = b[h.HeaderLength():total]
	return p, true
}

func parseIPv6(b []byte) (p Packet, ok bool) {
	h := header.IPv6(b)
	if !h.IsValid(len(b)) {
		return p, false
	}
	total := header.IPv6MinimumSize + int(h.PayloadLength())
	p.V6 = true
	p.Src = netip.AddrFrom16([16]byte(b[8:24]))
	p.Dst = netip.AddrFrom16([16]byte(b[24:40]))
	p.IP = b[:total]
	next := h.NextHeader()
	if !isIPv6ExtHeader(next) {
		p.Proto = next
		p.L4 = b[header.IPv6MinimumSize:total]
		return p, true
	}
	// Extension headers: rare, so the iterator's small allocation is fine.
	it := header.MakeIPv6PayloadIterator(header.IPv6ExtensionHeaderIdentifier(next),
		buffer.MakeWithData(b[header.IPv6MinimumSize:total]))
	defer it.Release()
	for {
		hdr, done, err := it.Next()
		if err != nil || done {
			return p, false // broken, or no next header: nothing to relay
		}
		switch hdr := hdr.(type) {
		case header.IPv6FragmentExtHdr:
			if !hdr.IsAtomic() {
				p.Frag = true
				p.FragID, p.FragOffset, p.FragMore = hdr.ID(), int(hdr.FragmentOffset())*8, hdr.More()
				p.FragNext = uint8(it.NextHeaderIdentifier())
				if end := int(it.HeaderOffset()) + 8; end <= total {
					p.FragData = b[end:total]
				}
			}
		case header.IPv6RawPayloadHeader:
			hdr.Release()
			p.Proto = uint8(hdr.Identifier)
			off := int(it.HeaderOffset())
			if off > total {
				return p, false
			}
			p.L4 = b[off:total]
			return p, true
		default:
			hdr.Release()
		}
	}
}

func isIPv6ExtHeader(next uint8) bool {
	switch header.IPv6ExtensionHeaderIdentifier(next) {
	case header.IPv6HopByHopOptionsExtHdrIdentifier, header.IPv6RoutingExtHdrIdentifier,
		header.IPv6FragmentExtHdrIdentifier, header.IPv6DestinationOptionsExtHdrIdentifier,
		header.IPv6ExperimentExtHdrIdentifier, header.IPv6NoNextHeaderIdentifier:
		return true
	}
	return false
}

// TransportChecksumOK verifies the TCP, UDP, ICMP or ICMPv6 checksum of p.
// A zero UDP checksum over IPv4 means "none".
func (p *Packet) TransportChecksumOK() bool {
	if p.CsumDone {
		return p.Proto != ProtoUDP || len(p.L4) >= header.UDPMinimumSize
	}
	switch p.Proto {
	case ProtoUDP:
		if len(p.L4) < header.UDPMinimumSize {
			return false
		}
		if !p.V6 && header.UDP(p.L4).Checksum() == 0 {
			return true
		}
	case ProtoICMP:
		return checksum.Checksum(p.L4, 0) == 0xffff
	}
	return checksum.Checksum(p.L4, PseudoSum(p.Src, p.Dst, p.Proto, len(p.L4))) == 0xffff
}

// PseudoSum is the checksum of the TCP/UDP/ICMPv6 pseudo-header.
func PseudoSum(src, dst netip.Addr, proto uint8, length int) uint16 {
	return header.PseudoHeaderChecksum(tcpip.TransportProtocolNumber(proto), TCPIPAddr(src), TCPIPAddr(dst), uint16(length))
}

// TCPSegment is the part of a TCP header the gateway decides on.
type TCPSegment struct {
	SrcPort, DstPort uint16
	Flags            uint8
	Seq, Ack         uint32
	HdrLen           int
}

// ParseTCP reads the TCP header of l4; it reports false when it is short or
// its data offset is out of range.
func ParseTCP(l4 []byte) (s TCPSegment, ok bool) {
	if len(l4) < header.TCPMinimumSize {
		return s, false
	}
	t := header.TCP(l4)
	off := int(t.DataOffset())
	if off < header.TCPMinimumSize || off > len(l4) {
		return s, false
	}
	return TCPSegment{SrcPort: t.SourcePort(), DstPort: t.DestinationPort(), Flags: uint8(t.Flags()),
		Seq: t.SequenceNumber(), Ack: t.AckNumber(), HdrLen: off}, true
}

// IsSYN says the segment opens a connection (SYN without ACK).
func (s TCPSegment) IsSYN() bool { return s.Flags&TCPFlagSYN != 0 && s.Flags&TCPFlagACK == 0 }

// UDPDatagram is a parsed UDP header and its payload.
type UDPDatagram struct {
	SrcPort, DstPort uint16
	Payload          []byte
}

// ParseUDP reads the UDP header of l4 and trims the payload to the stated
// length; it reports false when the length is inconsistent.
func ParseUDP(l4 []byte) (d UDPDatagram, n int, ok bool) {
	if len(l4) < header.UDPMinimumSize {
		return d, 0, false
	}
	u := header.UDP(l4)
	n = int(u.Length())
	if n < header.UDPMinimumSize || n > len(l4) {
		return d, 0, false
	}
	return UDPDatagram{SrcPort: u.SourcePort(), DstPort: u.DestinationPort(), Payload: l4[header.UDPMinimumSize:n]}, n, true
}
