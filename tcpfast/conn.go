package tcpfast

import (
	"net/netip"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/msbtap/msbtap/wire"
)

type state uint8

const (
	stateConnecting  state = iota // guest SYN received, host connect under way
	stateSynAckSent               // host connected, SYN-ACK sent, waiting for the guest's ACK
	stateEstablished              // both ways open (or half-closed, see the flags)
	stateClosed                   // both FINs done; waiting to be forgotten (lingering)
	stateGone                     // reset or closed: lingers only to absorb stray segments
)

// conn is one fast-path connection. Every field is protected by t.mu.
//
// Toward the guest: sndUna is the oldest byte the guest has not ACKed (the
// head of the socket's receive queue), sndNxt the next byte to send (the
// socket's peek offset is sndNxt-sndUna), sndMax the highest sent, edge the
// right edge of the guest's window. From the guest: rcvNxt is the next byte
// expected (everything before it is in the host socket).
type conn struct {
	t          *Translator
	fd         int
	v6         bool
	guest, dst netip.AddrPort
	fl         Flow
	state      state

	guestISN, rcvNxt, ackSent uint32
	iss                       uint32
	sndUna, sndNxt, sndMax    uint32
	edge                      uint32
	guestWnd                  uint32 // last window from the guest, scaled
	guestMSS, segMax          int
	guestWS, ourWS            uint8
	sackOK                    bool // the guest takes SACK blocks
	sndbuf                    int
	outEst                    int // the socket's send queue at most (see recvWindow); -1: unknown
	acked                     int // bytes the guest ACKed still in the socket's receive queue (see discard)
	wndSent                   uint32
	wndField                  uint16 // the window field of the last ACK
	dupAck                    bool   // the next ACK repeats the last window

	guestFin   bool // the guest's FIN is in: the socket is shut for writing
	sockEOF    bool // the host socket's peer closed: FIN at eofSeq
	eofSeq     uint32
	finSent    bool
	finAcked   bool
	ackPending bool
	wantWnd    bool   // we announced less than the guest wanted: update when the socket drains
	blocked    bool   // stopped by a full rx ring: the tick tries again
	corked     bool   // the last send had MSG_MORE: the tick flushes it
	over       []byte // guest bytes ACKed that the socket has not taken yet
	readable   bool   // the socket may hold data past the peek offset (edge-triggered)
	rdhup      bool   // the peer shut its side: the data ends with an EOF

	// ooo holds guest segments past a gap (bounded), so that the
	// retransmission of the gap's segment is all the guest has to send.
	ooo      []oooSeg
	oooBytes int

	dupAcks  int
	recover  uint32 // after a fast retransmit, duplicate ACKs count again past it
	retries  int
	rtoAt    time.Time
	probeAt  time.Time
	deadline time.Time // connect, SYN-ACK, linger
	keepAt   time.Time // when the host socket gets its keepalive (see timers)
	done     bool
	// lingering: over, in t.lingerq and out of t.live; forgotten: out
	// of every table
	lingering, forgotten bool

	// per-connection counts, logged at its end
	nPartial, nOOO, nRewind, nDropped uint32
}

// finish tells the owner, once.
func (c *conn) finish() {
	if c.done {
		return
	}
	c.done = true
	held, over := c.oooBytes, len(c.over)
	c.t.held -= held + over
	c.ooo, c.oooBytes, c.over = nil, 0, nil
	c.t.o.Log.Debug("fast path connection ended", "guest", c.guest, "dst", c.dst, "state", c.state,
		"from_guest", c.rcvNxt-c.guestISN-1, "to_guest_acked", c.sndUna-c.iss-1, "to_guest_sent", c.sndMax-c.iss-1,
		"held", held, "over", over, "guest_fin", c.guestFin, "eof", c.sockEOF,
		"partial_sends", c.nPartial, "out_of_order", c.nOOO, "rewinds", c.nRewind, "dropped", c.nDropped)
	if c.fl.Done != nil {
		c.fl.Done()
	}
}

