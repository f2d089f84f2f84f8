package rings

import (
	"sync/atomic"
	"time"

	"github.com/msbtap/msbtap/wake"
)

// Shared is the state shared by the TAP reader and writer, the stack's poll
// loop and the proxy goroutines, shaped like the SharedState of
// microsandbox's network engine.
// Ring names follow the guest's point of view: Tx carries frames the guest
// transmitted (TAP → stack), Rx frames the guest will receive (stack → TAP).
type Shared struct {
	// Tx holds frames from the guest, pushed by the TAP reader and popped by
	// the stack's poll loop.
	Tx *Ring[*Frame]
	// Rx holds frames for the guest, pushed by the stack and the proxies and
	// popped by the TAP writer.
	Rx *Ring[*Frame]
	// TxWake wakes the poll loop: Tx has frames.
	TxWake *wake.Waker
	// RxWake wakes the TAP writer: Rx has frames.
	RxWake *wake.Waker
	// Frames is the pool every frame buffer comes from.
	Frames *Pool
	// Counters are the boundary counters.
	Counters Counters

	// maxQueued bounds the buffer bytes each ring holds, whatever the
	// number of frames; txQueued and rxQueued are what they hold now.
	maxQueued          int64
	txQueued, rxQueued atomic.Int64

	// txOwner is held by whoever handles the guest's frames at a time:
	// the stack's poll loop, or the TAP reader handling its own batch
	// inline (run to completion) when the poll loop is idle. txHandler is
	// what handles one frame (taking it back to the pool).
	txOwner   atomic.Bool
	txHandler atomic.Pointer[func(*Frame)]
}

// DefaultMaxQueued is the default bound on the buffer bytes a ring holds.
const DefaultMaxQueued = 8 << 20

// NewShared returns shared state with rings of the given capacity (0 means
// DefaultCapacity) and frame buffers of up to frameSize bytes; each ring
// holds at most DefaultMaxQueued bytes of buffers.
func NewShared(capacity, frameSize int) *Shared {
	if capacity <= 0 {
		capacity = DefaultCapacity
	}
	return &Shared{
		Tx:        NewRing[*Frame](capacity),
		Rx:        NewRing[*Frame](capacity),
		TxWake:    wake.New(),
		RxWake:    wake.New(),
		Frames:    NewPool(frameSize),
		maxQueued: DefaultMaxQueued,
	}
}

// SetMaxQueued bounds the buffer bytes each ring holds (before use).
func (s *Shared) SetMaxQueued(n int64) { s.maxQueued = n }

// push queues f on r unless that would pass the ring's byte bound or its
// frame count; a refused frame goes back to the pool and is counted.
func (s *Shared) push(r *Ring[*Frame], queued *atomic.Int64, f *Frame, full DropReason) bool {
	n := int64(len(f.buf))
	if queued.Add(n) > s.maxQueued {
		queued.Add(-n)
	} else if r.Push(f) {
		return true
	} else {
		queued.Add(-n)
	}
	s.Counters.Drop(full)
	s.Frames.Put(f)
	return false
}

func pop(r *Ring[*Frame], queued *atomic.Int64) (*Frame, bool) {
	f, ok := r.Pop()
	if ok {
		queued.Add(-int64(len(f.buf)))
	}
	return f, ok
}

// PushTx queues a frame from the guest for the stack. A full ring drops the
// frame (returned to the pool) and counts it, like a lossy NIC. It does not
// wake the stack: callers batch pushes and wake once.
func (s *Shared) PushTx(f *Frame) bool { return s.push(s.Tx, &s.txQueued, f, DropTxFull) }

// PopTx takes the oldest frame from the guest.
func (s *Shared) PopTx() (*Frame, bool) { return pop(s.Tx, &s.txQueued) }

// PushRx queues a frame for the guest and wakes the writer. A full ring drops
// the frame and counts it.
func (s *Shared) PushRx(f *Frame) bool {
	if !s.PushRxNoWake(f) {
		return false
	}
	s.RxWake.Wake()
	return true
}

// PushRxNoWake is PushRx for a batch: the caller wakes the writer once.
func (s *Shared) PushRxNoWake(f *Frame) bool { return s.push(s.Rx, &s.rxQueued, f, DropRxFull) }

// PopRx takes the oldest frame for the guest.
func (s *Shared) PopRx() (*Frame, bool) { return pop(s.Rx, &s.rxQueued) }

// Queued returns the buffer bytes the tx and rx rings hold now.
func (s *Shared) Queued() (tx, rx int64) { return s.txQueued.Load(), s.rxQueued.Load() }

// SetTxHandler sets what handles a guest frame (nil: none; the frames
// then wait in Tx). It is called by the stack, once its poll loop runs.
func (s *Shared) SetTxHandler(h func(*Frame)) {
	if h == nil {
		s.txHandler.Store(nil)
		return
	}
	s.txHandler.Store(&h)
}

// AcquireTx takes the right to handle guest frames, if nobody holds it,
// and returns the handler. The holder must drain Tx before ReleaseTx.
func (s *Shared) AcquireTx() (func(*Frame), bool) {
	h := s.txHandler.Load()
	if h == nil || !s.txOwner.CompareAndSwap(false, true) {
		return nil, false
	}
	if h = s.txHandler.Load(); h == nil { // taken away meanwhile
		s.txOwner.Store(false)
		return nil, false
	}
	return *h, true
}

// LockTx takes the right to handle guest frames for good, waiting for the
// holder to let go: the stack, closing, makes sure nobody handles frames
// once it is gone.
func (s *Shared) LockTx() {
	s.txHandler.Store(nil)
	for !s.txOwner.CompareAndSwap(false, true) {
		time.Sleep(time.Millisecond)
	}
}

// ReleaseTx lets go of the right to handle guest frames; it reports
// whether frames arrived in Tx meanwhile, which the caller must then see
// handled (by waking the poll loop).
func (s *Shared) ReleaseTx() (pending bool) {
	s.txOwner.Store(false)
	return s.txQueued.Load() > 0
}
