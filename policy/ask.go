package policy

import (
	"net/netip"
)

// Decision rule numbers of ask.
const (
	// RuleNotAsked: an ask would have held the flow, but cloud metadata
	// and the host itself are never asked for.
	RuleNotAsked = -12
	// RuleAnswered: an ask that was answered (through the control socket,
	// --ask-exec or the timeout) decided, while the answer stands.
	RuleAnswered = -13
)

// Answers are the standing answers to asks: after a question about a
// destination (a name, or an address without one) was answered, the
// answer holds for a while for further flows, lookups and requests to it
// (a client's retries, the connection after a lookup, the TLS server name
// and HTTP requests on it). Implemented by the ask package.
type Answers interface {
	// Answer returns the standing answer for name (if not "") or addr.
	Answer(name string, addr netip.Addr) (Action, bool)
}

// askable turns an ask into what it must be where no question is put:
// cloud metadata and the host are never asked for (denied), a flow an
// explicit deny or terminate rule matches gets that rule, and a
// destination with a standing answer gets the answer. Otherwise d stays
// an ask, by name when the destination has one.
func (e *Engine) askable(f Flow, d Decision, extraHost netip.Addr) Decision {
	if d.Action != Ask {
		return d
	}
	a := f.Dst.Addr().Unmap()
	if InGroup(a, GroupMetadata, e.host) || InGroup(a, GroupHost, e.host) || (extraHost.IsValid() && a == extraHost) {
		return e.decision(Deny, RuleNotAsked)
	}
	if e.denies != nil {
		if dd := e.denies.check(f, extraHost); dd.Rule >= 0 {
			dd.Rule = e.denyIdx[dd.Rule]
			return dd
		}
	}
	// The answer that stands for the flow is the one a question about it
	// would get: about its name (AskName), else its address. Other names
	// of a shared address have answers of their own, which the TLS name
	// or HTTP Host then meets.
	name := e.AskName(f)
	if e.answers != nil {
		if act, ok := e.answers.Answer(name, a); ok {
			if name != "" {
				return e.decision(act, RuleAnswered).named()
			}
			return e.decision(act, RuleAnswered)
		}
	}
	d.ByName = d.ByName || name != ""
	return d
}

func (d Decision) named() Decision { d.ByName = true; return d }

// compileDenies builds the engine of f's deny and terminate rules alone
// (default allow), which askable consults: no ask overrides an explicit
// deny, wherever it stands in the policy.
func (e *Engine) compileDenies(f *File, o Options) error {
	df := &File{DefaultAction: "allow"}
	var idx []int
	for i, r := range f.Rules {
		if r.Action == "deny" || r.Action == "terminate" {
			df.Rules = append(df.Rules, r)
			idx = append(idx, i)
		}
	}
	if len(df.Rules) == 0 {
		return nil
	}
	o.Learn, o.Answers = nil, nil
	de, err := Compile(df, o)
	if err != nil {
		return err
	}
	e.denies, e.denyIdx = de, idx
	return nil
}

// AsksAnything reports whether some rule or the default asks.
func (e *Engine) AsksAnything() bool { return e.asks }

// AskName is the name a question about flow f is about: the name it
// asked for (SNI, Host), else the name its address was resolved from
// most recently (the one the client has just looked up, as a rule), else
// "" (the address is asked about).
func (e *Engine) AskName(f Flow) string {
	if f.Domain != "" {
		return f.Domain
	}
	if names := e.pins.Lookup(f.Dst.Addr()); len(names) > 0 {
		return names[0]
	}
	return ""
}
