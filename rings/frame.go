package rings

import "sync"

// Headroom is the space kept in front of every frame for the TAP's virtio
// net header, so that a frame is read and written in place.
const Headroom = 12

// SmallSize is the capacity of a small frame: a whole frame of a 1500-byte
// MTU link with a VLAN tag and room to spare, so that most frames, and every
// frame of a flood of small packets, take 2 KiB and not a 64 KiB GSO buffer.
const SmallSize = 2048 - Headroom

// GSO is the offload state of a frame, as the virtio net header carries it
// on a TAP with IFF_VNET_HDR. The zero value is a plain frame whose
// checksums are complete.
type GSO struct {
	// NeedsCsum: the transport checksum holds only the pseudo-header sum;
	// the sum from CsumStart is to be stored at CsumStart+CsumOffset.
	NeedsCsum             bool
	CsumStart, CsumOffset uint16
	// DataValid: the sender already validated the checksums.
	DataValid bool
	// Type is GSONone, GSOTCPv4 or GSOTCPv6; Size the segment size (MSS);
	// HdrLen the length of the headers in front of the payload.
	Type         uint8
	Size, HdrLen uint16
}

// GSO types, as in the virtio net header.
const (
	GSONone  = 0
	GSOTCPv4 = 1
	GSOTCPv6 = 4
)

// Frame is one Ethernet frame in a pooled buffer. B holds the frame; it
// starts Headroom bytes into the buffer and can grow up to the frame's
// capacity in place.
type Frame struct {
	B   []byte
	GSO GSO
	buf []byte
}

// Full returns the frame with n bytes of headroom in front (n ≤ Headroom).
func (f *Frame) Full(n int) []byte { return f.buf[Headroom-n : Headroom+len(f.B)] }

// Head returns the n bytes of headroom in front of the frame.
func (f *Frame) Head(n int) []byte { return f.buf[Headroom-n : Headroom] }

// Buffer returns the whole buffer, headroom included, for a read to fill.
func (f *Frame) Buffer() []byte { return f.buf }

// Cap returns the largest frame the buffer holds.
func (f *Frame) Cap() int { return len(f.buf) - Headroom }

// SetLen sets the frame to the n bytes after the headroom.
func (f *Frame) SetLen(n int) { f.B = f.buf[Headroom : Headroom+n] }

// Pool hands out frames in two size classes: small ones (SmallSize) for
// the frames of an ordinary MTU, large ones for 64 KiB GSO segments and
// jumbo MTUs. Steady-state Get/Put pairs do not allocate. The pools are
// sync.Pools: buffers nobody uses go back to the garbage collector.
type Pool struct {
	small, large int
	sp, lp       sync.Pool
}

// NewPool returns a pool of frames that hold up to size bytes (the large
// class); when size is no more than SmallSize there is one class.
func NewPool(size int) *Pool {
	pl := &Pool{small: min(size, SmallSize), large: size}
	pl.sp.New = func() any { return newFrame(pl.small) }
	pl.lp.New = func() any { return newFrame(pl.large) }
	return pl
}

func newFrame(size int) *Frame {
	buf := make([]byte, Headroom+size)
	return &Frame{buf: buf, B: buf[Headroom:Headroom]}
}

// Size returns the largest frame the pool's buffers hold.
func (p *Pool) Size() int { return p.large }

// SmallSize returns the capacity of the small class.
func (p *Pool) SmallSize() int { return p.small }

// Get returns an empty small frame.
func (p *Pool) Get() *Frame { return reset(p.sp.Get().(*Frame)) }

// GetLarge returns an empty frame of the large class.
func (p *Pool) GetLarge() *Frame {
	if p.large == p.small {
		return p.Get()
	}
	return reset(p.lp.Get().(*Frame))
}

// GetLen returns a frame of the smallest class that holds n bytes, with B
// of length n (n must not exceed Size).
func (p *Pool) GetLen(n int) *Frame {
	f := p.Get
	if n > p.small {
		f = p.GetLarge
	}
	fr := f()
	fr.B = fr.buf[Headroom : Headroom+n]
	return fr
}

func reset(f *Frame) *Frame {
	f.B = f.buf[Headroom:Headroom]
	f.GSO = GSO{}
	return f
}

// Put returns f to the pool. f must not be used afterwards.
func (p *Pool) Put(f *Frame) {
	switch len(f.buf) - Headroom {
	case p.small:
		p.sp.Put(f)
	case p.large:
		p.lp.Put(f)
	} // not one of ours: let the GC have it
}