// recvWindow is the host socket's free send buffer: what send() would take.
// The socket's queue is asked for (SIOCOUTQ) only when the estimate, the
// queue last seen plus what was sent since, leaves less than half the
// buffer free: the queue only shrinks by itself, so the estimate never
// announces more than the socket takes, and a request-response exchange
// makes no ioctl per answer.
func (c *conn) recvWindow() uint32 {
	if c.fd < 0 {
		return 0
	}
	if c.sndbuf <= 0 {
		// Not known (it always is from New): ask, or the estimate
		// would announce a shut window for good.
		c.sndbuf, _ = unix.GetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_SNDBUF)
		c.outEst = -1
	}
	if c.outEst < 0 || c.sndbuf-c.outEst < c.sndbuf/2 {
		out, err := unix.IoctlGetInt(c.fd, unix.SIOCOUTQ)
		if err != nil {
			return 0
		}
		c.outEst = out
		if c.sndbuf-out < c.sndbuf/4 {
			// The kernel grows the buffer as the connection speeds up.
			if b, err := unix.GetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_SNDBUF); err == nil {
				c.sndbuf = b
			}
		}
	}
	free := c.sndbuf - c.outEst - len(c.over)
	if free <= 0 {
		return 0
	}
	limit := 65535
	if c.ourWS > 0 {
		limit = 65535 << c.ourWS
	}
	return uint32(min(free, limit))
}

// watchWriteSpace makes the socket report EPOLLOUT when its send buffer
// drains: the kernel wakes writers only after a poll or a send found the
// buffer full (SOCK_NOSPACE), and an edge-triggered epoll polls only at
// wake-ups. A poll that finds room already means the window is open.
func (c *conn) watchWriteSpace() {
	fds := []unix.PollFd{{Fd: int32(c.fd), Events: unix.POLLOUT}}
	if n, err := unix.Poll(fds, 0); err == nil && n == 1 && fds[0].Revents&unix.POLLOUT != 0 {
		c.wantWnd = false
	}
}

