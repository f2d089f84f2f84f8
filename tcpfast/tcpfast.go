// Package tcpfast is the TCP fast path: a translator that carries a guest's
// TCP connection straight onto a host socket, with per-connection sequence
// and window state and no TCP stack in between.
//
// One event loop (epoll) waits on the TAP (Options.Link: it reads the
// guest's frames itself, a batch at a time) and on every host socket
// (edge-triggered). A guest segment comes back into Handle on the loop's
// goroutine: its data goes into the host socket with send(), and the guest
// gets an ACK for what the socket took, with the socket's free send buffer
// as the window. A socket's data is read with MSG_PEEK at the offset
// SO_PEEK_OFF keeps, framed within the guest's window, and only dropped
// from the socket once the guest ACKs it, so the socket's receive queue is
// the retransmit buffer: a timeout or three duplicate ACKs rewind the
// offset to the last ACK and send again. The same loop runs the timers (a
// 10 ms tick while connections are open). Without a Link (a test device),
// the pump's reader calls Handle on its own goroutine.
package tcpfast

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/rings"
	"github.com/msbtap/msbtap/wire"
)

// Timers and bounds.
const (
	tick                 = 10 * time.Millisecond
	minRTO               = 200 * time.Millisecond
	maxRTO               = 10 * time.Second
	maxRetries           = 10 // retransmissions of one segment before both ends are reset
	persistEvery         = 500 * time.Millisecond
	lingerTime           = 2 * time.Second // a closed connection still answers its peer's last segments
	defaultConnect       = 10 * time.Second
	defaultMaxConnecting = 192
	keepaliveAfter       = time.Second          // a connection this old gets keepalive on its host socket
	keepIdle             = 30                   // seconds idle before the host socket's first keepalive probe
	batchFrames          = 64                   // frames peeked from a socket in one recvmsg
	yieldEvery           = 4 * time.Millisecond // see run
)

// ErrUnsupported says the kernel lacks what the fast path needs (SO_PEEK_OFF
// on TCP sockets, Linux 6.9 and later).
var ErrUnsupported = errors.New("the kernel does not support SO_PEEK_OFF on TCP sockets (Linux 6.9 or later)")

// ErrRefused says Open's connect was refused at once; the guest has had
// its reset.
var ErrRefused = errors.New("connection refused")

// Options configure a Translator.
type Options struct {
	// Shared holds the frame pool and the rx ring the guest's frames go
	// out through (the TAP writer drains it, and sees them for pcap).
	Shared *rings.Shared
	// GatewayMAC is the source of every frame; GuestMAC gives the guest's
	// current MAC.
	GatewayMAC [6]byte
	GuestMAC   func() [6]byte
	// MTU is the link's MTU; with Offload the guest takes GSO frames of up
	// to 64 KiB with partial checksums.
	MTU     int
	Offload bool
	// Direct, if set, writes frames to the TAP on the caller's thread and
	// takes them (returns true), or declines (the TAP writer is busy or
	// has frames queued: they go through the ring, in order).
	Direct func([]*rings.Frame) bool
	// MaxConnecting caps the host connects under way (default 192): a
	// new one past it resets the oldest, the likeliest to be dead, so
	// that a SYN flood at addresses that never answer cannot hold every
	// connection the sandbox may have (the gVisor path's dial budget
	// does the same).
	MaxConnecting int
	// Link, if set, is the TAP, read by the loop itself (see Link).
	Link Link
	// ConnectTimeout bounds a host connect (default 10 s).
	ConnectTimeout time.Duration
	Log            *slog.Logger
}

// Link is the TAP as the event loop reads it (tap.Pump): the loop waits on
// its descriptor with the host sockets and, when frames wait, reads them in
// a batch and hands each on as the pump's reader would, this translator's
// segments coming back into Handle on the loop's thread. A guest's segment
// then travels from the TAP to its host socket, and the answer back, with
// no hand-off between goroutines.
type Link interface {
	// HandOverReads takes the reads from the pump; false: they stay
	// with it.
	HandOverReads() (fd int, ok bool)
	// ReadReady reads and hands on the frames that wait, up to a batch.
	ReadReady() (int, error)
}

// Flow is what Open needs of a new connection.
type Flow struct {
	// Dial is where the host socket connects.
	Dial netip.AddrPort
	// Up and Down count what the guest sent (the socket took) and what it
	// received (and ACKed).
	Up, Down *atomic.Uint64
	// Done is called once when the connection is over, with the
	// translator locked: it must not call back into it.
	Done func()
}

