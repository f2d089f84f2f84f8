package wire

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// fragment4 cuts the IPv4 packet ip at the given payload offsets (multiples
// of 8) into fragments.
func fragment4(ip []byte, cuts ...int) [][]byte {
	h := header.IPv4(ip)
	payload := ip[h.HeaderLength():h.TotalLength()]
	bounds := append(append([]int{0}, cuts...), len(payload))
	var out [][]byte
	for i := 0; i+1 < len(bounds); i++ {
		part := payload[bounds[i]:bounds[i+1]]
		f := make([]byte, header.IPv4MinimumSize+len(part))
		fh := header.IPv4(f)
		var flags uint8
		if i+2 < len(bounds) {
			flags = header.IPv4FlagMoreFragments
		}
		fh.Encode(&header.IPv4Fields{TotalLength: uint16(len(f)), ID: 77, Flags: flags, FragmentOffset: uint16(bounds[i]),
			TTL: 64, Protocol: h.Protocol(), SrcAddr: h.SourceAddress(), DstAddr: h.DestinationAddress()})
		fh.SetChecksum(^fh.CalculateChecksum())
		copy(f[header.IPv4MinimumSize:], part)
		out = append(out, f)
	}
	return out
}

// fragment6 cuts the IPv6 packet ip (no extension headers) likewise.
func fragment6(ip []byte, cuts ...int) [][]byte {
	h := header.IPv6(ip)
	payload := ip[header.IPv6MinimumSize:]
	bounds := append(append([]int{0}, cuts...), len(payload))
	var out [][]byte
	for i := 0; i+1 < len(bounds); i++ {
		part := payload[bounds[i]:bounds[i+1]]
		f := make([]byte, header.IPv6MinimumSize+8+len(part))
		header.IPv6(f).Encode(&header.IPv6Fields{PayloadLength: uint16(8 + len(part)), TransportProtocol: header.IPv6FragmentHeader,
			HopLimit: 64, SrcAddr: h.SourceAddress(), DstAddr: h.DestinationAddress()})
		fr := f[header.IPv6MinimumSize:]
		fr[0] = h.NextHeader()
		ofs := uint16(bounds[i]/8) << 3
		if i+2 < len(bounds) {
			ofs |= 1
		}
		binary.BigEndian.PutUint16(fr[2:4], ofs)
		binary.BigEndian.PutUint32(fr[4:8], 99)
		copy(fr[8:], part)
		out = append(out, f)
	}
	return out
}

func udpPacket(src, dst netip.AddrPort, n int) []byte {
	payload := make([]byte, n)
	for i := range payload {
		payload[i] = byte(i * 13)
	}
	b := make([]byte, UDPLen(src.Addr().Is6(), n))
	PutUDP(b, src, dst, payload, 77)
	return b
}

func addAll(t *testing.T, r *Reassembler, frags [][]byte, v6 bool) ([]byte, error) {
	t.Helper()
	var out []byte
	var err error
	for _, f := range frags {
		p, ok := Parse(f, v6)
		if !ok || !p.Frag {
			t.Fatalf("fragment does not parse as one: %+v %v", p, ok)
		}
		if out, err = r.Add(&p); err != nil || out != nil {
			return out, err
		}
	}
	return out, err
}

func TestReassembleOutOfOrder(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		src, dst := netip.MustParseAddrPort("100.96.0.2:5000"), netip.MustParseAddrPort("198.51.100.10:7002")
		frag := fragment4
		if v6 {
			src, dst = netip.MustParseAddrPort("[fd42:6d73:62::2]:5000"), netip.MustParseAddrPort("[2001:db8::10]:7002")
			frag = fragment6
		}
		orig := udpPacket(src, dst, 3000)
		fs := frag(orig, 1200, 2400)
		fs[0], fs[2] = fs[2], fs[0] // last first
		r := NewReassembler()
		out, err := addAll(t, r, fs, v6)
		if err != nil || out == nil {
			t.Fatalf("v6 %v: %v, %v", v6, out, err)
		}
		p, ok := Parse(out, v6)
		if !ok || p.Frag || p.Proto != ProtoUDP || !p.TransportChecksumOK() {
			t.Fatalf("v6 %v: reassembled %+v ok %v", v6, p, ok)
		}
		want, _ := Parse(orig, v6)
		if !bytes.Equal(p.L4, want.L4) {
			t.Errorf("v6 %v: payload differs", v6)
		}
		if n, b := r.Pending(); n != 0 || b != 0 {
			t.Errorf("v6 %v: %d datagrams, %d bytes left", v6, n, b)
		}
	}
}

