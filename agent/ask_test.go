package agent

import (
	"testing"

	"github.com/msbtap/msbtap/policy"
)

// TestWithAlwaysRule: an always rule goes just before the first ask rule
// (the rules before it did not match the flow), at the end under a default
// ask; the policy it came from is left as it was.
func TestWithAlwaysRule(t *testing.T) {
	r := policy.FileRule{Destination: &policy.Target{Domain: "x.example"}, Action: "allow"}
	f := &policy.File{DefaultAction: "deny", Rules: []policy.FileRule{
		{Destination: &policy.Target{Group: "metadata"}, Action: "terminate"},
		{Destination: &policy.Target{DomainSuffix: "example"}, Action: "ask"},
		{Destination: &policy.Target{Any: true}, Action: "deny"},
	}}
	g := withAlwaysRule(f, r)
	if len(g.Rules) != 4 || g.Rules[1].Destination.Domain != "x.example" || g.Rules[2].Action != "ask" || len(f.Rules) != 3 || f.Rules[1].Action != "ask" {
		t.Errorf("got %+v (from %+v)", g.Rules, f.Rules)
	}
	d := &policy.File{DefaultAction: "ask", Rules: f.Rules[:1]}
	if g := withAlwaysRule(d, r); len(g.Rules) != 2 || g.Rules[1].Destination.Domain != "x.example" {
		t.Errorf("default ask: got %+v", g.Rules)
	}
}
