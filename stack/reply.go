package stack

import (
	"encoding/binary"
	"net"
	"net/netip"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"

	"github.com/msbtap/msbtap/rings"
)

// replier builds frames for the guest outside the netstack: UDP datagrams
// and echo replies relayed by the proxies, and the resets and unreachables
// that answer denied flows. It implements proxy.Replier.
type replier struct {
	sh       *rings.Shared
	gwMAC    [6]byte
	guestMAC atomic.Pointer[[6]byte] // learned from the guest's frames
	ipID     atomic.Uint32
}

func newReplier(sh *rings.Shared, gw, guest net.HardwareAddr) *replier {
	r := &replier{sh: sh}
	copy(r.gwMAC[:], gw)
	var g [6]byte
	copy(g[:], guest)
	r.guestMAC.Store(&g)
	return r
}

// learn records the guest's MAC from one of its frames, so replies reach a
// guest (a VM, say) that chose its own MAC.
func (r *replier) learn(src []byte) {
	cur := r.guestMAC.Load()
	if [6]byte(src) == *cur || src[0]&1 != 0 {
		return
	}
	m := [6]byte(src)
	r.guestMAC.Store(&m)
}

// frame returns a pooled frame of ip-layer size n with its Ethernet header
// written, or nil when n does not fit.
func (r *replier) frame(n int, v6 bool) *rings.Frame {
	if ethHdrLen+n > r.sh.Frames.Size() {
		r.sh.Counters.Drop(rings.DropOversized)
		return nil
	}
	f := r.sh.Frames.GetLen(ethHdrLen + n)
	dst := r.guestMAC.Load()
	copy(f.B[0:6], dst[:])
	copy(f.B[6:12], r.gwMAC[:])
	et := uint16(etherTypeIPv4)
	if v6 {
		et = etherTypeIPv6
	}
	binary.BigEndian.PutUint16(f.B[12:14], et)
	return f
}

// SendUDP delivers a UDP datagram from src to the guest at dst. It reports
// false when the datagram was dropped (too large for a frame, ring full).
func (r *replier) SendUDP(src, dst netip.AddrPort, payload []byte) bool {
	l4 := 8 + len(payload)
	ipl := ipHeaderLen(src.Addr())
	f := r.frame(ipl+l4, src.Addr().Is6())
	if f == nil {
		return false
	}
	b := f.B[ethHdrLen:]
	putIPHeader(b, src.Addr(), dst.Addr(), protoUDP, l4, uint16(r.ipID.Add(1)))
	u := b[ipl:]
	binary.BigEndian.PutUint16(u[0:2], src.Port())
	binary.BigEndian.PutUint16(u[2:4], dst.Port())
	binary.BigEndian.PutUint16(u[4:6], uint16(l4))
	u[6], u[7] = 0, 0
	copy(u[8:], payload)
	sum := ^checksum.Checksum(u[:l4], pseudoSum(src.Addr(), dst.Addr(), protoUDP, l4))
	if sum == 0 {
		sum = 0xffff
	}
	binary.BigEndian.PutUint16(u[6:8], sum)
	return r.sh.PushRx(f)
}

// SendEchoReply delivers an ICMP (or ICMPv6) echo reply from src to the
// guest at dst with the guest's own identifier and sequence number.
func (r *replier) SendEchoReply(src, dst netip.Addr, id, seq uint16, payload []byte) bool {
	v6 := src.Is6()
	l4 := 8 + len(payload)
	ipl := ipHeaderLen(src)
	f := r.frame(ipl+l4, v6)
	if f == nil {
		return false
	}
	b := f.B[ethHdrLen:]
	proto := uint8(protoICMP)
	typ := byte(0) // echo reply
	if v6 {
		proto, typ = protoICMPv6, 129
	}
	putIPHeader(b, src, dst, proto, l4, uint16(r.ipID.Add(1)))
	m := b[ipl:]
	m[0], m[1], m[2], m[3] = typ, 0, 0, 0
	binary.BigEndian.PutUint16(m[4:6], id)
	binary.BigEndian.PutUint16(m[6:8], seq)
	copy(m[8:], payload)
	var init uint16
	if v6 {
		init = pseudoSum(src, dst, protoICMPv6, l4)
	}
	binary.BigEndian.PutUint16(m[2:4], ^checksum.Checksum(m[:l4], init))
	return r.sh.PushRx(f)
}