// abort resets both ends: RST to the guest, RST to the host peer
// (SO_LINGER 0).
func (c *conn) abort() {
	c.t.stats.Aborted++
	if c.state != stateConnecting {
		c.sendReset()
	} else {
		c.rcvNxt = c.guestISN + 1
		c.sendCtl(wire.TCPFlagRST|wire.TCPFlagACK, 0)
	}
	if c.fd >= 0 {
		_ = unix.SetsockoptLinger(c.fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	}
	c.gone()
}

// gone closes the socket and keeps the connection a while for stray
// segments.
func (c *conn) gone() {
	t := c.t
	if c.fd >= 0 {
		unix.Close(c.fd)
		delete(t.byFD, int32(c.fd))
		c.fd = -1
	}
	c.leaveConnecting()
	c.state = stateGone
	c.deadline = t.now.Add(lingerTime)
	c.rtoAt, c.probeAt = time.Time{}, time.Time{}
	c.linger()
	c.finish()
}

// leaveConnecting counts c out of the connects under way, if it was one.
func (c *conn) leaveConnecting() {
	if c.state == stateConnecting {
		c.t.nConnecting--
	}
}

// linger moves a connection that is over from the tick's round to the
// queue of those waiting to be forgotten: a connection rate of thousands a
// second leaves thousands lingering, which the tick need not visit.
func (c *conn) linger() {
	t := c.t
	if c.lingering {
		return
	}
	c.lingering = true
	delete(t.live, c)
	t.lingerq.push(c)
}

// guestSegment handles one segment from the guest.
func (c *conn) guestSegment(p *wire.Packet, seg wire.TCPSegment) {
	t := c.t
	tcp := header.TCP(p.L4)
	payload := p.L4[seg.HdrLen:]
	flags := seg.Flags
	if flags&wire.TCPFlagSYN != 0 && flags&(wire.TCPFlagFIN|wire.TCPFlagRST) != 0 {
		t.stats.BadSegments++
		return
	}
	switch c.state {
	case stateGone:
		if flags&wire.TCPFlagRST == 0 {
			// Answer as a closed port would, so the guest lets go.
			t.sendRefusal(p, seg)
		}
		return
	case stateClosed:
		if flags&wire.TCPFlagRST != 0 {
			c.gone()
			return
		}
		if len(payload) > 0 {
			t.sendRefusal(p, seg)
			return
		}
		if flags&wire.TCPFlagFIN != 0 {
			c.sendAck() // our ACK of its FIN was lost
		}
		return
	case stateConnecting:
		return // a SYN again, or junk: the SYN-ACK comes when connected
	}
	if flags&wire.TCPFlagRST != 0 {
		// Accept a reset only in the window (RFC 5961 would ask for an
		// exact match; the guest is ours, and a blind RST from it gains it
		// nothing).
		if seqLE(c.rcvNxt, seg.Seq) && seqLT(seg.Seq, c.rcvNxt+max(c.wndSent, 1)) || seg.Seq == c.rcvNxt-1 {
			t.stats.GuestResets++
			if c.fd >= 0 {
				_ = unix.SetsockoptLinger(c.fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
			}
			c.gone()
		}
		return
	}
	if flags&wire.TCPFlagSYN != 0 {
		if c.state == stateSynAckSent && seg.Seq == c.guestISN && flags&wire.TCPFlagACK == 0 {
			c.sendSynAck() // ours was lost
		}
		return
	}
	if flags&wire.TCPFlagACK == 0 {
		t.stats.BadSegments++
		return
	}
	if c.state == stateSynAckSent {
		if seg.Ack != c.iss+1 {
			t.stats.BadSegments++
			t.sendRefusal(p, seg)
			return
		}
		c.state = stateEstablished // data that came before has set readable
		c.retries = 0
		c.deadline = time.Time{}
	}
	c.guestAck(seg.Ack, uint32(tcp.WindowSize())<<c.guestWS, len(payload) == 0 && flags&wire.TCPFlagFIN == 0)
	if c.state != stateEstablished {
		return
	}
	if len(payload) > 0 || flags&wire.TCPFlagFIN != 0 {
		c.guestData(seg.Seq, payload, flags&wire.TCPFlagFIN != 0, flags&uint8(header.TCPFlagPsh) != 0)
	} else if seg.Seq != c.rcvNxt {
		c.sendAck() // a keepalive probe (seq one below), or out of the window
	}
	if c.state == stateEstablished {
		c.push()
		c.maybeClose()
	}
}

// guestAck takes the guest's ACK and window.
func (c *conn) guestAck(ack, wnd uint32, pure bool) {
	t := c.t
	if seqGT(ack, c.sndMax) {
		c.sendAck() // ACKs what we never sent: tell it where we are
		return
	}
	if seqGT(ack, c.sndUna) {
		data := ack - c.sndUna
		if c.sockEOF && ack == c.eofSeq+1 {
			c.finAcked = true
			data--
		}
		if data > 0 && !c.release(int(data)) {
			return
		}
		c.fl.Down.Add(uint64(data))
		c.sndUna = ack
		if seqLT(c.sndNxt, ack) {
			c.sndNxt = ack // a rewind resent less than the guest had
		}
		c.retries, c.dupAcks = 0, 0
		if c.sndMax != c.sndUna {
			c.rtoAt = t.now.Add(minRTO)
		} else {
			c.rtoAt = time.Time{}
		}
	} else if ack == c.sndUna && pure && c.sndMax != c.sndUna && wnd == c.guestWnd && !seqLT(c.sndUna, c.recover) {
		c.dupAcks++
		if c.dupAcks == 3 {
			t.stats.FastRetransmits++
			c.recover = c.sndMax
			c.dupAcks = 0
			c.rewind()
		}
	}
	c.guestWnd = wnd
	if e := ack + wnd; seqGT(e, c.edge) {
		c.edge = e
	} else if wnd == 0 {
		c.edge = ack
	}
}

// discardBatch is how many ACKed bytes wait in the socket's receive queue
// before they are dropped from it in one call (the tick drops the rest).
const discardBatch = 64 << 10

// release takes note of n bytes the guest ACKed: they leave the socket's
// receive queue in batches (discard), not one call per ACK. The peek
// offset counts from the head of the queue, so it stays right (the
// kernel lowers it by what a read takes), and a rewind drops them first.
func (c *conn) release(n int) bool {
	c.acked += n
	if c.acked < discardBatch {
		return true
	}
	return c.discard()
}

// discard drops the bytes the guest ACKed from the socket's receive
// queue; it reports false (the connection reset) when it cannot.
func (c *conn) discard() bool {
	for c.acked > 0 && c.fd >= 0 {
		k := min(c.acked, len(c.t.trash))
		r, _, e := unix.Syscall6(unix.SYS_RECVFROM, uintptr(c.fd), uintptr(unsafe.Pointer(&c.t.trash[0])), uintptr(k),
			unix.MSG_TRUNC|unix.MSG_DONTWAIT, 0, 0)
		if e != 0 || int(r) <= 0 {
			c.t.o.Log.Debug("fast path: discard failed", "err", e, "n", r)
			c.acked = 0
			c.abort()
			return false
		}
		c.acked -= int(r)
	}
	return true
}

// guestData puts the guest's in-order data into the host socket.
func (c *conn) guestData(seq uint32, data []byte, fin, psh bool) {
	if seqLT(seq, c.rcvNxt) {
		skip := c.rcvNxt - seq
		if int(skip) >= len(data) {
			// All old: a retransmission, a keepalive probe, or a FIN
			// we already have. ACK it.
			if !(fin && int(skip) == len(data) && !c.guestFin) {
				c.sendAck()
				return
			}
			data = nil
		} else {
			data = data[skip:]
		}
		seq = c.rcvNxt
	}
	if c.guestFin {
		c.sendAck()
		return
	}
	if seq != c.rcvNxt {
		c.nOOO++
		c.hold(seq, data, fin)
		c.dupAck = true
		c.sendAck() // out of order: a duplicate ACK asks for the gap
		return
	}
	if !c.deliver(data, fin, !psh) {
		return
	}
	// The gap may be filled: what was held follows.
	for len(c.ooo) > 0 && c.state == stateEstablished && !c.guestFin && !c.wantWnd {
		h := c.ooo[0]
		end := h.seq + uint32(len(h.data))
		if seqGT(h.seq, c.rcvNxt) {
			break
		}
		c.ooo = c.ooo[1:]
		c.oooBytes -= len(h.data)
		c.t.held -= len(h.data)
		if seqLT(end, c.rcvNxt) || end == c.rcvNxt && !h.fin {
			continue // all old
		}
		if !c.deliver(h.data[c.rcvNxt-h.seq:], h.fin, false) {
			return
		}
	}
	if len(c.ooo) == 0 {
		c.ooo = nil
	}
	// ACK every other full segment, half a window, and at once a short
	// window, or past a gap; the rest (a request, say) goes with the data
	// we send next (its answer), or at the tick, as a delayed ACK. A FIN
	// too: its ACK mostly rides on ours (the host peer closing in turn),
	// which saves the guest a segment for every connection.
	if unacked := c.rcvNxt - c.ackSent; c.wantWnd || c.ooo != nil || unacked >= 2*uint32(c.mss()) || unacked >= c.wndSent/2 {
		c.sendAck()
	} else {
		c.ackPending = true
	}
}

// oooSeg is a guest segment held past a gap.
type oooSeg struct {
	seq  uint32
	data []byte
	fin  bool
}

// Bounds on what one connection holds past a gap.
const (
	maxOOOSegs  = 256 // the bytes bound below is the one that counts; a window of small segments fits
	maxOOOBytes = 256 << 10
)

// hold keeps a copy of an out-of-order segment, in sequence order, within
// the bounds (a segment over them is dropped: the guest sends it again).
func (c *conn) hold(seq uint32, data []byte, fin bool) {
	if len(data) == 0 || len(c.ooo) >= maxOOOSegs || c.oooBytes+len(data) > maxOOOBytes || c.t.held+len(data) > maxHeld {
		return
	}
	if seqGE(seq+uint32(len(data)), c.rcvNxt+max(c.wndSent, 1)+(64<<10)) {
		return // far past the window we gave: junk
	}
	i := 0
	for i < len(c.ooo) && seqLT(c.ooo[i].seq, seq) {
		i++
	}
	if i < len(c.ooo) && c.ooo[i].seq == seq && len(c.ooo[i].data) >= len(data) {
		return // a duplicate
	}
	c.ooo = append(c.ooo, oooSeg{})
	copy(c.ooo[i+1:], c.ooo[i:])
	c.ooo[i] = oooSeg{seq: seq, data: append([]byte(nil), data...), fin: fin}
	c.oooBytes += len(data)
	c.t.held += len(data)
}

// deliver puts in-order guest data (and its FIN) into the host socket; it
// reports false when the connection is over.
//
// Data the guest did not push (no PSH: more of the same write follows) goes
// with MSG_MORE, so that the host socket sends full segments and not one
// per guest segment; the tick flushes what a guest never pushed.
func (c *conn) deliver(data []byte, fin, more bool) bool {
	if len(data) > 0 {
		if len(c.over) > 0 {
			// The socket may have room again: its EPOLLOUT comes only
			// after it was found full, and the tick is 10 ms away, in
			// which a guest sends megabytes.
			c.flushOver()
			if c.state != stateEstablished || c.fd < 0 {
				return false
			}
		}
		if len(c.over) > 0 {
			// Behind bytes the socket has not taken yet: queue, in order.
			if len(c.over)+len(data) > maxOver || c.t.held+len(data) > maxHeld {
				c.nDropped++
				return true // past what we let the guest send: it sends again
			}
			c.over = append(c.over, data...)
			c.t.held += len(data)
			c.rcvNxt += uint32(len(data))
		} else {
			took, ok := c.send(data, more && !fin)
			if !ok {
				return false
			}
			if took < len(data) {
				// The socket took less than the window promised (its
				// buffer counts overhead too): keep the rest, ACKed, and
				// write it when the socket drains; past the agent's
				// budget, the guest sends it again.
				c.nPartial++
				c.wantWnd = true
				c.watchWriteSpace()
				if rest := len(data) - took; c.t.held+rest <= maxHeld {
					c.over = append(c.over[:0], data[took:]...)
					c.t.held += rest
				} else {
					c.nDropped++
					c.rcvNxt += uint32(took)
					fin = false
					goto done
				}
			}
			c.rcvNxt += uint32(len(data))
		}
	}
done:
	if fin {
		c.rcvNxt++
		c.guestFin = true
		c.t.held -= c.oooBytes
		c.ooo, c.oooBytes = nil, 0
		if len(c.over) == 0 {
			_ = unix.Shutdown(c.fd, unix.SHUT_WR)
		}
	}
	return true
}

// maxOver bounds the bytes a connection holds for a full socket; maxHeld
// the bytes all connections hold (past gaps and for full sockets), so a
// guest's out-of-order or over-window floods cost the agent at most that.
const (
	maxOver = 256 << 10
	maxHeld = 4 << 20
)

// send writes guest data into the host socket and counts it; it reports
// false when the connection is over.
func (c *conn) send(data []byte, more bool) (int, bool) {
	flags := unix.MSG_DONTWAIT | unix.MSG_NOSIGNAL
	if more {
		flags |= unix.MSG_MORE
	}
	c.corked = more
	r, _, e := unix.Syscall6(unix.SYS_SENDTO, uintptr(c.fd), uintptr(unsafe.Pointer(&data[0])), uintptr(len(data)), uintptr(flags), 0, 0)
	switch {
	case e == unix.EAGAIN:
		return 0, true
	case e != 0:
		c.t.stats.HostResets++
		c.abort()
		return 0, false
	}
	c.fl.Up.Add(uint64(r))
	if c.outEst >= 0 {
		c.outEst += int(r)
	}
	return int(r), true
}

// flushOver writes what a full socket left over; once it is all in, a FIN
// the guest sent meanwhile shuts the socket for writing.
func (c *conn) flushOver() {
	if len(c.over) == 0 || c.fd < 0 {
		return
	}
	took, ok := c.send(c.over, false)
	if !ok {
		return
	}
	n := copy(c.over, c.over[took:])
	c.over = c.over[:n]
	c.t.held -= took
	if n == 0 {
		c.over = nil
		if c.guestFin {
			_ = unix.Shutdown(c.fd, unix.SHUT_WR)
		}
	} else {
		c.watchWriteSpace()
	}
}

// push sends what the socket holds within the guest's window.
func (c *conn) push() {
	t := c.t
	c.blocked = false
	for c.state == stateEstablished {
		if c.sockEOF && c.sndNxt == c.eofSeq {
			if !c.finSent && !c.finAcked {
				c.sendCtl(wire.TCPFlagFIN|wire.TCPFlagACK, c.eofSeq)
				c.finSent = true
				if seqLT(c.sndMax, c.eofSeq+1) {
					c.sndMax = c.eofSeq + 1
				}
				c.armRTO()
			}
			return
		}
		room := int(int32(c.edge - c.sndNxt))
		if room <= 0 {
			if c.sndMax == c.sndUna && c.probeAt.IsZero() {
				c.probeAt = t.now.Add(persistEvery)
			}
			return
		}
		c.probeAt = time.Time{}
		if !c.readable {
			return
		}
		sh := t.o.Shared
		if sh.Rx.Len() > sh.Rx.Cap()/2 {
			c.blocked = true
			return
		}
		if _, rx := sh.Queued(); rx > 4<<20 {
			c.blocked = true
			return
		}
		// Frames for up to room bytes, one recvmsg into all of them.
		want := 0
		t.frames = t.frames[:0]
		for i := 0; i < batchFrames && want < room; i++ {
			n := min(c.segMax, room-want)
			f := c.newFrame(n)
			t.frames = append(t.frames, f)
			b := f.B[c.hdrLen():]
			t.iov[i].Base = &b[0]
			t.iov[i].SetLen(n)
			want += n
		}
		got, err := c.peek(len(t.frames))
		if err != nil || got <= 0 {
			for _, f := range t.frames {
				sh.Frames.Put(f)
			}
			clear(t.frames)
			switch {
			case err == unix.EAGAIN:
				c.readable = false
			case err != nil:
				t.stats.HostResets++
				c.abort()
			default: // end of stream
				c.sockEOF = true
				c.eofSeq = c.sndNxt
				continue
			}
			return
		}
		left := got
		for _, f := range t.frames {
			if left == 0 {
				sh.Frames.Put(f)
				continue
			}
			n := min(left, len(f.B)-c.hdrLen())
			flags := wire.TCPFlagACK
			if n == left {
				flags |= uint8(header.TCPFlagPsh)
			}
			c.finishFrame(f, uint8(flags), c.sndNxt, n, nil)
			c.sndNxt += uint32(n)
			left -= n
		}
		clear(t.frames)
		if seqGT(c.sndNxt, c.sndMax) {
			c.sndMax = c.sndNxt
		}
		c.armRTO()
		if got < want {
			if !c.rdhup {
				c.readable = false // drained; the next data comes with an event
				return
			}
			// The peer closed: the next peek finds the end.
		}
	}
}

// peek reads up to the iovecs' bytes at the peek offset.
func (c *conn) peek(n int) (int, error) {
	var msg unix.Msghdr
	msg.Iov = &c.t.iov[0]
	msg.SetIovlen(n)
	r, _, e := unix.Syscall(unix.SYS_RECVMSG, uintptr(c.fd), uintptr(unsafe.Pointer(&msg)), unix.MSG_PEEK|unix.MSG_DONTWAIT)
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

func (c *conn) armRTO() {
	if c.rtoAt.IsZero() && c.sndMax != c.sndUna {
		c.rtoAt = c.t.now.Add(c.rto())
	}
}

func (c *conn) rto() time.Duration {
	return min(minRTO<<c.retries, maxRTO)
}

// rewind goes back to the guest's last ACK: what follows is sent again,
// peeked from the socket anew.
func (c *conn) rewind() {
	if !c.discard() {
		return
	}
	if err := unix.SetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_PEEK_OFF, 0); err != nil {
		c.abort()
		return
	}
	c.sndNxt = c.sndUna
	c.finSent = false
	c.readable = true
	c.nRewind++
	c.rtoAt = time.Time{}
	c.t.stats.Retransmits++
	c.push()
}

// maybeClose ends a connection whose both directions are done.
func (c *conn) maybeClose() {
	if c.state == stateEstablished && c.guestFin && c.finAcked && len(c.over) == 0 {
		// The receive queue empty first: a close with unread data would
		// reset the peer.
		if !c.discard() {
			return
		}
		if c.fd >= 0 {
			unix.Close(c.fd)
			delete(c.t.byFD, int32(c.fd))
			c.fd = -1
		}
		c.state = stateClosed
		c.deadline = c.t.now.Add(lingerTime)
		c.rtoAt, c.probeAt = time.Time{}, time.Time{}
		c.linger()
		c.finish()
	}
}

// socketEvent handles the host socket's readiness.
func (c *conn) socketEvent(ev uint32) {
	if ev&(unix.EPOLLRDHUP|unix.EPOLLHUP) != 0 {
		c.rdhup = true // kept for later: an edge comes once
	}
	if ev&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP) != 0 {
		c.readable = true // also before the guest's ACK: kept for when it comes
	}
	switch c.state {
	case stateConnecting:
		if ev&(unix.EPOLLOUT|unix.EPOLLERR|unix.EPOLLHUP) == 0 {
			return
		}
		if ev&(unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			// A connect that failed reports an error (and a hang-up);
			// one that succeeded, only that the socket is writable.
			c.t.stats.Refused++
			c.rcvNxt = c.guestISN + 1
			c.sendCtl(wire.TCPFlagRST|wire.TCPFlagACK, 0)
			c.gone()
			return
		}
		c.established()
		return
	case stateSynAckSent:
		return // data waits for the guest's ACK
	case stateEstablished:
	default:
		return
	}
	if ev&unix.EPOLLERR != 0 {
		soerr, _ := unix.GetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_ERROR)
		c.t.o.Log.Debug("fast path: host socket error", "dst", c.dst, "err", unix.Errno(soerr))
		c.t.stats.HostResets++
		c.sendReset()
		c.gone()
		return
	}
	if c.readable {
		c.push()
	}
	if ev&unix.EPOLLOUT != 0 && c.state == stateEstablished {
		c.flushOver()
		if c.wantWnd && len(c.over) == 0 {
			c.wantWnd = false
			c.sendAck()
		}
	}
	c.maybeClose()
}