// TestReassemblyRefusesTricks: overlapping fragments, a first fragment
// without the whole transport header, and a fragment that starts inside
// it drop the datagram instead of being decided on a piece.
func TestReassemblyRefusesTricks(t *testing.T) {
	src, dst := netip.MustParseAddrPort("100.96.0.2:5000"), netip.MustParseAddrPort("198.51.100.10:7002")
	orig := udpPacket(src, dst, 3000)
	r := NewReassembler()
	// Overlap: a second copy of the middle part, shifted.
	fs := fragment4(orig, 1200, 2400)
	over := fragment4(orig, 1192, 2400)[1]
	if _, err := addAll(t, r, [][]byte{fs[0], fs[1], over, fs[2]}, false); err != ErrFragOverlap {
		t.Errorf("overlap: %v", err)
	}
	// The rest of that datagram completes nothing.
	if out, _ := addAll(t, r, [][]byte{fs[2]}, false); out != nil {
		t.Error("a datagram completed after its overlap")
	}
	// Tiny first fragment of a TCP segment: 8 bytes, without the ports' flags.
	tcp := make([]byte, 60)
	PutIPHeader(tcp, src.Addr(), dst.Addr(), ProtoTCP, 40, 1, 64)
	if _, err := addAll(t, NewReassembler(), fragment4(tcp, 8), false); err != ErrFragTiny {
		t.Errorf("tiny first fragment: %v", err)
	}
	// A fragment at offset 8 of a TCP segment rewrites its flags.
	if _, err := addAll(t, NewReassembler(), fragment4(tcp, 8)[1:], false); err != ErrFragTiny {
		t.Errorf("fragment inside the TCP header: %v", err)
	}
}

func TestReassemblyBounds(t *testing.T) {
	r := NewReassembler()
	r.MaxDatagrams = 4
	now := time.Unix(1000, 0)
	r.now = func() time.Time { return now }
	src := netip.MustParseAddrPort("100.96.0.2:5000")
	for i := 0; i < 10; i++ {
		orig := udpPacket(src, netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 51, 100, byte(i)}), 7002), 3000)
		first := fragment4(orig, 1200)[0]
		p, _ := Parse(first, false)
		if _, err := r.Add(&p); err != nil {
			t.Fatal(err)
		}
		now = now.Add(time.Millisecond)
	}
	if n, _ := r.Pending(); n != 4 {
		t.Errorf("%d datagrams in progress, bound 4", n)
	}
	now = now.Add(DefaultFragTimeout + time.Second)
	orig := udpPacket(src, netip.MustParseAddrPort("198.51.100.99:7002"), 100)
	p, _ := Parse(fragment4(orig, 64)[0], false)
	r.Add(&p)
	if n, _ := r.Pending(); n != 1 {
		t.Errorf("%d datagrams after the timeout, want only the new one", n)
	}
}

// FuzzReassemble feeds arbitrary fragment sequences: never a panic, and
// what comes out always parses as a whole packet.
func FuzzReassemble(f *testing.F) {
	orig := udpPacket(netip.MustParseAddrPort("100.96.0.2:5000"), netip.MustParseAddrPort("198.51.100.10:7002"), 200)
	fs := fragment4(orig, 64, 128)
	f.Add(fs[0], fs[1], fs[2], false)
	orig6 := udpPacket(netip.MustParseAddrPort("[fd42:6d73:62::2]:5000"), netip.MustParseAddrPort("[2001:db8::10]:7002"), 200)
	fs6 := fragment6(orig6, 64, 128)
	f.Add(fs6[2], fs6[0], fs6[1], true)
	f.Fuzz(func(t *testing.T, a, b, c []byte, v6 bool) {
		r := NewReassembler()
		for _, fr := range [][]byte{a, b, c} {
			p, ok := Parse(fr, v6)
			if !ok || !p.Frag {
				continue
			}
			out, err := r.Add(&p)
			if err == nil && out != nil {
				if q, ok := Parse(out, v6); !ok || q.Frag {
					t.Fatalf("reassembled packet does not parse whole: %x", out)
				}
			}
		}
	})
}