// sendTCPReset answers the guest's TCP segment p (a SYN, usually) with a
// RST, as a closed port would.
func (r *replier) sendTCPReset(p *ipPacket) {
	t := p.l4
	if len(t) < 20 {
		return
	}
	dataOff := int(t[12]>>4) * 4
	if dataOff < 20 || dataOff > len(t) {
		return
	}
	flags := t[13]
	if flags&tcpRST != 0 {
		return
	}
	seq := binary.BigEndian.Uint32(t[4:8])
	ack := binary.BigEndian.Uint32(t[8:12])
	segLen := uint32(len(t) - dataOff)
	if flags&tcpSYN != 0 {
		segLen++
	}
	if flags&tcpFIN != 0 {
		segLen++
	}
	ipl := ipHeaderLen(p.dst)
	f := r.frame(ipl+20, p.v6)
	if f == nil {
		return
	}
	b := f.B[ethHdrLen:]
	proto := uint8(protoTCP)
	putIPHeader(b, p.dst, p.src, proto, 20, uint16(r.ipID.Add(1)))
	o := b[ipl : ipl+20]
	copy(o[0:2], t[2:4]) // our source port is their destination port
	copy(o[2:4], t[0:2])
	if flags&tcpACK != 0 {
		// RFC 9293: <SEQ=SEG.ACK><CTL=RST>
		binary.BigEndian.PutUint32(o[4:8], ack)
		binary.BigEndian.PutUint32(o[8:12], 0)
		o[13] = tcpRST
	} else {
		// <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>
		binary.BigEndian.PutUint32(o[4:8], 0)
		binary.BigEndian.PutUint32(o[8:12], seq+segLen)
		o[13] = tcpRST | tcpACK
	}
	o[12] = 5 << 4
	o[14], o[15], o[16], o[17], o[18], o[19] = 0, 0, 0, 0, 0, 0
	binary.BigEndian.PutUint16(o[16:18], ^checksum.Checksum(o, pseudoSum(p.dst, p.src, protoTCP, 20)))
	r.sh.PushRx(f)
}

// sendUnreachable answers the guest's packet p with "destination
// unreachable: administratively prohibited", quoting as much of p as the
// RFCs allow (576 bytes in all for IPv4, 1280 for IPv6).
func (r *replier) sendUnreachable(p *ipPacket, from netip.Addr) {
	quote := p.ip
	limit := 576 - 20 - 8
	if p.v6 {
		limit = 1280 - 40 - 8
	}
	if len(quote) > limit {
		quote = quote[:limit]
	}
	l4 := 8 + len(quote)
	ipl := ipHeaderLen(from)
	f := r.frame(ipl+l4, p.v6)
	if f == nil {
		return
	}
	b := f.B[ethHdrLen:]
	proto := uint8(protoICMP)
	typ, code := byte(3), byte(13) // communication administratively prohibited
	if p.v6 {
		proto, typ, code = protoICMPv6, 1, 1
	}
	putIPHeader(b, from, p.src, proto, l4, uint16(r.ipID.Add(1)))
	m := b[ipl:]
	m[0], m[1], m[2], m[3] = typ, code, 0, 0
	m[4], m[5], m[6], m[7] = 0, 0, 0, 0
	copy(m[8:], quote)
	var init uint16
	if p.v6 {
		init = pseudoSum(from, p.src, protoICMPv6, l4)
	}
	binary.BigEndian.PutUint16(m[2:4], ^checksum.Checksum(m[:l4], init))
	r.sh.PushRx(f)
}

// TCP flags.
const (
	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
	tcpACK = 0x10
)
