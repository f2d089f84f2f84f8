package rings

import (
	"sync"

	"github.com/msbtap/msbtap/wake"
)

// Shared is the state shared by the TAP reader and writer, the stack's poll
// loop and the proxy goroutines, shaped like the seed engine's SharedState.
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

	hookMu sync.Mutex
	hook   func()
}

// NewShared returns shared state with rings of the given capacity (0 means
// DefaultCapacity) and frame buffers of frameSize bytes.
func NewShared(capacity, frameSize int) *Shared {
	if capacity <= 0 {
		capacity = DefaultCapacity
	}
	return &Shared{
		Tx:     NewRing[*Frame](capacity),
		Rx:     NewRing[*Frame](capacity),
		TxWake: wake.New(),
		RxWake: wake.New(),
		Frames: NewPool(frameSize),
	}
}

// PushTx queues a frame from the guest for the stack. A full ring drops the
// frame (returned to the pool) and counts it, like a lossy NIC. It does not
// wake the stack: callers batch pushes and wake once.
func (s *Shared) PushTx(f *Frame) bool {
	if s.Tx.Push(f) {
		return true
	}
	s.Counters.Drop(DropTxFull)
	s.Frames.Put(f)
	return false
}

// PushRx queues a frame for the guest and wakes the writer. A full ring drops
// the frame and counts it.
func (s *Shared) PushRx(f *Frame) bool {
	if !s.Rx.Push(f) {
		s.Counters.Drop(DropRxFull)
		s.Frames.Put(f)
		return false
	}
	s.RxWake.Wake()
	return true
}

// SetTerminationHook installs the function run when a fatal policy violation
// asks for the sandbox to be stopped. It replaces any earlier hook.
func (s *Shared) SetTerminationHook(hook func()) {
	s.hookMu.Lock()
	s.hook = hook
	s.hookMu.Unlock()
}

// TriggerTermination runs the termination hook, if one is installed, and
// reports whether there was one.
func (s *Shared) TriggerTermination() bool {
	s.hookMu.Lock()
	hook := s.hook
	s.hookMu.Unlock()
	if hook == nil {
		return false
	}
	hook()
	return true
}