// Stats are the translator's counters.
type Stats struct {
	Active                                     int
	Opened, Refused, ConnectTimeouts, Aborted  uint64
	Evicted                                    uint64 // connects reset to make room (MaxConnecting)
	Retransmits, FastRetransmits, BadSegments  uint64
	GuestResets, HostResets, SegmentsFromGuest uint64
	HeldBytes                                  int // guest bytes held past gaps and for full sockets, all connections
}

// Translator carries fast-path connections between the guest and host
// sockets.
type Translator struct {
	o      Options
	epfd   int
	wakefd int
	linkfd int // the TAP, when the loop reads it (-1: the pump does)
	mss4   int // the MSS the guest's segments to us fit (MTU)
	mss6   int
	sndbuf int // a new TCP socket's send buffer

	mu    sync.Mutex // mu protects everything below and every conn
	conns map[key]*conn
	byFD  map[int32]*conn
	live  map[*conn]struct{} // the connections not over: the tick visits these
	// lingerq holds the connections that are over, oldest first, until
	// their linger time is out
	lingerq connQueue
	// connq holds the connections whose host connect is under way,
	// oldest first (and some past it, dropped as they come to the
	// front); nConnecting counts the first kind
	connq       connQueue
	nConnecting int
	closed      bool
	out         []*rings.Frame // frames for the guest since the last flush
	inRead      bool           // the loop is reading the TAP: it flushes at the end of the batch
	held        int            // bytes all connections hold (see maxHeld)
	ipID        uint16
	stats       Stats
	now         time.Time

	count atomic.Int32 // len(conns), read without the lock
	done  chan struct{}

	// scratch, used with mu held
	iov    []unix.Iovec
	frames []*rings.Frame
	trash  []byte
}

type key struct{ guest, dst netip.AddrPort }

// Probe reports whether the kernel supports what the fast path needs.
func Probe() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("fast path probe: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PEEK_OFF, 0); err != nil {
		return ErrUnsupported
	}
	return nil
}

// newSocketSndbuf is the send buffer a new TCP socket has here (the
// namespace's net.ipv4.tcp_wmem default), asked for once; the kernel
// only grows it as a connection speeds up (recvWindow asks again then).
func newSocketSndbuf() int {
	const fallback = 16 << 10 // the kernel's default
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fallback
	}
	defer unix.Close(fd)
	if b, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF); err == nil && b > 0 {
		return b
	}
	return fallback
}

// New starts a translator and its event loop.
func New(o Options) (*Translator, error) {
	if err := Probe(); err != nil {
		return nil, err
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.ConnectTimeout <= 0 {
		o.ConnectTimeout = defaultConnect
	}
	if o.MaxConnecting <= 0 {
		o.MaxConnecting = defaultMaxConnecting
	}
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("fast path: epoll: %w", err)
	}
	wfd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("fast path: eventfd: %w", err)
	}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wfd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wfd)}); err != nil {
		unix.Close(epfd)
		unix.Close(wfd)
		return nil, fmt.Errorf("fast path: epoll: %w", err)
	}
	t := &Translator{
		o: o, epfd: epfd, wakefd: wfd,
		mss4:  o.MTU - wire.IPHeaderLen(false) - tcpHdrLen,
		mss6:  o.MTU - wire.IPHeaderLen(true) - tcpHdrLen,
		conns: make(map[key]*conn), byFD: make(map[int32]*conn), live: make(map[*conn]struct{}),
		done:  make(chan struct{}),
		iov:   make([]unix.Iovec, batchFrames),
		trash: make([]byte, 64<<10), linkfd: -1, sndbuf: newSocketSndbuf(),
	}
	if o.Link != nil {
		if fd, ok := o.Link.HandOverReads(); ok {
			if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(fd)}); err != nil {
				unix.Close(epfd)
				unix.Close(wfd)
				return nil, fmt.Errorf("fast path: epoll on the TAP: %w", err)
			}
			t.linkfd = fd
		}
	}
	go t.run()
	return t, nil
}

// ReadsLink reports whether the loop reads the TAP (Options.Link took
// over its reads).
func (t *Translator) ReadsLink() bool { return t.linkfd >= 0 }

// Active is the number of open connections.
func (t *Translator) Active() int { return int(t.count.Load()) }

// Stats returns a snapshot of the counters.
func (t *Translator) Stats() Stats {
	t.mu.Lock()
	s := t.stats
	s.Active = len(t.conns)
	s.HeldBytes = t.held
	t.mu.Unlock()
	return s
}

