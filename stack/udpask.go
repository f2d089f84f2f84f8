package stack

import (
	"context"
	"sync"
	"sync/atomic"

	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/policy"
)

// maxHeldUDP bounds the UDP flows held for an answer at once; past it a
// new one is refused as a deny is.
const maxHeldUDP = 64

// heldUDP are the UDP flows an ask holds: each keeps its first datagram
// until the answer; the guest's further datagrams of the flow meanwhile
// are dropped (a client retries).
type heldUDP struct {
	mu sync.Mutex // mu protects m
	m  map[synKey]struct{}
	// dropped counts the datagrams of held flows dropped while they wait.
	dropped atomic.Uint64
}

// holdUDP implements proxy.UDPOptions.Hold: a datagram whose new session
// the policy asks about is kept while the question is open; once allowed
// (and still allowed by the policy in force: the answer stands for it),
// its session opens and the datagram goes.
func (st *Stack) holdUDP(fl *flow.Flow, payload []byte) bool {
	if st.o.Ask == nil || fl.Decision.Action != policy.Ask {
		return false
	}
	k := synKey{fl.Src, fl.Dst}
	h := &st.heldUDP
	h.mu.Lock()
	if _, ok := h.m[k]; ok {
		h.mu.Unlock()
		h.dropped.Add(1)
		return true // the flow's first datagram is held already
	}
	if len(h.m) >= maxHeldUDP {
		h.mu.Unlock()
		return false
	}
	if h.m == nil {
		h.m = map[synKey]struct{}{}
	}
	h.m[k] = struct{}{}
	h.mu.Unlock()
	first := append([]byte(nil), payload...)
	go func() {
		defer func() { h.mu.Lock(); delete(h.m, k); h.mu.Unlock() }()
		fl.Decision = st.o.Ask(context.Background(), fl.Flow, fl.Decision)
		st.report(fl)
		if !fl.Allowed() || st.cut.Load() {
			return
		}
		// The answer stands for the flow: the policy in force decides it
		// now as it would its next datagram (QUIC, say, stays refused).
		if fl.Decision = st.o.Policy.Check(fl.Flow); !fl.Allowed() || !st.dialAllowed(fl) {
			return
		}
		if err := st.udp.Resume(fl, first); err != nil {
			st.o.Log.Debug("a held UDP flow could not start", "src", fl.Src, "dst", fl.Dst, "err", err)
		}
	}()
	return true
}
