package stack

import (
	"net/netip"
	"sync"

	"golang.org/x/time/rate"

	"github.com/msbtap/msbtap/policy"
)

// What the control socket does with the gateway while it runs.

// Flows lists the open flows (TCP and UDP, both directions); domain names
// a destination from the DNS pins.
func (st *Stack) Flows(domain func(netip.Addr) string) []FlowInfo { return st.flows.list(domain) }

// CloseFlow resets open flow id; it reports whether there was one.
func (st *Stack) CloseFlow(id uint64) bool { return st.flows.close(id) }

// Revoke re-decides every open flow with the policy in force and resets
// those it no longer allows; it returns how many.
func (st *Stack) Revoke() int {
	return st.flows.revoke(func(f policy.Flow) bool { return st.o.Policy.Check(f).Action == policy.Allow })
}

// SetRates changes the sandbox's rates: bytes a second each way, TCP
// connections opened a second (0: no limit).
func (st *Stack) SetRates(up, down, newConns float64) {
	st.up.Set(up)
	st.down.Set(down)
	if newConns <= 0 {
		st.newConns.Store(nil)
	} else {
		st.newConns.Store(rate.NewLimiter(rate.Limit(newConns), max(1, int(newConns))))
	}
}

// Rates returns the sandbox's rates (see SetRates).
func (st *Stack) Rates() (up, down, newConns float64) {
	if l := st.newConns.Load(); l != nil {
		newConns = float64(l.Limit())
	}
	return st.up.Rate(), st.down.Rate(), newConns
}

// newConnAllowed takes a token for one new TCP connection.
func (st *Stack) newConnAllowed() bool {
	l := st.newConns.Load()
	return l == nil || l.Allow()
}

// synKey is a new flow's (source, destination); synTable keeps its id and
// rule from the decision at its first packet to the relay that opens it.
type synKey struct{ src, dst netip.AddrPort }

type synDecision struct {
	id uint64
	d  policy.Decision
}

// maxSyns bounds the table: a SYN the forwarder dropped never collects its
// entry.
const maxSyns = 4096

type synTable struct {
	mu sync.Mutex // mu protects m
	m  map[synKey]synDecision
}

func (t *synTable) put(k synKey, d synDecision) {
	t.mu.Lock()
	if len(t.m) >= maxSyns {
		clear(t.m)
	}
	t.m[k] = d
	t.mu.Unlock()
}

func (t *synTable) take(k synKey) (synDecision, bool) {
	t.mu.Lock()
	d, ok := t.m[k]
	delete(t.m, k)
	t.mu.Unlock()
	return d, ok
}
