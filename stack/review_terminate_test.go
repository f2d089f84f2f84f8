package stack

import (
	"net/netip"
	"testing"
	"time"

	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/policy"
)

type terminateAll struct{}

func (terminateAll) Check(policy.Flow) policy.Decision {
	return policy.Decision{Action: policy.Terminate, Rule: 0}
}

// TestTerminateAlwaysCuts: a terminate decision cuts the network even
// when Options.Terminate did not (the agent's hook, called before it
// holds the gateway it would cut, or after it fired once).
func TestTerminateAlwaysCuts(t *testing.T) {
	fired := make(chan *flow.Flow, 4)
	st, sh, p := newTestStackWith(t, Options{Policy: terminateAll{}, Terminate: func(fl *flow.Flow) { fired <- fl }})
	send(sh, synFrame(p, netip.MustParseAddrPort("198.51.100.9:443")))
	select {
	case <-fired:
	case <-time.After(2 * time.Second):
		t.Fatal("no terminate")
	}
	waitCut := time.Now().Add(2 * time.Second)
	for !st.cut.Load() {
		if time.Now().After(waitCut) {
			t.Fatal("a terminate decision left the network uncut")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