// Handle takes a guest segment of a fast-path connection. It reports false
// when the segment belongs to none (the caller handles it then). A SYN for
// a connection that is over and only lingering is not taken either.
func (t *Translator) Handle(p *wire.Packet, seg wire.TCPSegment) bool {
	if t.count.Load() == 0 {
		return false
	}
	k := key{netip.AddrPortFrom(p.Src, seg.SrcPort), netip.AddrPortFrom(p.Dst, seg.DstPort)}
	t.mu.Lock()
	c := t.conns[k]
	if c == nil || t.closed {
		t.mu.Unlock()
		return false
	}
	if (c.state == stateGone || c.state == stateClosed) && seg.IsSYN() {
		t.forget(c) // a new connection on the same ports
		t.mu.Unlock()
		return false
	}
	t.now = time.Now()
	t.stats.SegmentsFromGuest++
	c.guestSegment(p, seg)
	if !t.inRead {
		t.flushLocked()
	}
	t.mu.Unlock()
	return true
}

// Open starts a connection for the guest's SYN: a non-blocking connect to
// fl.Dial; the guest gets its SYN-ACK once it succeeds, a reset if it
// fails. The returned Conn resets it from any goroutine.
func (t *Translator) Open(p *wire.Packet, seg wire.TCPSegment, fl Flow) (*Conn, error) {
	if !seg.IsSYN() {
		return nil, errors.New("not a SYN")
	}
	tcp := p.L4
	opts := parseSynOptions(tcp[tcpHdrLen:seg.HdrLen])
	fd, sa, err := hostSocket(fl.Dial)
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			unix.Close(fd)
		}
	}()
	c := &conn{
		t: t, fd: fd, v6: p.V6, fl: fl,
		guest: netip.AddrPortFrom(p.Src, seg.SrcPort), dst: netip.AddrPortFrom(p.Dst, seg.DstPort),
		state: stateConnecting, guestISN: seg.Seq, rcvNxt: seg.Seq + 1,
		guestMSS: int(opts.mss), guestWnd: uint32(header16(tcp[14:])),
	}
	// SACK stays off: held segments are ACKed all at once when the gap
	// fills (with gVisor as the guest, SACK blocks from us stalled it).
	if opts.ws >= 0 {
		c.guestWS = uint8(min(opts.ws, 14))
		c.ourWS = ourWindowScale
	}
	c.segMax = c.mss()
	if t.o.Offload {
		// GSO frames of whole segments (at a 64 KiB MTU, one segment).
		c.segMax = max(c.mss(), (maxGSOPayload/c.mss())*c.mss())
	}
	// Nothing is queued yet, and the buffer is the default every socket
	// of ours starts with: no call to ask either for the SYN-ACK's window.
	c.sndbuf, c.outEst = t.sndbuf, 0
	c.iss = randISN()
	c.sndUna, c.sndNxt, c.sndMax, c.recover = c.iss+1, c.iss+1, c.iss+1, c.iss+1
	c.edge = c.sndUna + c.guestWnd

	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, errors.New("fast path closed")
	}
	k := key{c.guest, c.dst}
	if old := t.conns[k]; old != nil {
		if old.state != stateGone {
			return nil, errors.New("fast path: connection exists")
		}
		t.forget(old)
	}
	if err := unix.Connect(fd, sa); err != nil && err != unix.EINPROGRESS {
		// Refused at once (a local port with nothing on it, say).
		t.stats.Refused++
		t.sendRefusal(p, seg)
		t.flushLocked()
		return nil, fmt.Errorf("fast path connect: %w (%w)", ErrRefused, err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET, Fd: int32(fd)}
	if err := unix.EpollCtl(t.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return nil, fmt.Errorf("fast path epoll: %w", err)
	}
	ok = true
	t.now = time.Now()
	c.deadline = t.now.Add(t.o.ConnectTimeout)
	c.keepAt = t.now.Add(keepaliveAfter)
	t.makeRoom()
	t.conns[k] = c
	t.byFD[int32(fd)] = c
	t.live[c] = struct{}{}
	t.nConnecting++
	t.connq.push(c)
	t.count.Store(int32(len(t.conns)))
	t.stats.Opened++
	if len(t.conns) == 1 {
		if !t.inRead {
			t.wake() // the loop sleeps without a timeout while there are none: it ticks from now on
		}
	}
	if t.linkfd < 0 && connected(fd) {
		// A server on this host (or a veth away) has often answered
		// before connect returned: the guest gets its SYN-ACK now, not
		// after a wake-up of the loop. The loop's event for it finds
		// the SYN-ACK sent. (When the loop reads the TAP, this is the
		// loop, and it has the event in its next round.)
		c.established()
		t.flushLocked()
	}
	return &Conn{c: c}, nil
}

