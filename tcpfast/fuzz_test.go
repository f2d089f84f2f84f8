package tcpfast

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/msbtap/msbtap/rings"
	"github.com/msbtap/msbtap/wire"
)

// fuzzRig is one translator and one loopback server for all of a fuzz
// run's inputs; each input is a connection of its own.
type fuzzRig struct {
	sh   *rings.Shared
	tr   *Translator
	ln   net.Listener
	port atomic.Uint32 // guest ports, one per input
	got  chan []byte   // what the server read, per connection
}

var (
	rigOnce sync.Once
	rig     *fuzzRig
	rigErr  error
)

func getRig() (*fuzzRig, error) {
	rigOnce.Do(func() {
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			rigErr = err
			return
		}
		sh := rings.NewShared(0, wire.SizesFor(1500, false).Buffer)
		tr, err := New(Options{Shared: sh, GatewayMAC: gwMAC, GuestMAC: func() [6]byte { return guestMAC }, MTU: 1500})
		if err != nil {
			ln.Close()
			rigErr = err
			return
		}
		r := &fuzzRig{sh: sh, tr: tr, ln: ln, got: make(chan []byte, 1)}
		r.port.Store(10000)
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				b, _ := io.ReadAll(c)
				c.Close()
				r.got <- b
			}
		}()
		rig = r
	})
	return rig, rigErr
}

// guestSeg builds a guest frame of one TCP segment to the rig's server.
func guestSeg(src, dst netip.AddrPort, seq, ack uint32, flags uint8, wnd uint16, opts, payload []byte) []byte {
	tl := tcpHdrLen + len(opts) + len(payload)
	b := make([]byte, wire.EthHdrLen+header.IPv4MinimumSize+tl)
	wire.PutEthernet(b, gwMAC, guestMAC, wire.EtherTypeIPv4)
	ipl := wire.PutIPHeader(b[wire.EthHdrLen:], src.Addr(), dst.Addr(), wire.ProtoTCP, tl, 1, 64)
	t := header.TCP(b[wire.EthHdrLen+ipl:])
	t.Encode(&header.TCPFields{SrcPort: src.Port(), DstPort: dst.Port(), SeqNum: seq, AckNum: ack,
		DataOffset: uint8(tcpHdrLen + len(opts)), Flags: header.TCPFlags(flags), WindowSize: wnd})
	copy(t[tcpHdrLen:], opts)
	copy(t[tcpHdrLen+len(opts):], payload)
	t.SetChecksum(^checksum.Checksum(t, wire.PseudoSum(src.Addr(), dst.Addr(), wire.ProtoTCP, tl)))
	return b
}

// feed hands a frame to the translator as the seam does; it reports
// whether the translator took it, and opens a connection for a SYN when
// fl is given (one connection per input: a later SYN is dropped, as the
// policy would decide it anew).
func (r *fuzzRig) feed(b []byte, dial netip.AddrPort, fl *Flow) bool {
	p, ok := wire.Parse(b[wire.EthHdrLen:], false)
	if !ok {
		return false
	}
	seg, ok := wire.ParseTCP(p.L4)
	if !ok {
		return false
	}
	if r.tr.Handle(&p, seg) {
		return true
	}
	if seg.IsSYN() && fl != nil {
		fl.Dial = dial
		_, err := r.tr.Open(&p, seg, *fl)
		return err == nil
	}
	return false
}

// synAck waits for the translator's SYN-ACK and returns its sequence
// number, dropping every other frame.
func (r *fuzzRig) synAck(port uint16) (uint32, bool) {
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		f, ok := r.sh.PopRx()
		if !ok {
			time.Sleep(100 * time.Microsecond)
			continue
		}
		p, _ := wire.Parse(f.B[wire.EthHdrLen:], false)
		seg, ok := wire.ParseTCP(p.L4)
		r.sh.Frames.Put(f)
		if ok && seg.DstPort == port && seg.Flags&wire.TCPFlagSYN != 0 && seg.Flags&wire.TCPFlagACK != 0 {
			return seg.Seq, true
		}
	}
	return 0, false
}

func (r *fuzzRig) drain() {
	for {
		f, ok := r.sh.PopRx()
		if !ok {
			return
		}
		r.sh.Frames.Put(f)
	}
}

