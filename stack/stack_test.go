package stack

import (
	"bytes"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/msbtap/msbtap/plan"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/rings"
	"github.com/msbtap/msbtap/wire"
)

// newTestStack returns a stack fed directly through its rings, with no TAP.
func newTestStack(t testing.TB, pc policy.Checker) (*Stack, *rings.Shared, plan.Plan) {
	t.Helper()
	return newTestStackWith(t, Options{Policy: pc})
}

func newTestStackWith(t testing.TB, o Options) (*Stack, *rings.Shared, plan.Plan) {
	t.Helper()
	p, _ := plan.ForSlot(0)
	sh := rings.NewShared(256, wire.SizesFor(p.MTU, o.Offload).Buffer)
	o.Plan, o.Shared = p, sh
	st, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close(); st.Wait() })
	return st, sh, p
}

func send(sh *rings.Shared, frame []byte) {
	f := sh.Frames.Get()
	f.B = append(f.B, frame...)
	sh.PushTx(f)
	sh.TxWake.Wake()
}

// recv waits for a frame for the guest that satisfies match.
func recv(t testing.TB, sh *rings.Shared, d time.Duration, match func([]byte) bool) []byte {
	t.Helper()
	deadline := time.After(d)
	for {
		for {
			f, ok := sh.Rx.Pop()
			if !ok {
				break
			}
			b := append([]byte(nil), f.B...)
			sh.Frames.Put(f)
			if match(b) {
				return b
			}
		}
		select {
		case <-sh.RxWake.C():
		case <-deadline:
			return nil
		}
	}
}

// recvIP waits for a well-formed IP frame that satisfies
// match.
func recvIP(t testing.TB, sh *rings.Shared, d time.Duration, match func(reply) bool) (reply, bool) {
	t.Helper()
	var got reply
	b := recv(t, sh, d, func(b []byte) bool {
		r, ok := decode(b)
		if ok && match(r) {
			got = r
			return true
		}
		return false
	})
	return got, b != nil
}

func isARPReply(b []byte) bool {
	if len(b) < header.EthernetMinimumSize+header.ARPSize || header.Ethernet(b).Type() != header.ARPProtocolNumber {
		return false
	}
	return header.ARP(b[header.EthernetMinimumSize:]).Op() == header.ARPReply
}

func TestARPOnlyForGateway(t *testing.T) {
	_, sh, p := newTestStack(t, nil)
	send(sh, arpRequest(p, p.GatewayV4))
	r := recv(t, sh, 2*time.Second, isARPReply)
	if r == nil {
		t.Fatal("no ARP reply for the gateway")
	}
	a := header.ARP(r[header.EthernetMinimumSize:])
	if !bytes.Equal(a.HardwareAddressSender(), p.GatewayMAC) || !bytes.Equal(a.ProtocolAddressSender(), p.GatewayV4.AsSlice()) {
		t.Errorf("ARP reply claims %x is at %x, want %s at %s", a.ProtocolAddressSender(), a.HardwareAddressSender(), p.GatewayV4, p.GatewayMAC)
	}
	send(sh, arpRequest(p, netip.MustParseAddr("100.96.0.3")))
	send(sh, arpRequest(p, netip.MustParseAddr("198.51.100.1")))
	if r := recv(t, sh, 300*time.Millisecond, isARPReply); r != nil {
		t.Fatalf("the gateway answered ARP for an address that is not its own: %x", r)
	}
}

func isEchoReply(id, seq uint16) func(reply) bool {
	return func(r reply) bool {
		switch r.proto() {
		case header.ICMPv4ProtocolNumber:
			m := header.ICMPv4(r.l4)
			return len(m) >= header.ICMPv4MinimumSize && m.Type() == header.ICMPv4EchoReply && m.Ident() == id && m.Sequence() == seq
		case header.ICMPv6ProtocolNumber:
			m := header.ICMPv6(r.l4)
			return len(m) >= header.ICMPv6EchoMinimumSize && m.Type() == header.ICMPv6EchoReply && m.Ident() == id && m.Sequence() == seq
		}
		return false
	}
}

func TestEchoToGatewayAnsweredLocally(t *testing.T) {
	_, sh, p := newTestStack(t, policy.AllowAll{})
	send(sh, arpRequest(p, p.GatewayV4)) // let the stack learn the guest
	send(sh, echoRequest(p, p.GatewayV4, 77, 1))
	r, ok := recvIP(t, sh, 2*time.Second, isEchoReply(77, 1))
	if !ok {
		t.Fatal("no echo reply from the gateway")
	}
	if r.src != p.GatewayV4 || r.dst != p.GuestIPv4.Addr() || !r.l4ChecksumOK() {
		t.Errorf("echo reply %s → %s, checksum ok %v", r.src, r.dst, r.l4ChecksumOK())
	}
}