// hostSocket makes the non-blocking host socket for a connection to dial,
// with SO_PEEK_OFF on (the socket is the retransmit buffer) and Nagle off
// (the guest's segments are sent as they come).
func hostSocket(dial netip.AddrPort) (int, unix.Sockaddr, error) {
	fam := unix.AF_INET6
	var sa unix.Sockaddr
	if a := dial.Addr(); a.Is4() || a.Is4In6() {
		fam = unix.AF_INET
		sa = &unix.SockaddrInet4{Port: int(dial.Port()), Addr: a.Unmap().As4()}
	} else {
		sa = &unix.SockaddrInet6{Port: int(dial.Port()), Addr: a.As16()}
	}
	fd, err := unix.Socket(fam, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, nil, fmt.Errorf("fast path socket: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PEEK_OFF, 0); err != nil {
		unix.Close(fd)
		return -1, nil, ErrUnsupported
	}
	_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	return fd, sa, nil
}

// connected reports whether a non-blocking connect has completed
// successfully already (a failure is left to the loop's event).
func connected(fd int) bool {
	fds := [1]unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
	n, err := unix.Poll(fds[:], 0)
	return err == nil && n == 1 && fds[0].Revents&(unix.POLLERR|unix.POLLHUP) == 0 && fds[0].Revents&unix.POLLOUT != 0
}

// Conn is a fast-path connection, for the flow table.
type Conn struct{ c *conn }

// Reset resets the connection both ways (flows close, revocation).
func (h *Conn) Reset() {
	t := h.c.t
	t.mu.Lock()
	if h.c.state != stateGone && h.c.state != stateClosed {
		h.c.abort()
	}
	t.flushLocked()
	t.mu.Unlock()
}

// ResetAll resets every connection both ways.
func (t *Translator) ResetAll() {
	t.mu.Lock()
	for _, c := range t.conns {
		if c.state != stateGone && c.state != stateClosed {
			c.abort()
		}
	}
	t.flushLocked()
	t.mu.Unlock()
}

// Close resets every connection, stops the loop and waits for it.
func (t *Translator) Close() {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		<-t.done
		return
	}
	for _, c := range t.conns {
		if c.state != stateGone && c.state != stateClosed {
			c.abort()
		}
	}
	for _, c := range t.conns {
		t.forget(c)
	}
	t.closed = true
	t.flushLocked()
	t.mu.Unlock()
	t.wake()
	<-t.done
	unix.Close(t.epfd)
	unix.Close(t.wakefd)
}

// makeRoom resets the oldest connects under way while they are at the
// cap.
func (t *Translator) makeRoom() {
	t.connq.popWhile(func(c *conn) bool {
		if c.state != stateConnecting {
			return true // connected, or over: no longer one
		}
		if t.nConnecting < t.o.MaxConnecting {
			return false
		}
		t.stats.Evicted++
		c.abort()
		return true
	})
	if t.connq.len() > 2*t.o.MaxConnecting+64 {
		// Many quick connects behind a slow one: keep the live ones.
		t.connq.keep(func(c *conn) bool { return c.state == stateConnecting })
	}
}

// expire forgets the lingering connections whose time is out. The queue
// is in the order they ended; one whose linger was extended (a reset after
// its close) holds those behind it back a little, which is harmless.
func (t *Translator) expire() {
	t.lingerq.popWhile(func(c *conn) bool {
		if c.forgotten {
			return true
		}
		if !t.now.After(c.deadline) {
			return false
		}
		t.forget(c)
		return true
	})
}

func (t *Translator) wake() {
	var b [8]byte
	b[0] = 1
	_, _ = unix.Write(t.wakefd, b[:])
}

// forget takes c out of the tables for good.
func (t *Translator) forget(c *conn) {
	if c.fd >= 0 {
		unix.Close(c.fd)
		delete(t.byFD, int32(c.fd))
		c.fd = -1
	}
	delete(t.conns, key{c.guest, c.dst})
	delete(t.live, c)
	c.forgotten = true
	t.count.Store(int32(len(t.conns)))
	c.finish()
}

// queue holds a frame for the guest until flushLocked.
func (t *Translator) queue(f *rings.Frame) {
	t.out = append(t.out, f)
	if len(t.out) >= batchFrames {
		t.flushLocked()
	}
}

