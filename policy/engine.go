package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
)

// Engine is a compiled, immutable policy. Check is safe for concurrent use
// and does not allocate.
type Engine struct {
	def        Action
	rules      []rule
	host       *HostSet
	pins       *Pins
	fatal      bool // every deny terminates (--on-violation terminate)
	allows     bool // some egress rule (or the default) allows something
	resolveAll bool // under default deny, names no rule lists resolve too
	named      bool // some egress rule matches by name
	// deniesNames: some egress domain rule denies (or terminates), so a
	// flow the addresses allow is still refused if its SNI or Host names
	// such a domain. namePorts are the TCP ports such flows are read on
	// besides 80 and 443: every port a domain rule names.
	deniesNames bool
	namePorts   []PortRange
	refuseQUIC  bool // UDP to 443 is refused whatever allows it
	learn       *Learner
	answers     Answers
	asks        bool    // some egress rule (or the default) asks
	denies      *Engine // the deny and terminate rules alone, for asks
	denyIdx     []int   // denies' rule i is rules[denyIdx[i]]
	src         *File
}

// Options are what an Engine needs besides the policy itself.
type Options struct {
	// Host is the set of addresses that mean the host itself.
	Host *HostSet
	// Pins maps addresses to the names the sandbox resolved them from;
	// domain rules match through it. nil means domain rules never match
	// an address.
	Pins *Pins
	// DenyIsFatal turns every deny into terminate.
	DenyIsFatal bool
	// RefuseQUIC refuses UDP to port 443 even where an address rule
	// allows it (all TLS is to be intercepted, say). Flows allowed by
	// name are refused it in any case: QUIC hides the name.
	RefuseQUIC bool
	// Learn, if set, is learn mode: what only the default action would
	// refuse is allowed instead (never to metadata or the host), and every
	// flow, request and lookup allowed is recorded in it.
	Learn *Learner
	// Answers, if set, are the standing answers to asks (the ask
	// package's); without them an ask stays an ask (a deny where no one
	// can ask).
	Answers Answers
}

// Compile builds an Engine from a parsed policy file.
func Compile(f *File, o Options) (*Engine, error) {
	def, err := ParseAction(f.DefaultAction)
	if err != nil {
		return nil, fmt.Errorf("default_action: %v", err)
	}
	e := &Engine{def: def, host: o.Host, pins: o.Pins, fatal: o.DenyIsFatal, refuseQUIC: o.RefuseQUIC, learn: o.Learn, answers: o.Answers, src: f}
	e.allows = def == Allow || def == Ask || o.Learn != nil
	e.asks = def == Ask
	switch f.Resolve {
	case "", ResolveListed:
	case ResolveAll:
		e.resolveAll = true
	default:
		return nil, fmt.Errorf("resolve: %q: want %s or %s", f.Resolve, ResolveListed, ResolveAll)
	}
	for i, fr := range f.Rules {
		r, err := compileRule(fr)
		if err != nil {
			return nil, fmt.Errorf("rules[%d].%v", i, err)
		}
		if r.dir == Egress && (r.action == Allow || r.action == Ask) {
			e.allows = true
			e.asks = e.asks || r.action == Ask
		}
		e.rules = append(e.rules, r)
		if r.dir == Egress && r.dst.byName() {
			e.named = true
			if r.action != Allow {
				e.deniesNames = true
			}
			e.namePorts = append(e.namePorts, r.ports...)
		}
	}
	if e.asks {
		if err := e.compileDenies(f, o); err != nil {
			return nil, err
		}
	}
	return e, nil
}

// Values of a policy's "resolve" setting.
const (
	// ResolveListed (the default): under default deny, only names that an
	// allowing domain or domain_suffix rule matches resolve, so DNS is no
	// channel out of a sandbox that has none.
	ResolveListed = "listed"
	// ResolveAll: under default deny, every name no rule denies resolves.
	ResolveAll = "all"
)

// AllowsAnything reports whether the policy allows any egress flow at all
// (the default or some rule). The gateway answers its own echo requests
// under every policy that does.
func (e *Engine) AllowsAnything() bool { return e.allows }

func (e *Engine) decision(a Action, rule int) Decision {
	if e.fatal && a == Deny {
		a = Terminate
	}
	return Decision{Action: a, Rule: rule}
}

