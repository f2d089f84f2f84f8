package stack

import (
	"net"
	"net/netip"
	"sync/atomic"

	"github.com/msbtap/msbtap/rings"
	"github.com/msbtap/msbtap/wire"
)

// replier builds frames for the guest outside the netstack: UDP datagrams
// and echo replies relayed by the proxies, the resets and unreachables that
// answer denied flows, and router advertisements. It implements
// proxy.Replier.
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

func (r *replier) nextID() uint16 { return uint16(r.ipID.Add(1)) }

// send builds an IP packet of ipLen bytes with put into a pooled frame
// addressed to dst (the guest, unless given) and queues it for the guest.
// It reports false when the packet does not fit a frame or the ring is full.
func (r *replier) send(v6 bool, ipLen int, dst *[6]byte, put func(b []byte) int) bool {
	if wire.EthHdrLen+ipLen > r.sh.Frames.Size() {
		r.sh.Counters.Drop(rings.DropOversized)
		return false
	}
	f := r.sh.Frames.GetLen(wire.EthHdrLen + ipLen)
	if dst == nil {
		dst = r.guestMAC.Load()
	}
	et := wire.EtherTypeIPv4
	if v6 {
		et = wire.EtherTypeIPv6
	}
	wire.PutEthernet(f.B, *dst, r.gwMAC, et)
	n := put(f.B[wire.EthHdrLen:])
	if n == 0 {
		r.sh.Frames.Put(f)
		return false
	}
	f.SetLen(wire.EthHdrLen + n)
	return r.sh.PushRx(f)
}

// SendUDP delivers a UDP datagram from src to the guest at dst. It reports
// false when the datagram was dropped (too large for a frame, ring full).
func (r *replier) SendUDP(src, dst netip.AddrPort, payload []byte) bool {
	v6 := src.Addr().Is6()
	return r.send(v6, wire.UDPLen(v6, len(payload)), nil, func(b []byte) int {
		return wire.PutUDP(b, src, dst, payload, r.nextID())
	})
}

// SendEchoReply delivers an ICMP (or ICMPv6) echo reply from src to the
// guest at dst with the guest's own identifier and sequence number.
func (r *replier) SendEchoReply(src, dst netip.Addr, id, seq uint16, payload []byte) bool {
	v6 := src.Is6()
	return r.send(v6, wire.EchoReplyLen(v6, len(payload)), nil, func(b []byte) int {
		return wire.PutEchoReply(b, src, dst, id, seq, payload, r.nextID())
	})
}

// sendTCPReset answers the guest's TCP segment (a SYN, usually) with a
// RST, as a closed port would.
func (r *replier) sendTCPReset(p *wire.Packet, seg wire.TCPSegment) {
	r.send(p.V6, wire.TCPResetLen(p.V6), nil, func(b []byte) int {
		return wire.PutTCPReset(b, p, seg, r.nextID())
	})
}

// sendUnreachable answers the guest's packet p with an ICMP destination
// unreachable from the address from.
func (r *replier) sendUnreachable(p *wire.Packet, from netip.Addr, why wire.Unreach) {
	r.send(p.V6, wire.UnreachableLen(p), nil, func(b []byte) int {
		return wire.PutUnreachable(b, p, from, why, r.nextID())
	})
}

// sendRouterAdvertisement announces the gateway as the sandbox's IPv6
// router, to all nodes.
func (st *Stack) sendRouterAdvertisement() {
	p := st.o.Plan
	ra := wire.RouterAdvert{GatewayMAC: st.gwMAC, Prefix: p.GuestIPv6.Masked(), MTU: uint32(p.MTU), DNS: p.GatewayV6}
	dst := wire.AllNodesMAC
	st.r.send(true, ra.Len(), &dst, ra.Put)
}
