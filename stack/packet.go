package stack

import (
	"encoding/binary"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
)

// IP protocol numbers and EtherTypes the poll loop looks at.
const (
	etherTypeIPv4 = 0x0800
	etherTypeARP  = 0x0806
	etherTypeIPv6 = 0x86dd

	protoICMP   = 1
	protoTCP    = 6
	protoUDP    = 17
	protoICMPv6 = 58

	ethHdrLen = 14
)

// ipPacket is the parsed network layer of a guest frame. Its slices alias
// the frame.
type ipPacket struct {
	v6       bool
	src, dst netip.Addr
	proto    uint8  // transport protocol (after IPv6 extension headers)
	frag     bool   // a fragment (or part of a fragmented datagram)
	csumDone bool   // the transport checksum needs no verification
	ip       []byte // the whole IP packet, trimmed to its stated length
	l4       []byte // the transport header and payload
}

// parseIP parses an IPv4 or IPv6 packet. It reports false for anything
// malformed: bad version, short or inconsistent lengths, bad IPv4 header
// checksum.
func parseIP(b []byte, v6 bool) (p ipPacket, ok bool) {
	p.v6 = v6
	if !v6 {
		if len(b) < 20 || b[0]>>4 != 4 {
			return p, false
		}
		ihl := int(b[0]&0xf) * 4
		total := int(binary.BigEndian.Uint16(b[2:4]))
		if ihl < 20 || total < ihl || total > len(b) {
			return p, false
		}
		if checksum.Checksum(b[:ihl], 0) != 0xffff {
			return p, false
		}
		fragField := binary.BigEndian.Uint16(b[6:8])
		p.frag = fragField&0x3fff != 0 // MF set or offset non-zero
		p.proto = b[9]
		p.src = netip.AddrFrom4([4]byte(b[12:16]))
		p.dst = netip.AddrFrom4([4]byte(b[16:20]))
		p.ip = b[:total]
		p.l4 = b[ihl:total]
		return p, true
	}
	if len(b) < 40 || b[0]>>4 != 6 {
		return p, false
	}
	total := 40 + int(binary.BigEndian.Uint16(b[4:6]))
	if total > len(b) {
		return p, false
	}
	p.src = netip.AddrFrom16([16]byte(b[8:24]))
	p.dst = netip.AddrFrom16([16]byte(b[24:40]))
	p.ip = b[:total]
	next, off := b[6], 40
	for {
		switch next {
		case 0, 43, 60: // hop-by-hop, routing, destination options
			if off+8 > total {
				return p, false
			}
			l := (int(b[off+1]) + 1) * 8
			next = b[off]
			off += l
			if off > total {
				return p, false
			}
			continue
		case 44: // fragment
			if off+8 > total {
				return p, false
			}
			p.frag = true
			next = b[off]
			off += 8
			continue
		}
		break
	}
	p.proto = next
	p.l4 = b[off:total]
	return p, true
}

// transportChecksumOK verifies the TCP/UDP/ICMPv6 checksum of p (ICMPv4 has
// no pseudo-header). A zero UDP checksum over IPv4 means "none".
func transportChecksumOK(p *ipPacket) bool {
	if p.csumDone {
		return p.proto != protoUDP || len(p.l4) >= 8
	}
	switch p.proto {
	case protoUDP:
		if len(p.l4) < 8 {
			return false
		}
		if !p.v6 && p.l4[6] == 0 && p.l4[7] == 0 {
			return true
		}
	case protoICMP:
		return checksum.Checksum(p.l4, 0) == 0xffff
	}
	return checksum.Checksum(p.l4, pseudoSum(p.src, p.dst, p.proto, len(p.l4))) == 0xffff
}

// pseudoSum is the checksum of the TCP/UDP/ICMPv6 pseudo-header.
func pseudoSum(src, dst netip.Addr, proto uint8, length int) uint16 {
	s := checksum.Checksum(src.AsSlice(), 0)
	s = checksum.Checksum(dst.AsSlice(), s)
	var tail [4]byte
	binary.BigEndian.PutUint16(tail[0:2], uint16(proto))
	binary.BigEndian.PutUint16(tail[2:4], uint16(length))
	return checksum.Checksum(tail[:], s)
}

// putIPHeader writes an IPv4 or IPv6 header for a packet carrying l4Len
// bytes of protocol proto, and returns its length.
func putIPHeader(b []byte, src, dst netip.Addr, proto uint8, l4Len int, id uint16) int {
	if src.Is4() {
		h := b[:20]
		h[0], h[1] = 0x45, 0
		binary.BigEndian.PutUint16(h[2:4], uint16(20+l4Len))
		binary.BigEndian.PutUint16(h[4:6], id)
		h[6], h[7] = 0x40, 0 // DF
		h[8], h[9] = 64, proto
		h[10], h[11] = 0, 0
		s4, d4 := src.As4(), dst.As4()
		copy(h[12:16], s4[:])
		copy(h[16:20], d4[:])
		binary.BigEndian.PutUint16(h[10:12], ^checksum.Checksum(h, 0))
		return 20
	}
	h := b[:40]
	h[0], h[1], h[2], h[3] = 0x60, 0, 0, 0
	binary.BigEndian.PutUint16(h[4:6], uint16(l4Len))
	h[6], h[7] = proto, 64
	s6, d6 := src.As16(), dst.As16()
	copy(h[8:24], s6[:])
	copy(h[24:40], d6[:])
	return 40
}

func ipHeaderLen(a netip.Addr) int {
	if a.Is4() {
		return 20
	}
	return 40
}