// Check decides a flow: the first rule that matches wins; no match gives
// the default action for egress and allows ingress.
func (e *Engine) Check(f Flow) Decision {
	d := e.check(f, netip.Addr{})
	if e.asks {
		d = e.askable(f, d, netip.Addr{})
	}
	if e.learn != nil {
		return e.learnFlow(f, d, false)
	}
	return e.sideDoors(f, d)
}

// CheckAsHost decides a flow as if its destination were one of the host's
// own addresses (the kernel says it is local, though the host group did not
// know it yet).
func (e *Engine) CheckAsHost(f Flow) Decision {
	d := e.check(f, f.Dst.Addr().Unmap())
	if e.asks {
		d = e.askable(f, d, f.Dst.Addr().Unmap())
	}
	if e.learn != nil {
		return e.learnFlow(f, d, true)
	}
	return e.sideDoors(f, d)
}

// Ports of the protocols that would carry names past the checks: QUIC
// (TLS inside UDP) and DNS over TLS.
const (
	portQUIC = 443
	portDoT  = 853
)

// sideDoors refuses, among allowed egress flows, those that would take a
// name out of sight: QUIC where the name is checked (the client falls
// back to TCP at once on the port unreachable it gets), and DNS over TLS
// while domain rules depend on the sandbox's lookups going through the
// agent. These refusals are never fatal: clients try them as a matter of
// course.
func (e *Engine) sideDoors(f Flow, d Decision) Decision {
	if d.Action != Allow || f.Direction != Egress {
		return d
	}
	switch {
	case f.Proto == UDP && f.Dst.Port() == portQUIC && (d.ByName || e.refuseQUIC):
		return Decision{Action: Deny, Rule: RuleQUIC}
	case f.Proto == TCP && f.Dst.Port() == portDoT && e.named:
		return Decision{Action: Deny, Rule: RuleDoT}
	}
	return d
}

// Refusals of destinations that only a rule naming them may reach (or,
// for broadcasts and multicast, none): the rule numbers a decision reports
// when the default action or a broader rule would have allowed them.
const (
	RuleMetadata   = -21 // cloud metadata: only a rule naming the metadata group reaches it
	RuleHost       = -22 // the host: only a rule naming the host group reaches it
	RuleLocalNAT64 = -23 // local-use NAT64 64:ff9b:1::/48: only a CIDR rule within it reaches it
	RuleBroadcast  = -24 // broadcast and multicast never leave
)

// guard is what an allowing rule must name to reach a destination that no
// broad rule (any, a CIDR around it, another group, a name, the default)
// may open: cloud metadata, the host, or an address in the local-use NAT64
// prefix. Deny and terminate rules match such destinations as written.
type guard uint8

const (
	guardNone guard = iota
	guardMetadata
	guardHost
	guardLocalNAT64
)

// guardOf returns what must be named to allow egress to dst. An address
// that is both metadata and the host's (a metadata proxy on the host)
// needs the metadata group.
func (e *Engine) guardOf(dst, extraHost netip.Addr) guard {
	switch {
	case InGroup(dst, GroupMetadata, e.host):
		return guardMetadata
	case dst == extraHost || InGroup(dst, GroupHost, e.host):
		return guardHost
	case localNAT64.Contains(dst):
		return guardLocalNAT64
	}
	return guardNone
}

// namedBy reports whether target t names what g guards.
func (g guard) namedBy(t *target) bool {
	switch g {
	case guardMetadata:
		return t.kind == matchGroup && t.group == GroupMetadata
	case guardHost:
		return t.kind == matchGroup && t.group == GroupHost
	case guardLocalNAT64:
		return t.kind == matchCIDR && t.prefix.Bits() >= localNAT64.Bits() && localNAT64.Contains(t.prefix.Addr())
	}
	return true
}

// refusal is the decision for a guarded destination that nothing named.
func (g guard) refusal() int {
	switch g {
	case guardMetadata:
		return RuleMetadata
	case guardHost:
		return RuleHost
	}
	return RuleLocalNAT64
}