type denyAll struct{}

func (denyAll) Check(policy.Flow) policy.Decision {
	return policy.Decision{Action: policy.Deny, Rule: -1}
}

func TestDeniedEchoGetsUnreachable(t *testing.T) {
	_, sh, p := newTestStack(t, denyAll{})
	for _, dst := range []netip.Addr{netip.MustParseAddr("198.51.100.9"), netip.MustParseAddr("2001:db8::9")} {
		send(sh, echoRequest(p, dst, 5, 9))
		r, ok := recvIP(t, sh, 2*time.Second, func(r reply) bool {
			switch r.proto() {
			case header.ICMPv4ProtocolNumber:
				m := header.ICMPv4(r.l4)
				return m.Type() == header.ICMPv4DstUnreachable && m.Code() == header.ICMPv4AdminProhibited
			case header.ICMPv6ProtocolNumber:
				m := header.ICMPv6(r.l4)
				return m.Type() == header.ICMPv6DstUnreachable && m.Code() == header.ICMPv6Prohibited
			}
			return false
		})
		if !ok {
			t.Fatalf("%s: no ICMP administratively-prohibited for a denied echo", dst)
		}
		if r.src != dst || !r.l4ChecksumOK() {
			t.Errorf("%s: unreachable from %s, checksum ok %v", dst, r.src, r.l4ChecksumOK())
		}
	}
	if got := sh.Counters.Drops(rings.DropPolicy); got != 2 {
		t.Errorf("policy drops: got %d, want 2", got)
	}
}

func TestDeniedSYNGetsReset(t *testing.T) {
	_, sh, p := newTestStack(t, denyAll{})
	for _, dst := range []netip.AddrPort{netip.MustParseAddrPort("198.51.100.9:443"), netip.MustParseAddrPort("[2001:db8::9]:443")} {
		send(sh, synFrame(p, dst))
		r, ok := recvIP(t, sh, 2*time.Second, func(r reply) bool { return r.proto() == header.TCPProtocolNumber })
		if !ok {
			t.Fatalf("%s: no reply to a denied SYN", dst)
		}
		tcp := header.TCP(r.l4)
		if tcp.Flags() != header.TCPFlagRst|header.TCPFlagAck || tcp.AckNumber() != 1001 {
			t.Errorf("%s: got flags %s ack %d, want RST|ACK acking 1001", dst, tcp.Flags(), tcp.AckNumber())
		}
		if tcp.SourcePort() != 443 || tcp.DestinationPort() != 40000 || r.src != dst.Addr() {
			t.Errorf("%s: reset %s:%d→%d", dst, r.src, tcp.SourcePort(), tcp.DestinationPort())
		}
		if !r.l4ChecksumOK() {
			t.Errorf("%s: bad TCP checksum on the reset", dst)
		}
	}
}

func TestMalformedFramesCounted(t *testing.T) {
	_, sh, p := newTestStack(t, policy.AllowAll{})
	good := echoRequest(p, p.GatewayV4, 1, 1)
	badSum := append([]byte(nil), good...)
	badSum[24] ^= 0xff // IPv4 header checksum
	short := good[:30]
	spoofed := guestFrame(p, tcpSegment(netip.MustParseAddrPort("10.0.0.9:1000"), netip.MustParseAddrPort("198.51.100.9:80"), header.TCPFlagSyn, 1))
	for _, f := range [][]byte{badSum, short, {1, 2, 3}} {
		send(sh, f)
	}
	send(sh, spoofed)
	deadline := time.Now().Add(2 * time.Second)
	for sh.Counters.Drops(rings.DropMalformed) < 3 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := sh.Counters.Drops(rings.DropMalformed); got != 3 {
		t.Errorf("malformed drops: got %d, want 3", got)
	}
	for sh.Counters.Drops(rings.DropPolicy) < 1 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := sh.Counters.Drops(rings.DropPolicy); got != 1 {
		t.Errorf("spoofed-source drops: got %d, want 1", got)
	}
}

