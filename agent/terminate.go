package agent

import (
	"fmt"
	"log/slog"
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
// violation, it stops the sandbox and hands the violation to Run, which
// runs --on-terminate and returns a *Terminated.
type terminator struct {
	cut         func()
	halt        atomic.Pointer[Halt]
	onTerminate string
	runner      *hookRunner // runs --on-terminate; started before privileges drop
	log         *slog.Logger

	once   sync.Once
	firing atomic.Bool // set before the sandbox is killed
	fired  chan Terminated
}

func newTerminator(cut func(), onTerminate string, log *slog.Logger) *terminator {
	t := &terminator{cut: cut, onTerminate: onTerminate, log: log, fired: make(chan Terminated, 1)}
	t.halt.Store(&Halt{})
	return t
}

// terminate stops the sandbox for violation v, the first time it is called
// (later calls do nothing). It may run on the packet path: it tells the
// supervisor, cuts the network (nothing more gets out, every open flow is
// reset), stops the sandbox's processes, then wakes Run.
func (t *terminator) terminate(v Terminated) {
	t.once.Do(func() {
		t.firing.Store(true)
		h := t.halt.Load()
		if h.Notify != nil {
			h.Notify()
		}
		t.cut()
		if h.Kill != nil {
			h.Kill()
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

// finish logs the violation, runs --on-terminate, and returns it.
func (t *terminator) finish(v Terminated) error {
	t.log.Error("policy violation: sandbox terminated", "proto", v.Proto, "src", v.Src,
		"dst", v.Dst, "domain", v.Domain, "rule", v.Rule, "secret", v.Secret)
	if t.runner != nil {
		env := []string{
			"MSBTAP_VIOLATION_PROTO=" + v.Proto,
			"MSBTAP_VIOLATION_SRC=" + v.Src,
			"MSBTAP_VIOLATION_DST=" + v.Dst,
			"MSBTAP_VIOLATION_DOMAIN=" + safeName(v.Domain),
			"MSBTAP_VIOLATION_RULE=" + v.Rule,
		}
		if v.Secret != "" {
			env = append(env, "MSBTAP_VIOLATION_SECRET="+v.Secret) // a declared name: letters, digits, _
		}
		if err := t.runner.run(t.onTerminate, env); err != nil {
			t.log.Error("--on-terminate failed", "err", err)
		}
		t.runner = nil
	}
	return &v
}

// safeName keeps only letters, digits, '-' and '.' of a name that came from
// the guest's bytes, so that a shell running --on-terminate cannot be made
// to run any of it.
func safeName(s string) string {
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' {
			b = append(b, c)
		}
	}
	return string(b)
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