func (e *Engine) check(f Flow, extraHost netip.Addr) Decision {
	dst, src := f.Dst.Addr().Unmap(), f.Src.Addr().Unmap()
	g := guardNone
	if f.Direction == Egress {
		if InGroup(dst, GroupMulticast, e.host) {
			// Never fatal: service discovery tries it as a matter of course.
			return Decision{Action: Deny, Rule: RuleBroadcast}
		}
		g = e.guardOf(dst, extraHost)
	}
	var names []string
	namesLooked := false
	for i := range e.rules {
		r := &e.rules[i]
		if r.dir != f.Direction {
			continue
		}
		if r.protos != 0 && r.protos&(1<<f.Proto) == 0 {
			continue
		}
		if len(r.ports) > 0 {
			if f.Proto == ICMP || f.Proto == ICMPv6 || !inRanges(r.ports, f.Dst.Port()) {
				continue
			}
		}
		t, a := &r.dst, dst
		if r.dir == Ingress {
			if r.dst.kind != matchAny && !e.addrMatches(&r.dst, dst) {
				continue
			}
			t, a = &r.src, src
		}
		// A rule that would let the flow start must name a guarded
		// destination; a name never does.
		opens := r.action == Allow || r.action == Ask || r.http != nil
		switch t.kind {
		case matchDomain, matchSuffix, matchPreset:
			if opens && g != guardNone {
				continue
			}
			if f.Domain != "" {
				if nameMatches(t, f.Domain) {
					return e.byName(r, i)
				}
				continue
			}
			if !namesLooked {
				names, namesLooked = e.pins.Lookup(a), true
			}
			for _, n := range names {
				if nameMatches(t, n) {
					return e.byName(r, i)
				}
			}
		default:
			if e.addrMatches(t, a) || (extraHost.IsValid() && t.kind == matchGroup && t.group == GroupHost && a == extraHost) {
				if (r.action == Allow || r.action == Ask) && !g.namedBy(t) {
					continue
				}
				return e.decision(r.action, i)
			}
		}
	}
	if f.Direction == Ingress {
		// A published port accepts every client that can reach its bind
		// address unless an ingress rule narrows that; default_action
		// governs egress.
		return Decision{Action: Allow, Rule: -1}
	}
	if (e.def == Allow || e.def == Ask) && g != guardNone {
		return e.decision(Deny, g.refusal())
	}
	return e.decision(e.def, -1)
}

// byName is the decision of rule i, which matched by name. A rule with
// HTTP conditions lets the flow start whatever its action: its requests
// are decided one by one.
func (e *Engine) byName(r *rule, i int) Decision {
	if r.http != nil {
		return Decision{Action: Allow, Rule: i, ByName: true, PerRequest: true}
	}
	d := e.decision(r.action, i)
	d.ByName = true
	return d
}

// CheckRequest decides one HTTP request on a flow to f.Domain (the
// request's host): the first rule that matches the flow and, if it has
// HTTP conditions, the method and path, decides; none gives the default.
func (e *Engine) CheckRequest(f Flow, method, path string) Decision {
	d := e.checkRequest(f, method, path)
	if d.Action == Ask {
		// A request is never held: it stands on its flow's answer (or
		// an ask rule that matched its host), else it is refused.
		d = e.askable(f, d, netip.Addr{})
		if d.Action == Ask {
			d.Action = Deny
		}
	}
	if e.learn != nil {
		return e.learnRequest(f, d)
	}
	return d
}

func (e *Engine) checkRequest(f Flow, method, path string) Decision {
	for i := range e.rules {
		r := &e.rules[i]
		if r.dir != Egress || (r.protos != 0 && r.protos&(1<<TCP) == 0) || (len(r.ports) > 0 && !inRanges(r.ports, f.Dst.Port())) {
			continue
		}
		switch r.dst.kind {
		case matchDomain, matchSuffix, matchPreset:
			if !nameMatches(&r.dst, f.Domain) {
				continue
			}
		default:
			if !e.addrMatches(&r.dst, f.Dst.Addr().Unmap()) {
				continue
			}
		}
		if r.http != nil && !requestMatches(r.http, method, path) {
			continue
		}
		return e.decision(r.action, i)
	}
	return e.decision(e.def, -1)
}

// requestMatches reports whether method and path satisfy h.
func requestMatches(h *HTTPRule, method, path string) bool {
	if len(h.Methods) > 0 && !slices.Contains(h.Methods, method) {
		return false
	}
	if len(h.Paths) == 0 {
		return true
	}
	for _, p := range h.Paths {
		if pathMatches(p, path) {
			return true
		}
	}
	return false
}

// pathMatches matches a path against a prefix, or a glob whose '*' matches
// any run of characters.
func pathMatches(pattern, path string) bool {
	if !strings.Contains(pattern, "*") {
		return strings.HasPrefix(path, pattern)
	}
	parts := strings.Split(pattern, "*")
	if !strings.HasPrefix(path, parts[0]) {
		return false
	}
	path = path[len(parts[0]):]
	for _, mid := range parts[1 : len(parts)-1] {
		i := strings.Index(path, mid)
		if i < 0 {
			return false
		}
		path = path[i+len(mid):]
	}
	return strings.HasSuffix(path, parts[len(parts)-1])
}

