package stack

import (
	"errors"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/proxy"
	"github.com/msbtap/msbtap/rings"
	"github.com/msbtap/msbtap/wire"
)

// routinePoll drains the tx ring whenever the TAP reader wakes it and
// handles every frame before the netstack sees it. The reader handles its
// frames itself while nobody else does (see rings.Shared.AcquireTx): the
// poll loop takes the ones that queued while a batch was being handled.
func (st *Stack) routinePoll() {
	defer st.wg.Done()
	sh := st.o.Shared
	for {
		select {
		case <-st.done:
			for {
				f, ok := sh.PopTx()
				if !ok {
					return
				}
				sh.Frames.Put(f)
			}
		case <-sh.TxWake.C():
		}
		for {
			h, ok := sh.AcquireTx()
			if !ok {
				break // the reader handles them, and drains the ring before it lets go
			}
			for {
				f, ok := sh.PopTx()
				if !ok {
					break
				}
				h(f)
			}
			if !sh.ReleaseTx() {
				break
			}
		}
	}
}

// handleTx handles one guest frame and takes it back to the pool.
func (st *Stack) handleTx(f *rings.Frame) {
	st.handleFrame(f.B, f.GSO.NeedsCsum || f.GSO.DataValid)
	st.o.Shared.Frames.Put(f)
}

// handleFrame classifies one guest frame: ARP and NDP only for the
// gateway's own addresses, new flows through the policy, UDP and echo to the
// proxies, everything else of TCP into the netstack. csumDone says the
// guest's kernel left the transport checksum to us (checksum offload) or
// validated it: it is then not verified again.
func (st *Stack) handleFrame(b []byte, csumDone bool) {
	c := &st.o.Shared.Counters
	if len(b) < wire.EthHdrLen {
		c.Drop(rings.DropMalformed)
		return
	}
	eth := header.Ethernet(b)
	dst, src := eth.DestinationAddress(), eth.SourceAddress()
	if string(dst) != string(st.gwMAC[:]) && dst[0]&1 == 0 {
		c.Drop(rings.DropOther) // unicast to someone else
		return
	}
	if src[0]&1 != 0 {
		c.Drop(rings.DropMalformed) // multicast source MAC
		return
	}
	st.r.learn(b[6:12])
	switch uint16(eth.Type()) {
	case wire.EtherTypeARP:
		st.handleARP(b)
	case wire.EtherTypeIPv4:
		st.handleIP(b, false, csumDone)
	case wire.EtherTypeIPv6:
		st.handleIP(b, true, csumDone)
	default:
		c.Drop(rings.DropOther)
	}
}

