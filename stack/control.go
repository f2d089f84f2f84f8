package stack

import (
	"net/netip"
	"sync"
	"time"

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
// those it no longer allows; it returns how many. A flow the policy would
// ask about stays: it is open, so it was allowed or answered already.
func (st *Stack) Revoke() int {
	return st.flows.revoke(func(f policy.Flow) bool {
		a := st.o.Policy.Check(f).Action
		return a == policy.Allow || a == policy.Ask
	})
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

// synAge is how often the table ages: an entry lives one to two ages,
// far longer than a SYN waits for the forwarder (a pending dial waits up
// to 3 s for a slot). A record that is gone only means the flow is decided
// again.
var synAge = 5 * time.Second

// synTable keeps the records in two generations: new ones go to cur, and
// each age (or when cur is full) cur becomes old and old is dropped, map
// and all. The ageing runs on a timer only while records are kept, so the
// records of SYNs nobody took leave on their own: after a flood of SYNs to
// random addresses, a table of 4096 dead records once stayed for good.
type synTable struct {
	mu       sync.Mutex // mu protects what follows
	cur, old map[synKey]synDecision
	ager     *time.Timer // pending while records are kept
	closed   bool
}

func (t *synTable) put(k synKey, d synDecision) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.cur) >= maxSyns/2 {
		t.old, t.cur = t.cur, nil
	}
	if t.cur == nil {
		t.cur = make(map[synKey]synDecision)
	}
	t.cur[k] = d
	if t.ager == nil && !t.closed {
		t.ager = time.AfterFunc(synAge, t.age)
	}
}

func (t *synTable) take(k synKey) (synDecision, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if d, ok := t.cur[k]; ok {
		delete(t.cur, k)
		return d, true
	}
	d, ok := t.old[k]
	delete(t.old, k)
	return d, ok
}

// age drops the old generation and makes the current one old.
func (t *synTable) age() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.ager = nil
	if t.closed {
		return
	}
	t.old, t.cur = t.cur, nil
	if len(t.old) == 0 {
		t.old = nil
		return
	}
	t.ager = time.AfterFunc(synAge, t.age)
}

// len returns how many records are kept.
func (t *synTable) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.cur) + len(t.old)
}

// close stops the ageing.
func (t *synTable) close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.closed = true
	if t.ager != nil {
		t.ager.Stop()
		t.ager = nil
	}
}
