package wire

import (
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

var (
	guest4 = netip.MustParseAddr("100.96.0.2")
	gw4    = netip.MustParseAddr("100.96.0.1")
	guest6 = netip.MustParseAddr("fd42:6d73:62::2")
	far6   = netip.MustParseAddr("2001:db8::9")
)

func TestSizesFor(t *testing.T) {
	for _, tc := range []struct {
		mtu        int
		offload    bool
		frame, udp int
	}{
		{1500, false, 1518, 1472},
		{1500, true, 65553, 1472},
		{65520, false, 65538, 65492},
	} {
		s := SizesFor(tc.mtu, tc.offload)
		if s.MaxFrame != tc.frame || s.Buffer <= s.MaxFrame || s.MaxUDPPayload(false) != tc.udp || s.MaxUDPPayload(true) != tc.udp-20 {
			t.Errorf("SizesFor(%d, %v) = %+v, udp4 %d udp6 %d", tc.mtu, tc.offload, s, s.MaxUDPPayload(false), s.MaxUDPPayload(true))
		}
	}
}

func TestParseIPv4(t *testing.T) {
	b := make([]byte, 64)
	n := PutUDP(b, netip.AddrPortFrom(guest4, 5000), netip.AddrPortFrom(gw4, 53), []byte("hello"), 7)
	p, ok := Parse(b[:n], false)
	if !ok || p.Proto != ProtoUDP || p.Src != guest4 || p.Dst != gw4 || len(p.L4) != 13 || p.Frag {
		t.Fatalf("Parse: %+v %v", p, ok)
	}
	if !p.TransportChecksumOK() {
		t.Error("checksum of a datagram PutUDP wrote")
	}
	// Trailing Ethernet padding is cut by the IP total length.
	if p, ok := Parse(b, false); !ok || len(p.IP) != n {
		t.Errorf("padding not trimmed: %d", len(p.IP))
	}
	if _, ok := Parse(b[:n-6], false); ok {
		t.Error("truncated packet accepted")
	}
	bad := append([]byte(nil), b[:n]...)
	bad[10] ^= 0xff
	if _, ok := Parse(bad, false); ok {
		t.Error("bad header checksum accepted")
	}
	frag := append([]byte(nil), b[:n]...)
	h := header.IPv4(frag)
	h.SetFlagsFragmentOffset(header.IPv4FlagMoreFragments, 0)
	h.SetChecksum(0)
	h.SetChecksum(^h.CalculateChecksum())
	if p, ok := Parse(frag, false); !ok || !p.Frag {
		t.Errorf("first fragment: %+v %v", p, ok)
	}
}

func TestParseIPv6ExtensionHeaders(t *testing.T) {
	l4 := make([]byte, 8)
	l4[0] = byte(header.ICMPv6EchoRequest)
	// hop-by-hop (8 bytes, PadN) → fragment (atomic) → ICMPv6
	ext := []byte{44, 0, 1, 4, 0, 0, 0, 0, uint8(ProtoICMPv6), 0, 0, 0, 0, 0, 0, 1}
	b := make([]byte, header.IPv6MinimumSize+len(ext)+len(l4))
	header.IPv6(b).Encode(&header.IPv6Fields{PayloadLength: uint16(len(ext) + len(l4)), TransportProtocol: 0, HopLimit: 64,
		SrcAddr: TCPIPAddr(guest6), DstAddr: TCPIPAddr(far6)})
	b[6] = 0 // hop-by-hop
	copy(b[header.IPv6MinimumSize:], ext)
	copy(b[header.IPv6MinimumSize+len(ext):], l4)
	p, ok := Parse(b, true)
	if !ok || p.Proto != ProtoICMPv6 || len(p.L4) != 8 || p.L4[0] != byte(header.ICMPv6EchoRequest) || p.Frag {
		t.Fatalf("Parse: %+v %v", p, ok)
	}
	// The same with a real (non-atomic) fragment header.
	b[header.IPv6MinimumSize+8+3] = 1 // M flag
	if p, ok := Parse(b, true); !ok || !p.Frag {
		t.Errorf("fragment: %+v %v", p, ok)
	}
	// An extension header that runs past the packet.
	b[header.IPv6MinimumSize+1] = 9
	if _, ok := Parse(b, true); ok {
		t.Error("overlong extension header accepted")
	}
}

func TestPutTCPReset(t *testing.T) {
	syn := make([]byte, 60)
	ipl := PutIPHeader(syn, guest6, far6, ProtoTCP, header.TCPMinimumSize, 0, 64)
	tcp := header.TCP(syn[ipl:])
	tcp.Encode(&header.TCPFields{SrcPort: 40000, DstPort: 443, SeqNum: 1000, DataOffset: header.TCPMinimumSize, Flags: header.TCPFlagSyn})
	p, ok := Parse(syn, true)
	if !ok {
		t.Fatal("parse SYN")
	}
	seg, ok := ParseTCP(p.L4)
	if !ok || !seg.IsSYN() {
		t.Fatalf("ParseTCP: %+v %v", seg, ok)
	}
	b := make([]byte, TCPResetLen(true))
	n := PutTCPReset(b, &p, seg, 1)
	r := header.TCP(b[header.IPv6MinimumSize:n])
	if r.Flags() != header.TCPFlagRst|header.TCPFlagAck || r.AckNumber() != 1001 || r.SourcePort() != 443 || r.DestinationPort() != 40000 {
		t.Errorf("reset: flags %s ack %d ports %d→%d", r.Flags(), r.AckNumber(), r.SourcePort(), r.DestinationPort())
	}
	xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, TCPIPAddr(far6), TCPIPAddr(guest6), uint16(len(r)))
	if checksum.Checksum(r, xsum) != 0xffff {
		t.Error("bad reset checksum")
	}
}

