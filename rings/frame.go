package rings

import "sync"

// Frame is one Ethernet frame in a pooled buffer. B holds the frame; its
// capacity is the pool's frame size, so a Frame can be refilled in place.
type Frame struct {
	B []byte
}

// Pool hands out Frames of a fixed buffer size. Steady-state Get/Put pairs do
// not allocate.
type Pool struct {
	size int
	p    sync.Pool
}

// NewPool returns a pool of frames whose buffers hold size bytes.
func NewPool(size int) *Pool {
	pl := &Pool{size: size}
	pl.p.New = func() any { return &Frame{B: make([]byte, 0, size)} }
	return pl
}

// Size returns the buffer size of the frames in the pool.
func (p *Pool) Size() int { return p.size }

// Get returns a frame with an empty B of capacity Size.
func (p *Pool) Get() *Frame {
	f := p.p.Get().(*Frame)
	f.B = f.B[:0]
	return f
}

// GetLen returns a frame whose B has length n (n must not exceed Size).
func (p *Pool) GetLen(n int) *Frame {
	f := p.p.Get().(*Frame)
	f.B = f.B[:n]
	return f
}

// Put returns f to the pool. f must not be used afterwards.
func (p *Pool) Put(f *Frame) {
	if cap(f.B) != p.size {
		return // not one of ours; let the GC have it
	}
	p.p.Put(f)
}
