package stack

import (
	"net/netip"

	"golang.org/x/time/rate"

	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/policy"
)

// What the control socket does with the gateway while it runs.

// Flows lists the open flows (TCP and UDP, both directions); domain names
// a destination from the DNS pins.
func (st *Stack) Flows(domain func(netip.Addr) string) []flow.Info { return st.flows.List(domain) }

// CloseFlow resets open flow id; it reports whether there was one.
func (st *Stack) CloseFlow(id uint64) bool { return st.flows.Close(id) }

// Revoke re-decides every open flow with the policy in force and resets
// those it no longer allows; it returns how many. A flow the policy would
// ask about stays: it is open, so it was allowed or answered already.
func (st *Stack) Revoke() int {
	return st.flows.Revoke(func(fl *flow.Flow) bool {
		a := st.o.Policy.Check(fl.Flow).Action
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