// established answers the guest's SYN: the host socket is connected.
func (c *conn) established() {
	c.leaveConnecting()
	c.state = stateSynAckSent
	c.deadline = c.t.now.Add(minRTO)
	c.sendSynAck()
}

// timers runs c's timers at the tick.
func (c *conn) timers() {
	t := c.t
	now := t.now
	switch c.state {
	case stateConnecting:
		if now.After(c.deadline) {
			t.stats.ConnectTimeouts++
			c.rcvNxt = c.guestISN + 1
			c.sendCtl(wire.TCPFlagRST|wire.TCPFlagACK, 0)
			c.gone()
		}
		return
	case stateSynAckSent:
		if now.After(c.deadline) {
			c.retries++
			if c.retries > maxRetries {
				c.abort()
				return
			}
			c.deadline = now.Add(c.rto())
			c.sendSynAck()
		}
		return
	case stateClosed, stateGone:
		if now.After(c.deadline) {
			t.forget(c)
		}
		return
	}
	if !c.rtoAt.IsZero() && now.After(c.rtoAt) {
		c.retries++
		if c.retries > maxRetries {
			c.abort()
			return
		}
		c.rewind()
		c.rtoAt = now.Add(c.rto())
		if c.state != stateEstablished {
			return
		}
	}
	if !c.probeAt.IsZero() && now.After(c.probeAt) {
		// The guest's window is shut: a segment below its window makes
		// it say what the window is now.
		c.probeAt = now.Add(persistEvery)
		c.sendCtl(wire.TCPFlagACK, c.sndUna-1)
	}
	if !c.keepAt.IsZero() && now.After(c.keepAt) && c.fd >= 0 {
		// Keepalive on the host socket, once the connection has lasted
		// a while: a short one never needs it (and saves the calls).
		c.keepAt = time.Time{}
		_ = unix.SetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1)
		_ = unix.SetsockoptInt(c.fd, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, keepIdle)
	}
	if c.corked {
		// Setting TCP_NODELAY sends what MSG_MORE held.
		c.corked = false
		_ = unix.SetsockoptInt(c.fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	}
	if c.ackPending {
		c.sendAck()
	}
	if c.acked > 0 && !c.discard() {
		return
	}
	c.flushOver()
	if c.wantWnd && len(c.over) == 0 && c.recvWindow() > 0 {
		c.wantWnd = false
		c.sendAck()
	}
	if c.blocked {
		c.push()
	}
	c.maybeClose()
}
