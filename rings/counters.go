package rings

import "sync/atomic"

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
	DropFragment                    // a fragment refused (overlap, tiny, over the reassembly bounds)
	numDropReasons
)

var dropNames = [numDropReasons]string{"tx_full", "rx_full", "oversized", "malformed", "policy", "other", "fragment"}

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
