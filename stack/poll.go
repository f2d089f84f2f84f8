package stack

import (
	"encoding/binary"
	"net/netip"

	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/rings"
)

// routinePoll drains the tx ring whenever the TAP reader wakes it and
// handles every frame before the netstack sees it.
func (st *Stack) routinePoll() {
	defer st.wg.Done()
	sh := st.o.Shared
	for {
		select {
		case <-st.done:
			for {
				f, ok := sh.Tx.Pop()
				if !ok {
					return
				}
				sh.Frames.Put(f)
			}
		case <-sh.TxWake.C():
		}
		for {
			f, ok := sh.Tx.Pop()
			if !ok {
				break
			}
			st.handleFrame(f.B, f.GSO.NeedsCsum || f.GSO.DataValid)
			sh.Frames.Put(f)
		}
	}
}

// handleFrame classifies one guest frame: ARP and NDP only for the
// gateway's own addresses, new flows through the policy, UDP and echo to the
// proxies, everything else of TCP into the netstack. csumDone says the
// guest's kernel left the transport checksum to us (checksum offload) or
// validated it: it is then not verified again.
func (st *Stack) handleFrame(b []byte, csumDone bool) {
	c := &st.o.Shared.Counters
	if len(b) < ethHdrLen {
		c.Drop(rings.DropMalformed)
		return
	}
	if [6]byte(b[0:6]) != st.gwMAC && b[0]&1 == 0 {
		c.Drop(rings.DropOther) // unicast to someone else
		return
	}
	if b[6]&1 != 0 {
		c.Drop(rings.DropMalformed) // multicast source MAC
		return
	}
	st.r.learn(b[6:12])
	switch binary.BigEndian.Uint16(b[12:14]) {
	case etherTypeARP:
		st.handleARP(b)
	case etherTypeIPv4:
		st.handleIP(b, false, csumDone)
	case etherTypeIPv6:
		st.handleIP(b, true, csumDone)
	default:
		c.Drop(rings.DropOther)
	}
}

func (st *Stack) handleARP(b []byte) {
	a := b[ethHdrLen:]
	if len(a) < 28 || binary.BigEndian.Uint16(a[0:2]) != 1 || binary.BigEndian.Uint16(a[2:4]) != etherTypeIPv4 || a[4] != 6 || a[5] != 4 {
		st.o.Shared.Counters.Drop(rings.DropMalformed)
		return
	}
	switch binary.BigEndian.Uint16(a[6:8]) {
	case 1: // request: answer only for the gateway
		if netip.AddrFrom4([4]byte(a[24:28])) != st.o.Plan.GatewayV4 {
			st.o.Shared.Counters.Drop(rings.DropOther)
			return
		}
	case 2: // reply: lets the netstack learn the guest's MAC
	default:
		st.o.Shared.Counters.Drop(rings.DropMalformed)
		return
	}
	st.ep.deliver(b)
}

// guestSource reports whether a is an address the guest may send from.
func (st *Stack) guestSource(a netip.Addr) bool {
	p := st.o.Plan
	if a.Is4() {
		return a == p.GuestIPv4.Addr()
	}
	// Any address of the sandbox's /64 (a VM configures one by SLAAC from
	// our router advertisement), or link-local.
	return p.GuestIPv6.Masked().Contains(a) && a != p.GatewayV6 || a.IsLinkLocalUnicast()
}

func (st *Stack) isGateway(a netip.Addr) bool {
	return a == st.o.Plan.GatewayV4 || a == st.o.Plan.GatewayV6
}

func (st *Stack) handleIP(b []byte, v6, csumDone bool) {
	c := &st.o.Shared.Counters
	p, ok := parseIP(b[ethHdrLen:], v6)
	if !ok {
		c.Drop(rings.DropMalformed)
		return
	}
	p.csumDone = csumDone
	if v6 && p.proto == protoICMPv6 && p.src.IsUnspecified() {
		// DAD probes come from "::"; they need no answer from us.
		c.Drop(rings.DropOther)
		return
	}
	if !v6 && p.proto == protoUDP && len(p.l4) >= 8 && binary.BigEndian.Uint16(p.l4[0:2]) == 68 && binary.BigEndian.Uint16(p.l4[2:4]) == 67 {
		// DHCP: the client may not have an address yet.
		if transportChecksumOK(&p) {
			st.handleDHCP(p.l4[8:])
		} else {
			c.Drop(rings.DropMalformed)
		}
		return
	}
	if !st.guestSource(p.src) {
		c.Drop(rings.DropPolicy) // spoofed source
		return
	}
	if p.frag {
		// The guest's MTU matches ours and TCP sets DF; fragments are not
		// reassembled outside the netstack, so they are not relayed.
		c.Drop(rings.DropOther)
		return
	}
	switch p.proto {
	case protoTCP:
		st.handleTCP(b, &p)
	case protoUDP:
		st.handleUDP(&p)
	case protoICMP:
		if !v6 {
			st.handleICMP4(b, &p)
			return
		}
		c.Drop(rings.DropOther)
	case protoICMPv6:
		if v6 {
			st.handleICMP6(b, &p)
			return
		}
		c.Drop(rings.DropOther)
	default:
		c.Drop(rings.DropOther)
	}
}