// FuzzGuestSegments feeds a connection's worth of guest segments, built
// from the input (offsets into one byte stream, lengths, flags, ACK and
// window fields), and checks that the translator neither panics nor
// delivers a byte to the host socket twice, out of order, or that the
// guest never sent at that place: the server reads a prefix of the stream.
func FuzzGuestSegments(f *testing.F) {
	f.Add([]byte{0, 0, 10, 0x18, 0, 10, 10, 0x18, 0, 20, 5, 0x19})
	f.Add([]byte{0, 20, 10, 0x10, 0, 0, 20, 0x10, 0, 5, 30, 0x11, 0, 0, 1, 0x14})
	f.Add([]byte{0, 0, 200, 0x10, 0, 100, 200, 0x10, 0, 50, 100, 0x02, 0, 0, 0, 0x01})
	f.Fuzz(func(t *testing.T, in []byte) {
		r, err := getRig()
		if err != nil {
			t.Skipf("no fast path here: %v", err)
		}
		if len(in) > 4*64 {
			in = in[:4*64]
		}
		stream := pattern(uint64(len(in)), 1<<16)
		port := uint16(r.port.Add(1)%50000 + 10000)
		src := netip.AddrPortFrom(guestV4.Addr(), port)
		dst := netip.MustParseAddrPort("198.51.100.7:80")
		dial := r.ln.Addr().(*net.TCPAddr).AddrPort()
		var up, down atomic.Uint64
		ended := make(chan struct{})
		fl := Flow{Up: &up, Down: &down, Done: func() { close(ended) }}
		const isn = 1000
		mss := []byte{2, 4, 5, 0xb4, 1, 3, 3, 7}
		if !r.feed(guestSeg(src, dst, isn, 0, wire.TCPFlagSYN, 65535, mss, nil), dial, &fl) {
			t.Fatal("SYN not taken")
		}
		iss, ok := r.synAck(port)
		if !ok {
			t.Fatal("no SYN-ACK")
		}
		r.feed(guestSeg(src, dst, isn+1, iss+1, wire.TCPFlagACK, 1024, nil, nil), dial, nil)
		for i := 0; i+4 <= len(in); i += 4 {
			off := int(binary.BigEndian.Uint16(in[i:])) % len(stream)
			n := min(int(in[i+2])*8, len(stream)-off)
			flags := in[i+3] & (wire.TCPFlagFIN | wire.TCPFlagSYN | wire.TCPFlagRST | uint8(header.TCPFlagPsh) | wire.TCPFlagACK)
			ack := iss + 1 + uint32(in[i]&3) - 1 // around what we sent (nothing)
			r.feed(guestSeg(src, dst, isn+1+uint32(off), ack, flags, uint16(in[i+1])<<4, nil, stream[off:off+n]), dial, nil)
			r.drain()
		}
		// End it: a reset from the guest, in its window.
		r.feed(guestSeg(src, dst, isn+1+uint32(up.Load()), 0, wire.TCPFlagRST, 0, nil, nil), dial, nil)
		r.tr.ResetAll() // whatever state it is in
		select {
		case <-ended:
		case <-time.After(5 * time.Second):
			t.Fatal("the connection never ended")
		}
		var got []byte
		select {
		case got = <-r.got:
		case <-time.After(5 * time.Second):
			t.Fatal("the server never saw the connection end")
		}
		r.drain()
		if !bytes.Equal(got, stream[:len(got)]) {
			t.Fatalf("the server got %d bytes that are not the stream's first %d", len(got), len(got))
		}
		if uint64(len(got)) > up.Load() {
			t.Fatalf("the server got %d bytes, the meter says %d went up", len(got), up.Load())
		}
	})
}

// TestHeldBounded: segments past a gap are held only up to the bounds,
// and released when the connection ends.
func TestHeldBounded(t *testing.T) {
	r, err := getRig()
	if err != nil {
		t.Skipf("no fast path here: %v", err)
	}
	src := netip.AddrPortFrom(guestV4.Addr(), 9999)
	dst := netip.MustParseAddrPort("198.51.100.7:80")
	dial := r.ln.Addr().(*net.TCPAddr).AddrPort()
	var up, down atomic.Uint64
	ended := make(chan struct{})
	fl := Flow{Up: &up, Down: &down, Done: func() { close(ended) }}
	const isn = 5000
	if !r.feed(guestSeg(src, dst, isn, 0, wire.TCPFlagSYN, 65535, []byte{2, 4, 5, 0xb4, 1, 3, 3, 7}, nil), dial, &fl) {
		t.Fatal("SYN not taken")
	}
	iss, ok := r.synAck(9999)
	if !ok {
		t.Fatal("no SYN-ACK")
	}
	r.feed(guestSeg(src, dst, isn+1, iss+1, wire.TCPFlagACK, 1024, nil, nil), dial, nil)
	payload := make([]byte, 1400)
	for i := 0; i < 500; i++ { // 700 KB past a 1-byte gap
		r.feed(guestSeg(src, dst, isn+2+uint32(i*len(payload)), iss+1, wire.TCPFlagACK, 1024, nil, payload), dial, nil)
		r.drain()
	}
	if h := r.tr.Stats().HeldBytes; h <= 0 || h > maxOOOBytes {
		t.Errorf("%d bytes held past the gap, want some and at most %d", h, maxOOOBytes)
	}
	r.feed(guestSeg(src, dst, isn+1, 0, wire.TCPFlagRST, 0, nil, nil), dial, nil)
	select {
	case <-ended:
	case <-time.After(5 * time.Second):
		t.Fatal("the reset did not end the connection")
	}
	<-r.got
	r.drain()
	if h := r.tr.Stats().HeldBytes; h != 0 {
		t.Errorf("%d bytes held after the connection ended", h)
	}
}