func TestPutUnreachableQuotesWithinLimits(t *testing.T) {
	big := make([]byte, 3000)
	n := PutUDP(big, netip.AddrPortFrom(guest6, 5000), netip.AddrPortFrom(far6, 443), make([]byte, 2000), 0)
	p, _ := Parse(big[:n], true)
	for _, why := range []Unreach{AdminProhibited, PortUnreachable} {
		b := make([]byte, UnreachableLen(&p))
		m := PutUnreachable(b, &p, far6, why, 0)
		if m != len(b) || m > header.IPv6MinimumMTU {
			t.Fatalf("ICMPv6 error of %d bytes (len %d), want at most 1280", m, len(b))
		}
		ic := header.ICMPv6(b[header.IPv6MinimumSize:])
		want := header.ICMPv6Prohibited
		if why == PortUnreachable {
			want = header.ICMPv6PortUnreachable
		}
		if ic.Type() != header.ICMPv6DstUnreachable || ic.Code() != want {
			t.Errorf("type %d code %d", ic.Type(), ic.Code())
		}
		if ic.Checksum() != header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: ic, Src: TCPIPAddr(far6), Dst: TCPIPAddr(guest6)}) {
			t.Error("bad ICMPv6 checksum")
		}
	}
}

func TestGatewayLinkLocal(t *testing.T) {
	got := GatewayLinkLocal([6]byte{0x02, 0x6d, 0x73, 0, 0, 1})
	if want := netip.MustParseAddr("fe80::6d:73ff:fe00:1"); got != want {
		t.Errorf("got %s, want %s", got, want)
	}
	if TCPIPAddr(got) != header.LinkLocalAddr(tcpip.LinkAddress([]byte{0x02, 0x6d, 0x73, 0, 0, 1})) {
		t.Error("round trip")
	}
}

// FuzzParse: the parsers of guest packets never panic and never return
// slices outside the input.
func FuzzParse(f *testing.F) {
	b := make([]byte, 64)
	n := PutUDP(b, netip.AddrPortFrom(guest4, 5000), netip.AddrPortFrom(gw4, 53), []byte("x"), 1)
	f.Add(b[:n], false)
	n = PutEchoReply(b, guest6, far6, 1, 2, []byte("y"), 0)
	f.Add(b[:n], true)
	f.Fuzz(func(t *testing.T, b []byte, v6 bool) {
		p, ok := Parse(b, v6)
		if !ok {
			return
		}
		if len(p.IP) > len(b) || len(p.L4) > len(p.IP) {
			t.Fatalf("slices past the input: ip %d l4 %d of %d", len(p.IP), len(p.L4), len(b))
		}
		p.TransportChecksumOK()
		ParseTCP(p.L4)
		ParseUDP(p.L4)
	})
}
