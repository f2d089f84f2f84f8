// Package rings holds the lock-free frame queues between the TAP side and the
// userspace stack, the pool of frame buffers they carry, and the state the
// agent's goroutines share (rings, wakers, counters, termination hook).
package rings

import (
	"runtime"
	"sync/atomic"
)

// DefaultCapacity is the ring capacity used when none is given; it matches the
// virtio queue size microsandbox's network engine follows.
const DefaultCapacity = 1024

// cacheLinePad keeps the producer and consumer cursors on separate cache
// lines so they do not false-share.
type cacheLinePad [64]byte

type slot[T any] struct {
	seq atomic.Uint64
	val T
}

// Ring is a bounded, lock-free multi-producer multi-consumer FIFO queue
// (Dmitry Vyukov's array queue). Push and Pop never block and never
// allocate: a full ring refuses the push and an empty ring refuses the pop.
type Ring[T any] struct {
	_     cacheLinePad
	head  atomic.Uint64 // next position to pop
	_     cacheLinePad
	tail  atomic.Uint64 // next position to push
	_     cacheLinePad
	mask  uint64
	slots []slot[T]
}

// NewRing returns a ring holding at least capacity items; the capacity is
// rounded up to a power of two. A capacity below 2 becomes 2.
func NewRing[T any](capacity int) *Ring[T] {
	n := 2
	for n < capacity {
		n <<= 1
	}
	r := &Ring[T]{mask: uint64(n - 1), slots: make([]slot[T], n)}
	for i := range r.slots {
		r.slots[i].seq.Store(uint64(i))
	}
	return r
}

// Cap returns the number of items the ring can hold.
func (r *Ring[T]) Cap() int { return len(r.slots) }

// Len returns an estimate of the number of items in the ring.
func (r *Ring[T]) Len() int {
	t, h := r.tail.Load(), r.head.Load()
	if t < h {
		return 0
	}
	return int(t - h)
}

// Push appends v and reports whether there was room.
func (r *Ring[T]) Push(v T) bool {
	for spins := 0; ; spins++ {
		pos := r.tail.Load()
		s := &r.slots[pos&r.mask]
		seq := s.seq.Load()
		switch {
		case seq == pos:
			if r.tail.CompareAndSwap(pos, pos+1) {
				s.val = v
				s.seq.Store(pos + 1)
				return true
			}
		case seq < pos:
			// The slot still holds an item from the previous lap: full.
			return false
		}
		// Another producer moved tail; retry with the new value.
		if spins > 16 {
			runtime.Gosched()
		}
	}
}

// Pop removes the oldest item. ok is false when the ring is empty.
func (r *Ring[T]) Pop() (v T, ok bool) {
	for spins := 0; ; spins++ {
		pos := r.head.Load()
		s := &r.slots[pos&r.mask]
		seq := s.seq.Load()
		switch {
		case seq == pos+1:
			if r.head.CompareAndSwap(pos, pos+1) {
				v = s.val
				var zero T
				s.val = zero
				s.seq.Store(pos + r.mask + 1)
				return v, true
			}
		case seq < pos+1:
			return v, false
		}
		if spins > 16 {
			runtime.Gosched()
		}
	}
}