// FuzzHandleFrame feeds arbitrary frames to the poll loop's classifier: it
// must never panic, whatever the guest sends.
func FuzzHandleFrame(f *testing.F) {
	p, _ := plan.ForSlot(0)
	f.Add(arpRequest(p, p.GatewayV4))
	f.Add(echoRequest(p, p.GatewayV4, 1, 1))
	f.Add(echoRequest(p, p.GatewayV6, 1, 1))
	f.Add(synFrame(p, netip.MustParseAddrPort("198.51.100.1:80")))
	f.Add(synFrame(p, netip.MustParseAddrPort("[2001:db8::1]:80")))
	f.Add([]byte{})
	st, sh, _ := newTestStack(f, denyAll{})
	f.Fuzz(func(t *testing.T, b []byte) {
		st.handleFrame(b, false)
		for {
			fr, ok := sh.Rx.Pop()
			if !ok {
				break
			}
			sh.Frames.Put(fr)
		}
	})
}

func BenchmarkHandleDeniedSYN(b *testing.B) {
	st, sh, p := newTestStack(b, denyAll{})
	frame := synFrame(p, netip.MustParseAddrPort("198.51.100.9:443"))
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		st.handleFrame(frame, false)
		if f, ok := sh.Rx.Pop(); ok {
			sh.Frames.Put(f)
		}
	}
}

// TestDeniedSYNAllocatesNothing: a refused SYN's flow is reported and
// given back, so a SYN flood under a deny policy costs the agent no
// garbage (each allocated 224 bytes when flows became values of their own).
func TestDeniedSYNAllocatesNothing(t *testing.T) {
	if testing.CoverMode() != "" || raceEnabled {
		t.Skip("allocation counts differ under -cover and -race")
	}
	st, sh, p := newTestStack(t, denyAll{})
	frame := synFrame(p, netip.MustParseAddrPort("198.51.100.9:443"))
	st.handleFrame(frame, false) // warm the pools
	if f, ok := sh.Rx.Pop(); ok {
		sh.Frames.Put(f)
	}
	n := testing.AllocsPerRun(200, func() {
		st.handleFrame(frame, false)
		if f, ok := sh.Rx.Pop(); ok {
			sh.Frames.Put(f)
		}
	})
	if n > 0 {
		t.Errorf("a denied SYN allocates %.1f times", n)
	}
}

func TestDHCP(t *testing.T) {
	_, sh, p := newTestStack(t, policy.AllowAll{})
	mac := net.HardwareAddr{0x52, 0x54, 0, 0x12, 0x34, 0x56}
	disc, err := dhcpv4.NewDiscovery(mac, dhcpv4.WithRequestedOptions(dhcpv4.OptionInterfaceMTU))
	if err != nil {
		t.Fatal(err)
	}
	bcast := net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	client, server := netip.MustParseAddrPort("0.0.0.0:68"), netip.MustParseAddrPort("255.255.255.255:67")
	dhcpFrame := func(m *dhcpv4.DHCPv4) []byte {
		return ethFrame(bcast, mac, header.IPv4ProtocolNumber, udpPacket(client, server, m.ToBytes()))
	}
	send(sh, dhcpFrame(disc))
	reply := func() *dhcpv4.DHCPv4 {
		t.Helper()
		r, ok := recvIP(t, sh, 2*time.Second, func(r reply) bool {
			return r.proto() == header.UDPProtocolNumber && header.UDP(r.l4).DestinationPort() == 68
		})
		if !ok {
			t.Fatal("no DHCP reply")
		}
		if string(r.eth.DestinationAddress()) != string(mac) || !r.l4ChecksumOK() {
			t.Errorf("reply to MAC %s (want the client's %s), checksum ok %v", r.eth.DestinationAddress(), mac, r.l4ChecksumOK())
		}
		m, err := dhcpv4.FromBytes(header.UDP(r.l4).Payload())
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	offer := reply()
	if offer.MessageType() != dhcpv4.MessageTypeOffer || !offer.YourIPAddr.Equal(p.GuestIPv4.Addr().AsSlice()) {
		t.Fatalf("offer: %s", offer.Summary())
	}
	if r := offer.Router(); len(r) != 1 || !r[0].Equal(p.GatewayV4.AsSlice()) {
		t.Errorf("router: %v", r)
	}
	if d := offer.DNS(); len(d) != 1 || !d[0].Equal(p.GatewayV4.AsSlice()) {
		t.Errorf("dns: %v", d)
	}
	if m := offer.SubnetMask(); net.IP(m).String() != "255.255.255.252" {
		t.Errorf("mask: %v", m)
	}
	if mtu := offer.GetOneOption(dhcpv4.OptionInterfaceMTU); len(mtu) != 2 || int(mtu[0])<<8|int(mtu[1]) != 1500 {
		t.Errorf("mtu option: %v", mtu)
	}
	req, _ := dhcpv4.NewRequestFromOffer(offer)
	send(sh, dhcpFrame(req))
	if ack := reply(); ack.MessageType() != dhcpv4.MessageTypeAck || ack.IPAddressLeaseTime(0) != DHCPLease {
		t.Fatalf("ack: %s", ack.Summary())
	}
	bad, _ := dhcpv4.NewRequestFromOffer(offer, dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.IPv4(100, 96, 0, 9))))
	send(sh, dhcpFrame(bad))
	if nak := reply(); nak.MessageType() != dhcpv4.MessageTypeNak {
		t.Fatalf("request for another address: %s", nak.Summary())
	}
}