// HasHTTPRules reports whether some rule decides requests, so that some
// connections need intercepting.
func (e *Engine) HasHTTPRules() bool {
	for i := range e.rules {
		if e.rules[i].http != nil {
			return true
		}
	}
	return false
}

// ReadsNames reports whether a TCP flow to f's port, whatever decided
// it, must have the name it asks for (SNI, Host) checked: the policy has
// domain rules that deny, and the port is 80, 443 or one a domain rule
// names. Without such rules it is false, and costs flows nothing.
func (e *Engine) ReadsNames(f Flow) bool {
	if !e.deniesNames || f.Proto != TCP || f.Direction != Egress {
		return false
	}
	p := f.Dst.Port()
	return p == 80 || p == 443 || inRanges(e.namePorts, p)
}

// HasDomainRules reports whether some egress rule matches by name.
func (e *Engine) HasDomainRules() bool { return e.named }

// CheckQuery decides whether the sandbox may resolve name. The first rule
// that matches the name decides, unless it is a deny limited to some
// protocols or ports (the name may still be used for others). With no such
// rule, the name resolves when the default allows, or when the policy says
// resolve "all"; under default deny it is refused otherwise, so that DNS
// carries nothing out of a sandbox the policy keeps in.
func (e *Engine) CheckQuery(name string) Decision {
	name, err := NormalizeQuery(name)
	if err != nil {
		return Decision{Action: Deny, Rule: RuleBadName}
	}
	d := e.checkQuery(name)
	if d.Action == Ask {
		if d.Rule >= 0 {
			// An ask rule lists the name: it resolves, and what connects
			// to it is asked.
			d.Action = Allow
		} else if e.answers != nil {
			if act, ok := e.answers.Answer(name, netip.Addr{}); ok {
				d = e.decision(act, RuleAnswered)
			}
		}
	}
	if e.learn != nil {
		return e.learnQuery(name, d)
	}
	return d
}

func (e *Engine) checkQuery(name string) Decision {
	for i := range e.rules {
		r := &e.rules[i]
		if r.dir != Egress || !r.dst.byName() || !nameMatches(&r.dst, name) {
			continue
		}
		if r.action != Allow && r.action != Ask && (r.protos != 0 || len(r.ports) > 0) && (r.protos&(1<<DNS) == 0 || len(r.ports) > 0) {
			continue // a deny of some connections only; a dns deny refuses the name
		}
		return e.decision(r.action, i)
	}
	if e.def == Allow {
		return Decision{Action: Allow, Rule: RuleDefault}
	}
	if e.resolveAll {
		return Decision{Action: Allow, Rule: RuleResolveAll}
	}
	return e.decision(e.def, RuleDefault)
}

func (e *Engine) addrMatches(t *target, a netip.Addr) bool {
	switch t.kind {
	case matchAny:
		return true
	case matchCIDR:
		if t.prefix.Contains(a) {
			return true
		}
		v4, ok := Embedded(a) // the IPv4 host a NAT64 or 6to4 address reaches
		return ok && t.prefix.Contains(v4)
	case matchGroup:
		return InGroup(a, t.group, e.host)
	}
	return false
}

// nameMatches matches a name in DNS presentation format label by label: a
// suffix matches only at a label boundary, and a dot escaped inside a label
// ("evil\.example.com" is one label "evil.example" then "com") is no
// boundary.
func nameMatches(t *target, name string) bool {
	if t.kind == matchPreset {
		return t.preset.Matches(name)
	}
	if n := len(name); n > 0 && name[n-1] == '.' && !escaped(name, n-1) {
		name = name[:n-1]
	}
	if t.kind == matchDomain || len(name) == len(t.name) {
		return strings.EqualFold(name, t.name)
	}
	i := len(name) - len(t.name) - 1 // the dot before the suffix
	return i > 0 && name[i] == '.' && !escaped(name, i) && strings.EqualFold(name[i+1:], t.name)
}

// escaped reports whether name[i] is escaped by an odd run of backslashes.
func escaped(name string, i int) bool {
	n := 0
	for j := i - 1; j >= 0 && name[j] == '\\'; j-- {
		n++
	}
	return n%2 == 1
}

