package rings

import (
	"sync"
	"sync/atomic"

	"github.com/msbtap/msbtap/wake"
)

// DropReason says why a frame was dropped.
type DropReason int

// Drop reasons, counted separately.
const (
	DropTxFull    DropReason = iota // tx ring full: guest → stack frame lost
	DropRxFull                      // rx ring full: stack → guest frame lost
	DropOversized                   // frame larger than the MTU allows
	DropMalformed                   // frame the stack cannot parse
	DropPolicy                      // frame of a flow the policy denied
	DropOther                       // anything else (unsupported protocol, no route)
	numDropReasons
)

var dropNames = [numDropReasons]string{"tx_full", "rx_full", "oversized", "malformed", "policy", "other"}

// String returns the reason's name as used in logs and metrics.
func (r DropReason) String() string {
	if r < 0 || r >= numDropReasons {
		return "unknown"
	}
	return dropNames[r]
}

// DropReasons lists every drop reason, in order.
func DropReasons() []DropReason {
	rs := make([]DropReason, numDropReasons)
	for i := range rs {
		rs[i] = DropReason(i)
	}
	return rs
}

// Counters are the byte, frame and drop counters at the boundary between the
// guest and the agent. Directions follow the guest's point of view: tx is what
// the guest sent, rx what it received.
type Counters struct {
	txBytes, rxBytes   atomic.Uint64
	txFrames, rxFrames atomic.Uint64
	drops              [numDropReasons]atomic.Uint64
}

// AddTx counts one frame of n bytes sent by the guest.
func (c *Counters) AddTx(n int) { c.txBytes.Add(uint64(n)); c.txFrames.Add(1) }

// AddRx counts one frame of n bytes delivered to the guest.
func (c *Counters) AddRx(n int) { c.rxBytes.Add(uint64(n)); c.rxFrames.Add(1) }

// Drop counts one dropped frame.
func (c *Counters) Drop(r DropReason) { c.drops[r].Add(1) }

// TxBytes returns the bytes the guest sent into the agent.
func (c *Counters) TxBytes() uint64 { return c.txBytes.Load() }

// RxBytes returns the bytes the agent delivered to the guest.
func (c *Counters) RxBytes() uint64 { return c.rxBytes.Load() }

// TxFrames returns the frames the guest sent into the agent.
func (c *Counters) TxFrames() uint64 { return c.txFrames.Load() }

// RxFrames returns the frames the agent delivered to the guest.
func (c *Counters) RxFrames() uint64 { return c.rxFrames.Load() }

// Drops returns the number of frames dropped for reason r.
func (c *Counters) Drops(r DropReason) uint64 { return c.drops[r].Load() }

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
