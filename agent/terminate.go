package agent

import (
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/policy"
)

// Terminated is the error Run returns after a fatal violation stopped the
// sandbox; msbtap exits with status 3.
type Terminated struct {
	Proto, Src, Dst, Domain, Rule string
	// Secret names the secret whose placeholder went where it may not.
	Secret string
}

func (t *Terminated) Error() string {
	return fmt.Sprintf("sandbox terminated: %s flow %s -> %s violated %s", t.Proto, t.Src, t.Dst, t.Rule)
}

// violation describes flow fl's fatal decision d; l7 is what was found
// inside it, if anything (its name stands for the flow's domain when the
// flow has none).
func violation(fl *flow.Flow, d policy.Decision, l7 flow.L7, e *policy.Engine) Terminated {
	f := fl.Flow
	if f.Domain == "" {
		f.Domain = l7.Name()
	}
	return Terminated{Proto: protoLabel(f), Src: flow.AddrText(f.Src), Dst: flow.AddrText(f.Dst), Domain: f.Domain,
		Rule: ruleLabel(d, e), Secret: l7.Secret}
}

// Halt is the part of a termination that falls to whoever runs the
// sandbox's processes (nil funcs: none).
type Halt struct {
	// Notify is called first, before the network is cut: a supervisor
	// must hear of the termination whatever happens next.
	Notify func()
	// Kill stops the sandbox's processes, once the network is cut.
	Kill func()
}

// terminator carries out a termination: once, on the first fatal
// violation, it cuts the network and stops the sandbox, and hands the
// violation to whoever waits on Agent.Terminated.
type terminator struct {
	cut  func()
	halt Halt

	once   sync.Once
	firing atomic.Bool // set before the sandbox is killed
	fired  chan Terminated
}

func newTerminator(cut func(), halt Halt) *terminator {
	return &terminator{cut: cut, halt: halt, fired: make(chan Terminated, 1)}
}

// terminate stops the sandbox for violation v, the first time it is called
// (later calls do nothing). It may run on the packet path: it tells the
// supervisor, cuts the network (nothing more gets out, every open flow is
// reset), stops the sandbox's processes, then hands v on.
func (t *terminator) terminate(v Terminated) {
	t.once.Do(func() {
		t.firing.Store(true)
		if t.halt.Notify != nil {
			t.halt.Notify()
		}
		t.cut()
		if t.halt.Kill != nil {
			t.halt.Kill()
		}
		t.fired <- v
	})
}

// terminate stops the sandbox for violation v (see terminator.terminate).
func (a *Agent) terminate(v Terminated) { a.term.terminate(v) }

// terminateFlow stops the sandbox for flow fl's fatal decision
// (stack.Options.Terminate).
func (a *Agent) terminateFlow(fl *flow.Flow) {
	a.terminate(violation(fl, fl.Decision, flow.L7{}, a.holder.Load()))
}

func protoLabel(f policy.Flow) string {
	if f.DNS {
		return "dns"
	}
	return f.Proto.String()
}

// ruleLabel names the deciding rule: its index and description.
func ruleLabel(d policy.Decision, e *policy.Engine) string {
	switch d.Rule {
	case policy.RuleBlockList:
		return "dns block list"
	case policy.RuleRebind:
		return "dns rebinding protection"
	}
	if e == nil {
		return strconv.Itoa(d.Rule)
	}
	return e.Describe(d.Rule)
}