func inRanges(rs []PortRange, p uint16) bool {
	for _, r := range rs {
		if p >= r.Start && p <= r.End {
			return true
		}
	}
	return false
}

// Describe returns a one-line description of rule i (or of the default
// action for -1), for logs and `msbtap policy explain`.
func (e *Engine) Describe(i int) string {
	if i == RuleResolveAll {
		return `resolve "all": names no rule lists resolve`
	}
	if i == RuleGatewayEcho {
		return "the gateway answers its own echo requests"
	}
	if i == RuleQUIC {
		return "QUIC (UDP 443) refused: the server name must be checked over TCP"
	}
	if i == RuleSecret {
		return "a secret's placeholder where the secret may not go"
	}
	if i == RuleNotAsked {
		return "never asked: cloud metadata and the host are refused"
	}
	if i == RuleAnswered {
		return "an ask's standing answer"
	}
	if i == RuleLearned {
		return "learned (--learn): what default_action " + e.src.DefaultAction + " refuses is allowed and recorded"
	}
	if i == RuleBadName {
		return "a name no host has (control bytes, empty or non-LDH labels)"
	}
	if i == RuleDoT {
		return "DNS over TLS (853) refused: domain rules need the sandbox's lookups"
	}
	switch i {
	case RuleMetadata:
		return `cloud metadata: only a rule to {"group": "metadata"} allows it`
	case RuleHost:
		return `the host: only a rule to {"group": "host"} allows it`
	case RuleLocalNAT64:
		return "local-use NAT64 (64:ff9b:1::/48): only a CIDR rule within it allows it"
	case RuleBroadcast:
		return "broadcast and multicast never leave the sandbox"
	}
	if i < 0 || i >= len(e.src.Rules) {
		return "default_action " + e.src.DefaultAction
	}
	r := e.src.Rules[i]
	var b strings.Builder
	fmt.Fprintf(&b, "rules[%d]: %s", i, r.Action)
	dir := r.Direction
	if dir == "" {
		dir = "egress"
	}
	b.WriteString(" " + dir)
	if len(r.Protocols) > 0 {
		b.WriteString(" " + strings.Join(r.Protocols, ","))
	}
	if r.Source != nil {
		b.WriteString(" from " + describeTarget(r.Source))
	}
	if r.Destination != nil {
		b.WriteString(" to " + describeTarget(r.Destination))
	}
	for j, p := range r.Ports {
		if j == 0 {
			b.WriteString(" ports ")
		} else {
			b.WriteString(",")
		}
		if p.End == 0 || p.End == p.Start {
			fmt.Fprintf(&b, "%d", p.Start)
		} else {
			fmt.Fprintf(&b, "%d-%d", p.Start, p.End)
		}
	}
	if r.HTTP != nil {
		b.WriteString(" http")
		if len(r.HTTP.Methods) > 0 {
			b.WriteString(" " + strings.Join(r.HTTP.Methods, ","))
		}
		if len(r.HTTP.Paths) > 0 {
			b.WriteString(" " + strings.Join(r.HTTP.Paths, ","))
		}
	}
	return b.String()
}

func describeTarget(t *Target) string {
	switch {
	case t.Any:
		return "any"
	case t.CIDR != "":
		return "cidr " + t.CIDR
	case t.Domain != "":
		return "domain " + t.Domain
	case t.DomainSuffix != "":
		return "domain_suffix " + t.DomainSuffix
	case t.Preset != "":
		return "preset " + t.Preset
	}
	return "group " + t.Group
}

// Holder holds the engine in force; a reload swaps it with one store, and
// readers never lock. It implements Checker.
type Holder struct {
	p atomic.Pointer[Engine]
}

// NewHolder returns a Holder with e in force.
func NewHolder(e *Engine) *Holder {
	h := &Holder{}
	h.p.Store(e)
	return h
}

// Load returns the engine in force.
func (h *Holder) Load() *Engine { return h.p.Load() }

// Store puts e in force for flows that start from now on.
func (h *Holder) Store(e *Engine) { h.p.Store(e) }

// Check implements Checker with the engine in force.
func (h *Holder) Check(f Flow) Decision { return h.p.Load().Check(f) }

// CheckAsHost is Engine.CheckAsHost with the engine in force.
func (h *Holder) CheckAsHost(f Flow) Decision { return h.p.Load().CheckAsHost(f) }

// AllowsAnything is Engine.AllowsAnything with the engine in force.
func (h *Holder) AllowsAnything() bool { return h.p.Load().AllowsAnything() }
