package tcpfast

import (
	"crypto/rand"
	"encoding/binary"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/msbtap/msbtap/rings"
	"github.com/msbtap/msbtap/wire"
)

const (
	tcpHdrLen = header.TCPMinimumSize
	// synOptsLen: MSS (4), NOP + window scale (4), and room for NOP,
	// NOP, SACK permitted (4).
	synOptsLen = 12
	// ourWindowScale is the shift of the windows we announce (16 MiB at
	// most), when the guest scales windows.
	ourWindowScale = 8
	// maxGSOPayload keeps a GSO frame within one IP datagram.
	maxGSOPayload = 65535 - 60 - 60
)

// synOptions are the options of the guest's SYN we use.
type synOptions struct {
	mss  uint16
	ws   int // -1: none
	sack bool
}

func parseSynOptions(b []byte) synOptions {
	o := header.ParseSynOptions(b, false)
	mss := o.MSS
	if mss < 64 {
		mss = 64 // a guest claiming less would make us send runts
	}
	return synOptions{mss: mss, ws: o.WS, sack: o.SACKPermitted}
}

func header16(b []byte) uint16 { return binary.BigEndian.Uint16(b) }

func randISN() uint32 {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return binary.BigEndian.Uint32(b[:])
}

func seqLT(a, b uint32) bool { return int32(a-b) < 0 }
func seqLE(a, b uint32) bool { return int32(a-b) <= 0 }
func seqGT(a, b uint32) bool { return int32(a-b) > 0 }
func seqGE(a, b uint32) bool { return int32(a-b) >= 0 }

// hdrLen is the length of the headers of c's frames (no options).
func (c *conn) hdrLen() int { return wire.EthHdrLen + wire.IPHeaderLen(c.v6) + tcpHdrLen }

// newFrame gets a pooled frame with room for the headers and n bytes of
// payload (at f.B[c.hdrLen():]).
func (c *conn) newFrame(n int) *rings.Frame {
	return c.t.o.Shared.Frames.GetLen(c.hdrLen() + n)
}

// finishFrame writes the headers of a segment from the destination to the
// guest into f, whose payload (n bytes) is in place, and queues it.
func (c *conn) finishFrame(f *rings.Frame, flags uint8, seq uint32, n int, opts []byte) {
	t := c.t
	f.SetLen(c.hdrLen() + len(opts) + n)
	et := wire.EtherTypeIPv4
	if c.v6 {
		et = wire.EtherTypeIPv6
	}
	wire.PutEthernet(f.B, t.o.GuestMAC(), t.o.GatewayMAC, et)
	l4 := tcpHdrLen + len(opts) + n
	t.ipID++
	ipl := wire.PutIPHeader(f.B[wire.EthHdrLen:], c.dst.Addr(), c.guest.Addr(), wire.ProtoTCP, l4, t.ipID, wire.DefaultHopLimit)
	off := wire.EthHdrLen + ipl
	tcp := header.TCP(f.B[off : off+l4])
	fields := header.TCPFields{
		SrcPort: c.dst.Port(), DstPort: c.guest.Port(), SeqNum: seq, AckNum: c.rcvNxt,
		DataOffset: uint8(tcpHdrLen + len(opts)), Flags: header.TCPFlags(flags), WindowSize: c.windowField(flags),
	}
	tcp.Encode(&fields)
	copy(tcp[tcpHdrLen:], opts)
	c.ackSent = c.rcvNxt
	c.ackPending = false
	sum := wire.PseudoSum(c.dst.Addr(), c.guest.Addr(), wire.ProtoTCP, l4)
	f.GSO = rings.GSO{}
	if t.o.Offload && n > 0 {
		// Partial checksum: the guest's side (or the kernel segmenting
		// the frame) completes it.
		tcp.SetChecksum(sum)
		f.GSO = rings.GSO{NeedsCsum: true, CsumStart: uint16(off), CsumOffset: 16}
		if n > c.mss() {
			f.GSO.Type = rings.GSOTCPv4
			if c.v6 {
				f.GSO.Type = rings.GSOTCPv6
			}
			f.GSO.Size = uint16(c.mss())
			f.GSO.HdrLen = uint16(off + tcpHdrLen)
		}
	} else {
		tcp.SetChecksum(^checksum.Checksum(tcp, sum))
	}
	t.queue(f)
}

