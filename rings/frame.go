package rings

import "sync"

// Headroom is the space kept in front of every frame for the TAP's virtio
// net header, so that a frame is read and written in place.
const Headroom = 12

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
// starts Headroom bytes into the buffer and can grow up to the pool's frame
// size in place.
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

// SetLen sets the frame to the n bytes after the headroom.
func (f *Frame) SetLen(n int) { f.B = f.buf[Headroom : Headroom+n] }

// Pool hands out Frames of a fixed buffer size. Steady-state Get/Put pairs do
// not allocate.
type Pool struct {
	size int
	p    sync.Pool
}

// NewPool returns a pool of frames that hold up to size bytes.
func NewPool(size int) *Pool {
	pl := &Pool{size: size}
	pl.p.New = func() any {
		buf := make([]byte, Headroom+size)
		return &Frame{buf: buf, B: buf[Headroom:Headroom]}
	}
	return pl
}

// Size returns the largest frame the pool's buffers hold.
func (p *Pool) Size() int { return p.size }

// Get returns an empty frame (len(B) == 0, cap(B) == Size).
func (p *Pool) Get() *Frame {
	f := p.p.Get().(*Frame)
	f.B = f.buf[Headroom:Headroom]
	f.GSO = GSO{}
	return f
}

// GetLen returns a frame whose B has length n (n must not exceed Size).
func (p *Pool) GetLen(n int) *Frame {
	f := p.Get()
	f.B = f.buf[Headroom : Headroom+n]
	return f
}

// Put returns f to the pool. f must not be used afterwards.
func (p *Pool) Put(f *Frame) {
	if len(f.buf) != Headroom+p.size {
		return // not one of ours; let the GC have it
	}
	p.p.Put(f)
}