func TestRouterAdvertisement(t *testing.T) {
	st, sh, p := newTestStack(t, policy.AllowAll{})
	st.sendRouterAdvertisement()
	r, ok := recvIP(t, sh, time.Second, func(r reply) bool {
		return r.proto() == header.ICMPv6ProtocolNumber && header.ICMPv6(r.l4).Type() == header.ICMPv6RouterAdvert
	})
	if !ok {
		t.Fatal("no router advertisement")
	}
	if !r.src.IsLinkLocalUnicast() || r.dst != netip.MustParseAddr("ff02::1") || r.v6.HopLimit() != 255 || !r.l4ChecksumOK() {
		t.Fatalf("RA %s → %s hop limit %d checksum ok %v", r.src, r.dst, r.v6.HopLimit(), r.l4ChecksumOK())
	}
	ra := header.NDPRouterAdvert(header.ICMPv6(r.l4).MessageBody())
	if ra.RouterLifetime() == 0 {
		t.Error("RA router lifetime 0: the gateway would not be a default router")
	}
	it, err := ra.Options().Iter(true)
	if err != nil {
		t.Fatal(err)
	}
	var sawPrefix, sawDNS, sawMAC, sawMTU bool
	for {
		o, done, err := it.Next()
		if err != nil {
			t.Fatalf("RA options: %v", err)
		}
		if done {
			break
		}
		switch o := o.(type) {
		case header.NDPPrefixInformation:
			sawPrefix = int(o.PrefixLength()) == p.GuestIPv6.Bits() && o.OnLinkFlag() && o.AutonomousAddressConfigurationFlag() &&
				netip.AddrFrom16(o.Prefix().As16()) == p.GuestIPv6.Masked().Addr()
		case header.NDPRecursiveDNSServer:
			addrs, _ := o.Addresses()
			sawDNS = len(addrs) == 1 && netip.AddrFrom16(addrs[0].As16()) == p.GatewayV6
		case header.NDPSourceLinkLayerAddressOption:
			sawMAC = string(o.EthernetAddress()) == string(p.GatewayMAC)
		}
	}
	body := header.ICMPv6(r.l4).MessageBody()
	for i := header.NDPRAMinimumSize; i+8 <= len(body); i += int(body[i+1]) * 8 {
		if body[i+1] == 0 {
			break
		}
		if body[i] == 5 {
			sawMTU = int(body[i+4])<<24|int(body[i+5])<<16|int(body[i+6])<<8|int(body[i+7]) == p.MTU
		}
	}
	if !sawPrefix || !sawDNS || !sawMAC || !sawMTU {
		t.Errorf("RA options: prefix %v, rdnss %v, source MAC %v, MTU %v", sawPrefix, sawDNS, sawMAC, sawMTU)
	}
}

// BenchmarkInjectFrame measures handing one guest frame to the netstack
// through the poll loop's classifier (an ARP reply: no answer is built).
func BenchmarkInjectFrame(b *testing.B) {
	st, _, p := newTestStack(b, policy.AllowAll{})
	frame := arpRequest(p, p.GatewayV4)
	header.ARP(frame[header.EthernetMinimumSize:]).SetOp(header.ARPReply)
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		st.handleFrame(frame, false)
	}
}

// FuzzDHCP: whatever a guest sends to the DHCP server port, the gateway
// never panics, and any reply it makes is a well-formed frame.
func FuzzDHCP(f *testing.F) {
	mac := net.HardwareAddr{0x52, 0x54, 0, 0x12, 0x34, 0x56}
	disc, _ := dhcpv4.NewDiscovery(mac)
	f.Add(disc.ToBytes())
	req, _ := dhcpv4.NewDiscovery(mac, dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest))
	f.Add(req.ToBytes())
	f.Add([]byte{1, 1, 6, 0})
	st, sh, _ := newTestStack(f, policy.AllowAll{})
	f.Fuzz(func(t *testing.T, payload []byte) {
		st.handleDHCP(payload)
		for {
			fr, ok := sh.PopRx()
			if !ok {
				break
			}
			if _, ok := decode(fr.B); !ok {
				t.Fatalf("malformed reply frame %x", fr.B)
			}
			sh.Frames.Put(fr)
		}
	})
}