func (st *Stack) handleARP(b []byte) {
	a := header.ARP(b[wire.EthHdrLen:])
	if !a.IsValid() {
		st.o.Shared.Counters.Drop(rings.DropMalformed)
		return
	}
	switch a.Op() {
	case header.ARPRequest: // answer only for the gateway
		if netip.AddrFrom4([4]byte(a.ProtocolAddressTarget())) != st.o.Plan.GatewayV4 {
			st.o.Shared.Counters.Drop(rings.DropOther)
			return
		}
	case header.ARPReply: // lets the netstack learn the guest's MAC
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
	return a == st.o.Plan.GatewayV4 || a == st.o.Plan.GatewayV6 || a == st.gwLinkLocal
}

func (st *Stack) handleIP(b []byte, v6, csumDone bool) {
	c := &st.o.Shared.Counters
	p, ok := wire.Parse(b[wire.EthHdrLen:], v6)
	if !ok {
		c.Drop(rings.DropMalformed)
		return
	}
	p.CsumDone = csumDone
	if v6 && p.Proto == wire.ProtoICMPv6 && p.Src.IsUnspecified() {
		// DAD probes come from "::"; they need no answer from us.
		c.Drop(rings.DropOther)
		return
	}
	if !v6 && p.Proto == wire.ProtoUDP {
		if d, _, ok := wire.ParseUDP(p.L4); ok && d.SrcPort == wire.PortDHCPClient && d.DstPort == wire.PortDHCPServer {
			// DHCP: the client may not have an address yet.
			if p.TransportChecksumOK() {
				st.handleDHCP(d.Payload)
			} else {
				c.Drop(rings.DropMalformed)
			}
			return
		}
	}
	if !st.guestSource(p.Src) {
		c.Drop(rings.DropPolicy) // spoofed source
		return
	}
	if p.Frag {
		// Put the datagram back together first: every decision is made on
		// a whole packet, never on a piece.
		ip, err := st.frags.Add(&p)
		if err != nil {
			c.Drop(rings.DropFragment)
			return
		}
		if ip == nil {
			return // more to come
		}
		frame := make([]byte, wire.EthHdrLen+len(ip)) // rare: a buffer of its own
		copy(frame, b[:wire.EthHdrLen])
		copy(frame[wire.EthHdrLen:], ip)
		st.handleIP(frame, v6, false)
		return
	}
	switch {
	case p.Proto == wire.ProtoTCP:
		st.handleTCP(b, &p)
	case p.Proto == wire.ProtoUDP:
		st.handleUDP(&p)
	case p.Proto == wire.ProtoICMP && !v6:
		st.handleICMP4(b, &p)
	case p.Proto == wire.ProtoICMPv6 && v6:
		st.handleICMP6(b, &p)
	default:
		c.Drop(rings.DropOther)
	}
}

func (st *Stack) handleTCP(b []byte, p *wire.Packet) {
	c := &st.o.Shared.Counters
	seg, ok := wire.ParseTCP(p.L4)
	if !ok {
		c.Drop(rings.DropMalformed)
		return
	}
	if !p.Dst.IsGlobalUnicast() && !p.Dst.IsPrivate() && !p.Dst.IsLoopback() && !p.Dst.IsLinkLocalUnicast() {
		c.Drop(rings.DropOther) // multicast, broadcast, unspecified
		return
	}
	if st.o.Offload && !p.CsumDone {
		if !p.TransportChecksumOK() {
			// The netstack skips verification when offload is on; do it
			// here for the frames whose checksum is complete.
			c.Drop(rings.DropMalformed)
			return
		}
		p.CsumDone = true
	}
	if st.fast != nil && st.fast.Handle(p, seg) {
		return // a fast-path connection's segment (a SYN again, too)
	}
	if seg.IsSYN() && seg.DstPort != wire.PortDNS { // DNS is answered by the agent; its policy is the name's
		f := policy.Flow{Proto: policy.TCP, Src: netip.AddrPortFrom(p.Src, seg.SrcPort), Dst: netip.AddrPortFrom(p.Dst, seg.DstPort)}
		if !st.newConnAllowed() {
			// Over --max-new-connections-per-second: refused before any
			// decision or dial.
			st.stats.rateLimited.Add(1)
			st.r.sendTCPReset(p, seg)
			return
		}
		fl := st.decide(f)
		if d := fl.Decision.Action; d != policy.Allow && (d != policy.Ask || st.o.Ask == nil) { // an ask is held in the forwarder (tcp.go)
			c.Drop(rings.DropPolicy)
			if st.o.DenyMode == DenyReject {
				st.r.sendTCPReset(p, seg)
			}
			st.flows.Release(fl) // reported and refused: a SYN flood allocates nothing
			return
		}
		if st.fastEligible(fl) {
			st.openFast(p, seg, fl)
			return
		}
		st.syns.put(synKey{f.Src, f.Dst}, fl)
	}
	st.ep.deliver(b)
}

func (st *Stack) handleUDP(p *wire.Packet) {
	c := &st.o.Shared.Counters
	d, n, ok := wire.ParseUDP(p.L4)
	if !ok {
		c.Drop(rings.DropMalformed)
		return
	}
	p.L4 = p.L4[:n]
	if !p.TransportChecksumOK() {
		c.Drop(rings.DropMalformed)
		return
	}
	src := netip.AddrPortFrom(p.Src, d.SrcPort)
	dst := netip.AddrPortFrom(p.Dst, d.DstPort)
	if d.DstPort == wire.PortDNS {
		if !st.dns.HandleUDP(src, dst, d.Payload) {
			c.Drop(rings.DropOther)
		}
		return
	}
	if st.isGateway(p.Dst) {
		if h := st.ingress.Load(); h != nil && (*h).HandleGuestReply(d.DstPort, src, d.Payload) {
			return
		}
	}
	if p.Dst.IsMulticast() || p.Dst.IsUnspecified() || p.Dst == netip.IPv4Unspecified() || p.Dst == broadcast4 || d.DstPort == 0 {
		c.Drop(rings.DropOther)
		return
	}
	if fl, err := st.udp.Handle(src, dst, d.Payload); err != nil {
		if errors.Is(err, proxy.ErrLimit) {
			return // over a session cap: counted as udp_dropped, no ICMP
		}
		c.Drop(rings.DropPolicy)
		switch {
		case fl != nil && fl.Decision.Rule == policy.RuleQUIC:
			// Port unreachable, whatever --deny-mode says: the client
			// falls back to TCP at once.
			st.r.sendUnreachable(p, p.Dst, wire.PortUnreachable)
		case st.o.DenyMode == DenyReject:
			st.r.sendUnreachable(p, p.Dst, wire.AdminProhibited)
		}
	}
}

var broadcast4 = netip.AddrFrom4([4]byte{255, 255, 255, 255})

func (st *Stack) handleICMP4(b []byte, p *wire.Packet) {
	c := &st.o.Shared.Counters
	if len(p.L4) < header.ICMPv4MinimumSize || !p.TransportChecksumOK() {
		c.Drop(rings.DropMalformed)
		return
	}
	m := header.ICMPv4(p.L4)
	if m.Type() != header.ICMPv4Echo || m.Code() != 0 { // only echo requests leave the sandbox
		c.Drop(rings.DropOther)
		return
	}
	st.handleEcho(b, p, policy.ICMP)
}

func (st *Stack) handleICMP6(b []byte, p *wire.Packet) {
	c := &st.o.Shared.Counters
	if len(p.L4) < header.ICMPv6MinimumSize || !p.TransportChecksumOK() {
		c.Drop(rings.DropMalformed)
		return
	}
	m := header.ICMPv6(p.L4)
	switch m.Type() {
	case header.ICMPv6EchoRequest:
		st.handleEcho(b, p, policy.ICMPv6)
	case header.ICMPv6NeighborSolicit: // only for the gateway's addresses
		if len(m) < header.ICMPv6NeighborSolicitMinimumSize {
			c.Drop(rings.DropMalformed)
			return
		}
		target := wire.NetipAddr(header.NDPNeighborSolicit(m.MessageBody()).TargetAddress())
		if target != st.o.Plan.GatewayV6 && target != st.gwLinkLocal {
			c.Drop(rings.DropOther)
			return
		}
		st.ep.deliver(b)
	case header.ICMPv6RouterSolicit: // the gateway is the router
		st.sendRouterAdvertisement()
	case header.ICMPv6NeighborAdvert, header.ICMPv6MulticastListenerQuery, header.ICMPv6MulticastListenerReport,
		header.ICMPv6MulticastListenerDone, header.ICMPv6MulticastListenerV2Report:
		st.ep.deliver(b)
	default:
		c.Drop(rings.DropOther)
	}
}

func (st *Stack) handleEcho(b []byte, p *wire.Packet, proto policy.Proto) {
	c := &st.o.Shared.Counters
	if p.Dst.IsMulticast() || p.Dst.IsUnspecified() || !p.Dst.IsValid() || p.Dst == broadcast4 {
		c.Drop(rings.DropOther)
		return
	}
	f := policy.Flow{Proto: proto, Src: netip.AddrPortFrom(p.Src, 0), Dst: netip.AddrPortFrom(p.Dst, 0)}
	if st.isGateway(p.Dst) {
		// The gateway answers its own echo requests: that exposes nothing
		// of the host, and a user's first connectivity check works under
		// every policy that allows anything at all.
		if st.allowsAnything() {
			st.report(st.flows.New(f, policy.Decision{Action: policy.Allow, Rule: policy.RuleGatewayEcho}))
			st.ep.deliver(b)
			return
		}
		st.report(st.flows.New(f, policy.Decision{Action: policy.Deny, Rule: policy.RuleDefault}))
		c.Drop(rings.DropPolicy)
		if st.o.DenyMode == DenyReject {
			st.r.sendUnreachable(p, p.Dst, wire.AdminProhibited)
		}
		return
	}
	if fl := st.decide(f); !fl.Allowed() || !st.dialAllowed(fl) {
		c.Drop(rings.DropPolicy)
		if st.o.DenyMode == DenyReject {
			st.r.sendUnreachable(p, p.Dst, wire.AdminProhibited)
		}
		return
	}
	// Echo requests have the same layout in ICMPv4 and ICMPv6.
	m := header.ICMPv4(p.L4)
	if !st.echo.Handle(p.Src, p.Dst, m.Ident(), m.Sequence(), m.Payload()) {
		c.Drop(rings.DropOther)
	}
}