func (st *Stack) handleTCP(b []byte, p *ipPacket) {
	c := &st.o.Shared.Counters
	t := p.l4
	if len(t) < 20 || int(t[12]>>4)*4 < 20 || int(t[12]>>4)*4 > len(t) {
		c.Drop(rings.DropMalformed)
		return
	}
	if !p.dst.IsGlobalUnicast() && !p.dst.IsPrivate() && !p.dst.IsLoopback() && !p.dst.IsLinkLocalUnicast() {
		c.Drop(rings.DropOther) // multicast, broadcast, unspecified
		return
	}
	if st.o.Offload && !p.csumDone && !transportChecksumOK(p) {
		// The netstack skips verification when offload is on; do it here
		// for the frames whose checksum is complete.
		c.Drop(rings.DropMalformed)
		return
	}
	flags := t[13]
	if flags&tcpSYN != 0 && flags&tcpACK == 0 {
		dst := netip.AddrPortFrom(p.dst, binary.BigEndian.Uint16(t[2:4]))
		if dst.Port() != 53 { // DNS is answered by the agent; its policy is the name's
			src := netip.AddrPortFrom(p.src, binary.BigEndian.Uint16(t[0:2]))
			if !st.decide(policy.Flow{Proto: policy.TCP, Src: src, Dst: dst}) {
				c.Drop(rings.DropPolicy)
				if st.o.DenyMode == DenyReject {
					st.r.sendTCPReset(p)
				}
				return
			}
		}
	}
	st.ep.deliver(b)
}

func (st *Stack) handleUDP(p *ipPacket) {
	c := &st.o.Shared.Counters
	u := p.l4
	if len(u) < 8 || int(binary.BigEndian.Uint16(u[4:6])) < 8 || int(binary.BigEndian.Uint16(u[4:6])) > len(u) {
		c.Drop(rings.DropMalformed)
		return
	}
	u = u[:binary.BigEndian.Uint16(u[4:6])]
	p.l4 = u
	if !transportChecksumOK(p) {
		c.Drop(rings.DropMalformed)
		return
	}
	src := netip.AddrPortFrom(p.src, binary.BigEndian.Uint16(u[0:2]))
	dst := netip.AddrPortFrom(p.dst, binary.BigEndian.Uint16(u[2:4]))
	if dst.Port() == 53 {
		if !st.dns.HandleUDP(src, dst, u[8:]) {
			c.Drop(rings.DropOther)
		}
		return
	}
	if st.isGateway(p.dst) {
		if h := st.ingress.Load(); h != nil && (*h).HandleGuestReply(dst.Port(), src, u[8:]) {
			return
		}
	}
	if p.dst.IsMulticast() || p.dst.IsUnspecified() || p.dst == netip.AddrFrom4([4]byte{255, 255, 255, 255}) || dst.Port() == 0 {
		c.Drop(rings.DropOther)
		return
	}
	switch err := st.udp.Handle(src, dst, u[8:]); err {
	case nil:
	default:
		c.Drop(rings.DropPolicy)
		if err != nil && st.o.DenyMode == DenyReject {
			st.r.sendUnreachable(p, p.dst)
		}
	}
}

func (st *Stack) handleICMP4(b []byte, p *ipPacket) {
	c := &st.o.Shared.Counters
	m := p.l4
	if len(m) < 8 || !transportChecksumOK(p) {
		c.Drop(rings.DropMalformed)
		return
	}
	if m[0] != 8 || m[1] != 0 { // only echo requests leave the sandbox
		c.Drop(rings.DropOther)
		return
	}
	st.handleEcho(b, p, policy.ICMP)
}

func (st *Stack) handleICMP6(b []byte, p *ipPacket) {
	c := &st.o.Shared.Counters
	m := p.l4
	if len(m) < 8 || !transportChecksumOK(p) {
		c.Drop(rings.DropMalformed)
		return
	}
	switch m[0] {
	case 128: // echo request
		st.handleEcho(b, p, policy.ICMPv6)
	case 135: // neighbour solicitation: only for the gateway's addresses
		if len(m) < 24 {
			c.Drop(rings.DropMalformed)
			return
		}
		target := netip.AddrFrom16([16]byte(m[8:24]))
		if target != st.o.Plan.GatewayV6 && target != st.gatewayLinkLocal() {
			c.Drop(rings.DropOther)
			return
		}
		st.ep.deliver(b)
	case 133: // router solicitation: the gateway is the router
		st.sendRouterAdvertisement()
	case 136, 130, 131, 132, 143: // NA, MLD
		st.ep.deliver(b)
	default:
		c.Drop(rings.DropOther)
	}
}

// gatewayLinkLocal is the gateway's EUI-64 link-local address, which the
// netstack generates from its MAC.
func (st *Stack) gatewayLinkLocal() netip.Addr {
	m := st.gwMAC
	var a [16]byte
	a[0], a[1] = 0xfe, 0x80
	a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15] = m[0]^2, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]
	return netip.AddrFrom16(a)
}

func (st *Stack) handleEcho(b []byte, p *ipPacket, proto policy.Proto) {
	c := &st.o.Shared.Counters
	if p.dst.IsMulticast() || p.dst.IsUnspecified() || !p.dst.IsValid() || p.dst == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
		c.Drop(rings.DropOther)
		return
	}
	m := p.l4
	if !st.decide(policy.Flow{Proto: proto, Src: netip.AddrPortFrom(p.src, 0), Dst: netip.AddrPortFrom(p.dst, 0)}) {
		c.Drop(rings.DropPolicy)
		if st.o.DenyMode == DenyReject {
			st.r.sendUnreachable(p, p.dst)
		}
		return
	}
	if st.isGateway(p.dst) || p.dst == st.gatewayLinkLocal() {
		st.ep.deliver(b) // the gateway answers its own echo
		return
	}
	id, seq := binary.BigEndian.Uint16(m[4:6]), binary.BigEndian.Uint16(m[6:8])
	if !st.echo.Handle(p.src, p.dst, id, seq, m[8:]) {
		c.Drop(rings.DropOther)
	}
}
