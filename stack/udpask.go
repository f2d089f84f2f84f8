package stack

import (
	"context"
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/msbtap/msbtap/policy"
)

// maxHeldUDP bounds the UDP flows held for an answer at once; past it a
// new one is refused as a deny is.
const maxHeldUDP = 64

// heldUDP are the UDP flows an ask holds: each keeps its first datagram
// until the answer; the guest's further datagrams of the flow meanwhile
// are dropped (a client retries).
type heldUDP struct {
	// candidate is the ask allowUDP just decided, for holdUDP, which the
	// UDP relay calls next on the same goroutine (the poll loop).
	candidate synDecision

	mu sync.Mutex // mu protects m
	m  map[synKey]struct{}
	// dropped counts the datagrams of held flows dropped while they wait.
	dropped atomic.Uint64
}

// holdUDP implements proxy.UDPOptions.Hold: a datagram whose new session
// the policy asks about is kept while the question is open; once allowed
// (and still allowed by the policy in force: the answer stands for it),
// its session opens and the datagram goes.
func (st *Stack) holdUDP(src, dst netip.AddrPort, payload []byte) bool {
	c := st.heldUDP.candidate
	st.heldUDP.candidate = synDecision{}
	if st.o.Ask == nil || c.d.Action != policy.Ask || c.id == 0 {
		return false
	}
	k := synKey{src, dst}
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
	f := policy.Flow{ID: c.id, Proto: policy.UDP, Src: src, Dst: dst}
	go func() {
		defer func() { h.mu.Lock(); delete(h.m, k); h.mu.Unlock() }()
		d := st.o.Ask(context.Background(), f, c.d)
		st.report(f, d)
		if d.Action != policy.Allow || st.cut.Load() {
			return
		}
		// The answer stands for the flow: the policy in force decides it
		// now as it would its next datagram (QUIC, say, stays refused).
		nd := st.o.Policy.Check(f)
		if nd.Action != policy.Allow || !st.dialAllowed(f) {
			return
		}
		st.syns.put(k, synDecision{f.ID, nd}) // for trackUDP
		if err := st.udp.Resume(f.ID, src, dst, first); err != nil {
			st.o.Log.Debug("a held UDP flow could not start", "src", src, "dst", dst, "err", err)
		}
	}()
	return true
}