// directMax is the most frames written to the TAP on the loop's own
// thread: an answer's few frames save the TAP writer's wake-up; a bulk
// transfer's go through the ring, so that the guest kernel's receive work
// (which a TAP write does inline) runs beside the loop, not in it.
const directMax = 4

// flushLocked hands the frames queued since the last flush to the TAP:
// written at once when few and the TAP writer is idle with nothing queued
// (Options.Direct), else through the rx ring, waking its writer.
func (t *Translator) flushLocked() {
	if len(t.out) == 0 {
		return
	}
	if t.o.Direct != nil && len(t.out) <= directMax && t.o.Direct(t.out) {
		clear(t.out)
		t.out = t.out[:0]
		return
	}
	n := 0
	for _, f := range t.out {
		if t.o.Shared.PushRxNoWake(f) {
			n++
		}
	}
	clear(t.out)
	t.out = t.out[:0]
	if n > 0 {
		t.o.Shared.RxWake.Wake()
	}
}

// run is the event loop: host socket events, the TAP when it reads it,
// and the tick. It does not lock its OS thread: sysmon preempts a
// goroutine that has not been scheduled for 10 ms, and a locked one then
// hands its thread over and back (futex wake-ups both ways) and keeps
// sysmon polling every few hundred microseconds; a yield every few
// milliseconds while connections are open avoids both (about 9% less CPU
// per 1-byte exchange, measured).
func (t *Translator) run() {
	defer close(t.done)
	events := make([]unix.EpollEvent, 128)
	var nextTick, nextYield, last time.Time // last: the last round's time
	for {
		timeout := -1
		if t.count.Load() > 0 {
			timeout = int(tick / time.Millisecond)
			if !nextYield.After(last) {
				runtime.Gosched()
				nextYield = last.Add(yieldEvery)
			}
		}
		n, err := unix.EpollWait(t.epfd, events, timeout)
		if err != nil && err != unix.EINTR {
			t.o.Log.Error("fast path loop stopped", "err", err)
			return
		}
		t.mu.Lock()
		if t.closed {
			t.mu.Unlock()
			return
		}
		t.now = time.Now()
		last = t.now
		frames := false
		for i := 0; i < n; i++ {
			ev := &events[i]
			switch {
			case ev.Fd == int32(t.wakefd):
				var b [8]byte
				_, _ = unix.Read(t.wakefd, b[:])
			case ev.Fd == int32(t.linkfd):
				frames = true
			default:
				if c := t.byFD[ev.Fd]; c != nil {
					c.socketEvent(ev.Events)
				}
			}
		}
		if !t.now.Before(nextTick) {
			nextTick = t.now.Add(tick)
			for c := range t.live {
				c.timers()
			}
			t.expire()
		}
		t.flushLocked()
		t.mu.Unlock()
		if frames {
			t.readLink()
		}
	}
}

// readLink reads a batch of guest frames from the TAP and hands them on
// (without t.mu: the fast path's own come back into Handle), then sends
// what they called for at once: one flush for the batch. (Reading a lone
// frame without the read that finds no more, and coming back for the rest
// on the TAP's next readiness, measured no better on rr and worse on crr.)
func (t *Translator) readLink() {
	t.mu.Lock()
	t.inRead = true
	t.mu.Unlock()
	_, err := t.o.Link.ReadReady()
	t.mu.Lock()
	t.inRead = false
	t.flushLocked()
	t.mu.Unlock()
	if err != nil {
		// The TAP is gone (the agent is closing): stop waiting on it.
		_ = unix.EpollCtl(t.epfd, unix.EPOLL_CTL_DEL, t.linkfd, nil)
		if !errors.Is(err, os.ErrClosed) {
			t.o.Log.Error("fast path: TAP read failed", "err", err)
		}
	}
}

// Debug describes the translator's connections, for failures.
func (t *Translator) Debug() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := ""
	for _, c := range t.conns {
		s += fmt.Sprintf("state %d rcvNxt +%d sndUna +%d sndNxt +%d sndMax +%d edge +%d guestWnd %d wndField %d ws %d/%d guestFin %v eof %v finSent %v finAcked %v readable %v wantWnd %v blocked %v held %d\n",
			c.state, c.rcvNxt-c.guestISN, c.sndUna-c.iss, c.sndNxt-c.iss, c.sndMax-c.iss, c.edge-c.iss, c.guestWnd, c.wndField, c.guestWS, c.ourWS,
			c.guestFin, c.sockEOF, c.finSent, c.finAcked, c.readable, c.wantWnd, c.blocked, len(c.ooo))
	}
	return s
}
