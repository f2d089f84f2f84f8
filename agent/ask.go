package agent

import (
	"context"
	"fmt"
	"net/netip"

	"github.com/msbtap/msbtap/ask"
	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/policy"
)

// buildAsk makes the asker that holds the flows ask rules decide (any
// policy may have them, a policy set later too).
func (a *Agent) buildAsk() {
	o := ask.Options{Timeout: a.cfg.AskTimeout, Always: a.askAlways, Report: a.askReport, Log: a.log.With("component", "ask")}
	o.Exec = a.cfg.AskHook
	a.asker = ask.New(o)
	a.popts.Answers = a.asker
}

// askFlow holds a TCP flow (its SYN unanswered, or its ClientHello) or
// a UDP flow (its first datagram kept) until its question is answered.
func (a *Agent) askFlow(ctx context.Context, f policy.Flow, d policy.Decision) policy.Decision {
	name := a.holder.Load().AskName(f)
	if a.asker.Ask(ctx, f.Proto.String(), name, f.Src, f.Dst) {
		return policy.Decision{Action: policy.Allow, Rule: policy.RuleAnswered, ByName: d.ByName}
	}
	return policy.Decision{Action: policy.Deny, Rule: policy.RuleAnswered}
}

// askDNS holds a query for a name asked about.
func (a *Agent) askDNS(src netip.AddrPort, name string) bool {
	return a.asker.Ask(context.Background(), "dns", name, src, netip.AddrPort{})
}

// askReport writes an answer to the decision log, with who gave it.
func (a *Agent) askReport(q ask.Question, ans ask.Answer) {
	f := policy.Flow{Proto: policy.TCP, Domain: q.Name}
	f.Src, _ = netip.ParseAddrPort(q.Src)
	f.Dst, _ = netip.ParseAddrPort(q.Dst)
	switch q.Proto {
	case "dns":
		f.Proto, f.DNS = policy.UDP, true
	case "udp":
		f.Proto = policy.UDP
	}
	d := policy.Decision{Action: policy.Deny, Rule: policy.RuleAnswered}
	verb := "deny"
	if ans.Allow {
		d.Action, verb = policy.Allow, "allow"
	}
	if ans.Always {
		verb += " always"
	}
	reason := fmt.Sprintf("ask %d answered %s by %s", q.ID, verb, ans.By)
	a.audit.Inspected(flow.Of(f, d), d, flow.L7{Reason: reason})
	a.log.Info("ask answered", "id", q.ID, "proto", q.Proto, "name", q.Name, "dst", q.Dst, "answer", verb, "by", ans.By, "waiting", q.Waiting)
}

// askAlways puts an "always" answer's rule in force (and, with
// --ask-save, in the policy file), just before the policy's first ask
// rule: the rules before it, which did not match the flow, keep coming
// first.
func (a *Agent) askAlways(q ask.Question, allow bool) error {
	r := ask.Rule(q, allow)
	a.ctl.mu.Lock()
	err := a.setPolicy(withAlwaysRule(a.policyFile.Load(), r), "ask always")
	a.ctl.mu.Unlock()
	if err != nil || !a.cfg.AskSave {
		return err
	}
	if a.cfg.PolicyPath == "" {
		a.log.Warn("--ask-save: the policy is a preset or inline; the rule is in force but saved nowhere")
		return nil
	}
	f, err := a.LoadPolicy(a.cfg.PolicyPath)
	if err != nil {
		return err
	}
	return a.writePolicyFile("policy", a.cfg.PolicyPath, withAlwaysRule(f, r))
}

// withAlwaysRule returns a copy of f with r before its first ask rule (at
// the end if none: the default asks).
func withAlwaysRule(f *policy.File, r policy.FileRule) *policy.File {
	g := *f
	i := len(f.Rules)
	for j, fr := range f.Rules {
		if fr.Action == "ask" {
			i = j
			break
		}
	}
	g.Rules = append(append(append(make([]policy.FileRule, 0, len(f.Rules)+1), f.Rules[:i]...), r), f.Rules[i:]...)
	return &g
}

// Pending and Decide serve the control socket.
func (c *controller) Pending() []ask.Question { return c.a.asker.Pending() }

func (c *controller) Decide(id uint64, ans ask.Answer) error { return c.a.asker.Decide(id, ans) }
