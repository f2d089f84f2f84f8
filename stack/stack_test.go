package stack

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"

	"github.com/msbtap/msbtap/plan"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/rings"
)

// newTestStack returns a stack fed directly through its rings, with no TAP.
func newTestStack(t testing.TB, pc policy.Checker) (*Stack, *rings.Shared, plan.Plan) {
	t.Helper()
	p, _ := plan.ForSlot(0)
	sh := rings.NewShared(256, p.FrameSize()+256)
	st, err := New(Options{Plan: p, Shared: sh, Policy: pc})
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

func eth(dst, src net.HardwareAddr, typ uint16, payload []byte) []byte {
	b := append(append(append([]byte{}, dst...), src...), byte(typ>>8), byte(typ))
	return append(b, payload...)
}

func arpRequest(p plan.Plan, target netip.Addr) []byte {
	a := make([]byte, 28)
	binary.BigEndian.PutUint16(a[0:2], 1)
	binary.BigEndian.PutUint16(a[2:4], 0x0800)
	a[4], a[5] = 6, 4
	binary.BigEndian.PutUint16(a[6:8], 1)
	copy(a[8:14], p.GuestMAC)
	g := p.GuestIPv4.Addr().As4()
	copy(a[14:18], g[:])
	tg := target.As4()
	copy(a[24:28], tg[:])
	return eth(net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, p.GuestMAC, 0x0806, a)
}

func isARPReply(b []byte) bool {
	return len(b) >= 42 && binary.BigEndian.Uint16(b[12:14]) == 0x0806 && binary.BigEndian.Uint16(b[20:22]) == 2
}

func TestARPOnlyForGateway(t *testing.T) {
	_, sh, p := newTestStack(t, nil)
	send(sh, arpRequest(p, p.GatewayV4))
	r := recv(t, sh, 2*time.Second, isARPReply)
	if r == nil {
		t.Fatal("no ARP reply for the gateway")
	}
	if !bytes.Equal(r[22:28], p.GatewayMAC) {
		t.Errorf("ARP reply claims MAC %x, want %s", r[22:28], p.GatewayMAC)
	}
	send(sh, arpRequest(p, netip.MustParseAddr("100.96.0.3")))
	send(sh, arpRequest(p, netip.MustParseAddr("198.51.100.1")))
	if r := recv(t, sh, 300*time.Millisecond, isARPReply); r != nil {
		t.Fatalf("the gateway answered ARP for an address that is not its own: %x", r)
	}
}

func icmpEcho(p plan.Plan, dst netip.Addr, id, seq uint16) []byte {
	m := make([]byte, 8+16)
	m[0] = 8
	binary.BigEndian.PutUint16(m[4:6], id)
	binary.BigEndian.PutUint16(m[6:8], seq)
	copy(m[8:], "msbtap-echo-test")
	binary.BigEndian.PutUint16(m[2:4], ^checksum.Checksum(m, 0))
	ip := make([]byte, 20+len(m))
	putIPHeader(ip, p.GuestIPv4.Addr(), dst, protoICMP, len(m), 1)
	copy(ip[20:], m)
	return eth(p.GatewayMAC, p.GuestMAC, 0x0800, ip)
}

func isEchoReply(id, seq uint16) func([]byte) bool {
	return func(b []byte) bool {
		if len(b) < 42 || binary.BigEndian.Uint16(b[12:14]) != 0x0800 || b[23] != protoICMP {
			return false
		}
		m := b[34:]
		return m[0] == 0 && binary.BigEndian.Uint16(m[4:6]) == id && binary.BigEndian.Uint16(m[6:8]) == seq
	}
}

func TestEchoToGatewayAnsweredLocally(t *testing.T) {
	_, sh, p := newTestStack(t, policy.AllowAll{})
	send(sh, arpRequest(p, p.GatewayV4)) // let the stack learn the guest
	send(sh, icmpEcho(p, p.GatewayV4, 77, 1))
	if recv(t, sh, 2*time.Second, isEchoReply(77, 1)) == nil {
		t.Fatal("no echo reply from the gateway")
	}
}

type denyAll struct{}

func (denyAll) Check(policy.Flow) policy.Decision {
	return policy.Decision{Action: policy.Deny, Rule: -1}
}

func TestDeniedEchoGetsUnreachable(t *testing.T) {
	_, sh, p := newTestStack(t, denyAll{})
	send(sh, icmpEcho(p, netip.MustParseAddr("198.51.100.9"), 5, 9))
	r := recv(t, sh, 2*time.Second, func(b []byte) bool {
		return len(b) > 42 && b[23] == protoICMP && b[34] == 3 && b[35] == 13
	})
	if r == nil {
		t.Fatal("no ICMP administratively-prohibited for a denied echo")
	}
	if got := sh.Counters.Drops(rings.DropPolicy); got != 1 {
		t.Errorf("policy drops: got %d, want 1", got)
	}
}

func synFrame(p plan.Plan, dst netip.AddrPort) []byte {
	tcp := make([]byte, 20)
	binary.BigEndian.PutUint16(tcp[0:2], 40000)
	binary.BigEndian.PutUint16(tcp[2:4], dst.Port())
	binary.BigEndian.PutUint32(tcp[4:8], 1000)
	tcp[12], tcp[13] = 5<<4, tcpSYN
	binary.BigEndian.PutUint16(tcp[14:16], 65535)
	src := p.GuestIPv4.Addr()
	binary.BigEndian.PutUint16(tcp[16:18], ^checksum.Checksum(tcp, pseudoSum(src, dst.Addr(), protoTCP, 20)))
	ip := make([]byte, 40)
	putIPHeader(ip, src, dst.Addr(), protoTCP, 20, 2)
	copy(ip[20:], tcp)
	return eth(p.GatewayMAC, p.GuestMAC, 0x0800, ip)
}

func TestDeniedSYNGetsReset(t *testing.T) {
	_, sh, p := newTestStack(t, denyAll{})
	send(sh, synFrame(p, netip.MustParseAddrPort("198.51.100.9:443")))
	r := recv(t, sh, 2*time.Second, func(b []byte) bool { return len(b) >= 54 && b[23] == protoTCP })
	if r == nil {
		t.Fatal("no reply to a denied SYN")
	}
	tcp := r[34:]
	if tcp[13] != tcpRST|tcpACK || binary.BigEndian.Uint32(tcp[8:12]) != 1001 {
		t.Errorf("got flags %#x ack %d, want RST|ACK acking 1001", tcp[13], binary.BigEndian.Uint32(tcp[8:12]))
	}
	if binary.BigEndian.Uint16(tcp[0:2]) != 443 || binary.BigEndian.Uint16(tcp[2:4]) != 40000 {
		t.Errorf("reset ports %d→%d, want 443→40000", binary.BigEndian.Uint16(tcp[0:2]), binary.BigEndian.Uint16(tcp[2:4]))
	}
	if checksum.Checksum(tcp[:20], pseudoSum(netip.MustParseAddr("198.51.100.9"), p.GuestIPv4.Addr(), protoTCP, 20)) != 0xffff {
		t.Error("bad TCP checksum on the reset")
	}
}

func TestMalformedFramesCounted(t *testing.T) {
	_, sh, p := newTestStack(t, policy.AllowAll{})
	good := icmpEcho(p, p.GatewayV4, 1, 1)
	badSum := append([]byte(nil), good...)
	badSum[24] ^= 0xff // IPv4 header checksum
	short := good[:30]
	spoofed := icmpEcho(p, p.GatewayV4, 1, 1)
	copy(spoofed[26:30], []byte{10, 0, 0, 9})
	binary.BigEndian.PutUint16(spoofed[24:26], 0)
	binary.BigEndian.PutUint16(spoofed[24:26], ^checksum.Checksum(spoofed[14:34], 0))
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

func TestParseIP(t *testing.T) {
	p, _ := plan.ForSlot(0)
	f := icmpEcho(p, p.GatewayV4, 1, 2)
	ip, ok := parseIP(f[14:], false)
	if !ok || ip.proto != protoICMP || ip.dst != p.GatewayV4 || ip.src != p.GuestIPv4.Addr() || len(ip.l4) != 24 {
		t.Fatalf("parseIP: %+v %v", ip, ok)
	}
	// Trailing Ethernet padding is cut by the IP total length.
	padded := append(append([]byte(nil), f[14:]...), 0, 0, 0, 0)
	if ip, ok := parseIP(padded, false); !ok || len(ip.ip) != len(f)-14 {
		t.Errorf("padding not trimmed: %d", len(ip.ip))
	}
	if _, ok := parseIP(f[14:30], false); ok {
		t.Error("truncated packet accepted")
	}
}

// FuzzHandleFrame feeds arbitrary frames to the poll loop's classifier: it
// must never panic, whatever the guest sends.
func FuzzHandleFrame(f *testing.F) {
	p, _ := plan.ForSlot(0)
	f.Add(arpRequest(p, p.GatewayV4))
	f.Add(icmpEcho(p, p.GatewayV4, 1, 1))
	f.Add(synFrame(p, netip.MustParseAddrPort("198.51.100.1:80")))
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

func udpFrame(src, dst netip.AddrPort, srcMAC, dstMAC net.HardwareAddr, payload []byte) []byte {
	u := make([]byte, 8+len(payload))
	binary.BigEndian.PutUint16(u[0:2], src.Port())
	binary.BigEndian.PutUint16(u[2:4], dst.Port())
	binary.BigEndian.PutUint16(u[4:6], uint16(len(u)))
	copy(u[8:], payload)
	binary.BigEndian.PutUint16(u[6:8], ^checksum.Checksum(u, pseudoSum(src.Addr(), dst.Addr(), protoUDP, len(u))))
	ip := make([]byte, 20+len(u))
	putIPHeader(ip, src.Addr(), dst.Addr(), protoUDP, len(u), 3)
	copy(ip[20:], u)
	return eth(dstMAC, srcMAC, 0x0800, ip)
}

func TestDHCP(t *testing.T) {
	_, sh, p := newTestStack(t, policy.AllowAll{})
	mac := net.HardwareAddr{0x52, 0x54, 0, 0x12, 0x34, 0x56}
	disc, err := dhcpv4.NewDiscovery(mac, dhcpv4.WithRequestedOptions(dhcpv4.OptionInterfaceMTU))
	if err != nil {
		t.Fatal(err)
	}
	bcast := net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	send(sh, udpFrame(netip.MustParseAddrPort("0.0.0.0:68"), netip.MustParseAddrPort("255.255.255.255:67"), mac, bcast, disc.ToBytes()))
	reply := func() *dhcpv4.DHCPv4 {
		r := recv(t, sh, 2*time.Second, func(b []byte) bool {
			return len(b) > 42 && b[23] == protoUDP && binary.BigEndian.Uint16(b[36:38]) == 68
		})
		if r == nil {
			t.Fatal("no DHCP reply")
		}
		if !bytes.Equal(r[0:6], mac) {
			t.Errorf("reply to MAC %x, want the client's %s", r[0:6], mac)
		}
		m, err := dhcpv4.FromBytes(r[42:])
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
	if mtu := offer.GetOneOption(dhcpv4.OptionInterfaceMTU); binary.BigEndian.Uint16(mtu) != 1500 {
		t.Errorf("mtu option: %v", mtu)
	}
	req, _ := dhcpv4.NewRequestFromOffer(offer)
	send(sh, udpFrame(netip.MustParseAddrPort("0.0.0.0:68"), netip.MustParseAddrPort("255.255.255.255:67"), mac, bcast, req.ToBytes()))
	if ack := reply(); ack.MessageType() != dhcpv4.MessageTypeAck || ack.IPAddressLeaseTime(0) != DHCPLease {
		t.Fatalf("ack: %s", ack.Summary())
	}
	bad, _ := dhcpv4.NewRequestFromOffer(offer, dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.IPv4(100, 96, 0, 9))))
	send(sh, udpFrame(netip.MustParseAddrPort("0.0.0.0:68"), netip.MustParseAddrPort("255.255.255.255:67"), mac, bcast, bad.ToBytes()))
	if nak := reply(); nak.MessageType() != dhcpv4.MessageTypeNak {
		t.Fatalf("request for another address: %s", nak.Summary())
	}
}

func TestRouterAdvertisement(t *testing.T) {
	st, sh, p := newTestStack(t, policy.AllowAll{})
	st.sendRouterAdvertisement()
	r := recv(t, sh, time.Second, func(b []byte) bool { return len(b) > 54 && b[20] == protoICMPv6 && b[54] == 134 })
	if r == nil {
		t.Fatal("no router advertisement")
	}
	ip, ok := parseIP(r[14:], true)
	if !ok || !ip.src.IsLinkLocalUnicast() || ip.dst != netip.MustParseAddr("ff02::1") || r[14+7] != 255 {
		t.Fatalf("RA addressing: %+v hop limit %d", ip, r[21])
	}
	if !transportChecksumOK(&ip) {
		t.Error("bad RA checksum")
	}
	pfx := p.GuestIPv6.Masked().Addr().As16()
	if !bytes.Contains(ip.l4, pfx[:8]) {
		t.Error("RA lacks the sandbox prefix")
	}
}

// BenchmarkInjectFrame measures handing one guest frame to the netstack
// through the poll loop's classifier (an ARP reply: no answer is built).
func BenchmarkInjectFrame(b *testing.B) {
	st, _, p := newTestStack(b, policy.AllowAll{})
	frame := arpRequest(p, p.GatewayV4)
	binary.BigEndian.PutUint16(frame[20:22], 2) // reply
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		st.handleFrame(frame, false)
	}
}