// mss is the largest payload of one segment to the guest.
func (c *conn) mss() int {
	m := c.t.mss4
	if c.v6 {
		m = c.t.mss6
	}
	return min(m, c.guestMSS)
}

// sendCtl sends a segment without payload.
func (c *conn) sendCtl(flags uint8, seq uint32) {
	f := c.newFrame(0)
	c.finishFrame(f, flags, seq, 0, nil)
}

// sendAck sends a pure ACK for what the guest sent, with the window, and
// SACK blocks for what is held past a gap.
func (c *conn) sendAck() {
	if !c.sackOK || len(c.ooo) == 0 {
		c.sendCtl(wire.TCPFlagACK, c.sndNxt)
		return
	}
	var opts [4 + 3*8]byte
	opts[0], opts[1], opts[2] = 1, 1, 5
	n := 0
	for i := 0; i < len(c.ooo) && n < 3; {
		left, right := c.ooo[i].seq, c.ooo[i].seq+uint32(len(c.ooo[i].data))
		for i++; i < len(c.ooo) && seqLE(c.ooo[i].seq, right); i++ {
			if e := c.ooo[i].seq + uint32(len(c.ooo[i].data)); seqGT(e, right) {
				right = e
			}
		}
		binary.BigEndian.PutUint32(opts[4+8*n:], left)
		binary.BigEndian.PutUint32(opts[8+8*n:], right)
		n++
	}
	opts[3] = byte(2 + 8*n)
	o := opts[:4+8*n]
	f := c.t.o.Shared.Frames.GetLen(c.hdrLen() + len(o))
	c.finishFrame(f, wire.TCPFlagACK, c.sndNxt, 0, o)
}

// sendSynAck answers the guest's SYN once the host socket is connected.
func (c *conn) sendSynAck() {
	opts := make([]byte, synOptsLen) // on the stack: it does not escape
	mss := c.t.mss4
	if c.v6 {
		mss = c.t.mss6
	}
	opts[0], opts[1] = 2, 4
	binary.BigEndian.PutUint16(opts[2:], uint16(min(mss, 65535)))
	o := opts[:4]
	if c.ourWS > 0 {
		opts[4], opts[5], opts[6], opts[7] = 1, 3, 3, c.ourWS
		o = opts[:8]
	}
	if c.sackOK {
		o = append(o, 1, 1, 4, 2) // SACK permitted
	}
	f := c.t.o.Shared.Frames.GetLen(c.hdrLen() + len(o))
	c.finishFrame(f, wire.TCPFlagSYN|wire.TCPFlagACK, c.iss, 0, o)
}

// sendReset resets the guest's side: the host socket is gone.
func (c *conn) sendReset() { c.sendCtl(wire.TCPFlagRST|wire.TCPFlagACK, c.sndNxt) }

// windowField is the window we announce: the host socket's free send
// buffer, scaled. A SYN-ACK's window is never scaled.
func (c *conn) windowField(flags uint8) uint16 {
	if c.dupAck {
		// A duplicate ACK must look like one (same window), or the
		// guest takes it for a window update and never retransmits fast.
		c.dupAck = false
		return c.wndField
	}
	w := c.recvWindow()
	c.wndSent = w
	if w < uint32(c.sndbuf/2) && !c.wantWnd && c.fd >= 0 {
		// A low window: make sure its opening is heard of, or the guest
		// waits for its persist timer.
		c.wantWnd = true
		c.watchWriteSpace()
	}
	if flags&wire.TCPFlagSYN != 0 {
		return uint16(min(w, 65535))
	}
	c.wndField = uint16(min(w>>c.ourWS, 65535))
	return c.wndField
}

// sendRefusal answers a SYN whose connect failed at once.
func (t *Translator) sendRefusal(p *wire.Packet, seg wire.TCPSegment) {
	sh := t.o.Shared
	n := wire.TCPResetLen(p.V6)
	f := sh.Frames.GetLen(wire.EthHdrLen + n)
	et := wire.EtherTypeIPv4
	if p.V6 {
		et = wire.EtherTypeIPv6
	}
	wire.PutEthernet(f.B, t.o.GuestMAC(), t.o.GatewayMAC, et)
	t.ipID++
	if wire.PutTCPReset(f.B[wire.EthHdrLen:], p, seg, t.ipID) == 0 {
		sh.Frames.Put(f)
		return
	}
	t.queue(f)
}
