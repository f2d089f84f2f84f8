package policy

import (
	"cmp"
	"net/netip"
	"slices"
	"strings"
	"sync"
)

// RuleLearned is the rule of a decision that learn mode turned from a
// default deny into an allow (and recorded).
const RuleLearned = -11

// DefaultLearnMax bounds what a Learner keeps: destinations (a name or an
// address, with a protocol and port) and names looked up, each.
const DefaultLearnMax = 4096

// Learner records what a sandbox used, for a policy that allows exactly
// that: the names it connected to (from the DNS pins, TLS SNI and HTTP
// Host), on which protocols and ports; the addresses it reached without a
// name; and the names it only looked up. In learn mode (Options.Learn) the
// engine also allows what only its default action would refuse, and
// records it. It is safe for concurrent use and bounded: past
// DefaultLearnMax entries of a kind, further ones are counted and
// dropped.
type Learner struct {
	mu      sync.Mutex // mu protects the fields below
	uses    map[learnUse]struct{}
	queries map[string]struct{}
	// pending are flows decided by their pins alone, by flow id, until
	// the name the connection asks for (SNI, Host) says which of the
	// address's names it used.
	pending map[uint64]pendingUse
	max     int
	dropped int
}

// pendingUse is a flow recorded by its address's pinned names.
type pendingUse struct {
	proto Proto
	dst   netip.AddrPort
	names []string
}

// learnUse is one destination the sandbox used: a name, or an address
// when no name is known.
type learnUse struct {
	name  string
	addr  netip.Addr
	proto Proto
	port  uint16
}

// NewLearner returns an empty Learner.
func NewLearner() *Learner {
	return &Learner{uses: map[learnUse]struct{}{}, queries: map[string]struct{}{}, pending: map[uint64]pendingUse{}, max: DefaultLearnMax}
}

// Dropped is the number of uses and lookups not recorded for the bound.
func (l *Learner) Dropped() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.dropped
}

// Query records that the sandbox looked name up.
func (l *Learner) Query(name string) {
	name = canonical(name)
	if name == "" {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := l.queries[name]; ok {
		return
	}
	if len(l.queries) >= l.max {
		l.dropped++
		return
	}
	l.queries[name] = struct{}{}
}

// Use records a flow the sandbox made, to dst over proto, under names
// (those it asked for, by SNI or Host, or those its address was pinned
// to; none for a bare address). Of pinned names, the ones the sandbox
// looked up itself are kept when there are any (a CNAME's target was
// never asked for).
func (l *Learner) Use(proto Proto, dst netip.AddrPort, names []string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.useLocked(proto, dst, l.askedLocked(names))
}

// UseFlow records flow id (not 0) to dst, which its address's pinned
// names decided: if the connection then asks for one of those names
// (Named), that name alone is kept; otherwise (SSH, say) each name the
// sandbox looked up.
func (l *Learner) UseFlow(id uint64, proto Proto, dst netip.AddrPort, pinned []string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	names := l.askedLocked(pinned)
	if id == 0 || len(names) == 0 {
		l.useLocked(proto, dst, names)
		return
	}
	if len(l.pending) >= l.max {
		l.flushLocked()
	}
	l.pending[id] = pendingUse{proto: proto, dst: dst, names: slices.Clone(names)}
}

// Named records that flow id asked for name (its TLS SNI or HTTP Host).
// A name among those pinned to the address (or pinned nil: not known)
// stands for the flow's pinned names; another one is kept besides them,
// as the flow's address still needs them.
func (l *Learner) Named(id uint64, proto Proto, dst netip.AddrPort, name string, pinned []string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if p, ok := l.pending[id]; ok && (pinned == nil || slices.Contains(pinned, canonical(name))) {
		delete(l.pending, id)
	} else if ok && p.dst == dst {
		delete(l.pending, id)
		l.useLocked(p.proto, p.dst, p.names)
	}
	l.useLocked(proto, dst, []string{name})
}

// flushLocked records every pending flow by its pinned names.
func (l *Learner) flushLocked() {
	for id, p := range l.pending {
		l.useLocked(p.proto, p.dst, p.names)
		delete(l.pending, id)
	}
}

// askedLocked keeps, of several names pinned to one address, those the
// sandbox looked up itself, when there are any (a CNAME's target was
// never asked for).
func (l *Learner) askedLocked(names []string) []string {
	if len(names) <= 1 {
		return names
	}
	var asked []string
	for _, n := range names {
		if _, ok := l.queries[canonical(n)]; ok {
			asked = append(asked, n)
		}
	}
	if len(asked) > 0 {
		return asked
	}
	return names
}

func (l *Learner) useLocked(proto Proto, dst netip.AddrPort, names []string) {
	port := dst.Port()
	if proto == ICMP || proto == ICMPv6 {
		port = 0
	}
	add := func(u learnUse) {
		if _, ok := l.uses[u]; ok {
			return
		}
		if len(l.uses) >= l.max {
			l.dropped++
			return
		}
		l.uses[u] = struct{}{}
	}
	if len(names) == 0 {
		add(learnUse{addr: dst.Addr().Unmap(), proto: proto, port: port})
		return
	}
	for _, n := range names {
		if n = canonical(n); n != "" {
			add(learnUse{name: n, proto: proto, port: port})
		}
	}
}

// LearnOptions shape the policy a Learner writes.
type LearnOptions struct {
	// SuffixDepth, if 2 or more, writes a name of more labels as a
	// domain_suffix rule on its last SuffixDepth labels
	// (files.pythonhosted.org at 2: domain_suffix pythonhosted.org);
	// 0 writes every name as it was used.
	SuffixDepth int
}

// Policy returns a policy that allows what was recorded and nothing else:
// default deny, one rule per destination and protocol (with its ports),
// names as domain (or domain_suffix) rules, addresses with no name as
// cidr rules, and a dns rule for each name only looked up. Rules are
// sorted, names first.
func (l *Learner) Policy(o LearnOptions) *File {
	l.mu.Lock()
	l.flushLocked()
	uses := make([]learnUse, 0, len(l.uses))
	for u := range l.uses {
		uses = append(uses, u)
	}
	queries := make([]string, 0, len(l.queries))
	for q := range l.queries {
		queries = append(queries, q)
	}
	l.mu.Unlock()

	type dest struct {
		name   string // a domain, or a suffix when suffix is set
		suffix bool
		addr   netip.Addr
		proto  Proto
	}
	collapse := func(n string) (string, bool) {
		if o.SuffixDepth < 2 {
			return n, false
		}
		labels := strings.Split(n, ".")
		if len(labels) <= o.SuffixDepth {
			return n, false
		}
		return strings.Join(labels[len(labels)-o.SuffixDepth:], "."), true
	}
	ports := map[dest][]uint16{}
	for _, u := range uses {
		d := dest{addr: u.addr, proto: u.proto}
		if u.name != "" {
			d.name, d.suffix = collapse(u.name)
			d.addr = netip.Addr{}
		}
		if !slices.Contains(ports[d], u.port) {
			ports[d] = append(ports[d], u.port)
		}
	}
	// A name only looked up gets a dns rule, unless a rule for it (or a
	// suffix above it) lets it resolve already.
	covered := func(n string) bool {
		for d := range ports {
			if d.name == "" {
				continue
			}
			t := target{kind: matchDomain, name: d.name}
			if d.suffix {
				t.kind = matchSuffix
			}
			if nameMatches(&t, n) {
				return true
			}
		}
		return false
	}
	for _, q := range queries {
		if !covered(q) {
			d := dest{proto: DNS}
			d.name, d.suffix = collapse(q)
			ports[d] = nil
		}
	}
	dests := make([]dest, 0, len(ports))
	for d := range ports {
		dests = append(dests, d)
	}
	slices.SortFunc(dests, func(a, b dest) int {
		// Names before addresses; then by name or address, then protocol.
		if c := cmp.Compare(boolInt(a.name == ""), boolInt(b.name == "")); c != 0 {
			return c
		}
		if c := strings.Compare(a.name, b.name); c != 0 {
			return c
		}
		if c := cmp.Compare(boolInt(a.suffix), boolInt(b.suffix)); c != 0 {
			return c
		}
		if c := a.addr.Compare(b.addr); c != 0 {
			return c
		}
		return cmp.Compare(a.proto, b.proto)
	})
	f := &File{DefaultAction: "deny", Rules: []FileRule{}}
	for _, d := range dests {
		r := FileRule{Protocols: []string{d.proto.String()}, Action: "allow"}
		switch {
		case d.suffix:
			r.Destination = &Target{DomainSuffix: d.name}
		case d.name != "":
			r.Destination = &Target{Domain: d.name}
		default:
			r.Destination = &Target{CIDR: d.addr.String()}
		}
		if d.proto == TCP || d.proto == UDP {
			r.Ports = portRangesOf(ports[d])
		}
		f.Rules = append(f.Rules, r)
	}
	return f
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// portRangesOf merges ports into sorted inclusive ranges.
func portRangesOf(ps []uint16) []PortRange {
	ps = slices.Clone(ps)
	slices.Sort(ps)
	var rs []PortRange
	for _, p := range ps {
		if n := len(rs); n > 0 && rs[n-1].End+1 == p {
			rs[n-1].End = p
			continue
		}
		rs = append(rs, PortRange{Start: p, End: p})
	}
	return rs
}

// learnable reports whether learn mode may allow a flow its default
// refused: never to cloud metadata or the host itself.
func (e *Engine) learnable(f Flow) bool {
	a := f.Dst.Addr().Unmap()
	return f.Direction == Egress && a.IsValid() && !InGroup(a, GroupMetadata, e.host) && !InGroup(a, GroupHost, e.host)
}

// learnFlow is learn mode's part of Check: what only the default action
// refuses is allowed instead (by name where the destination has one, so
// the SNI and Host are seen and recorded too), and every allowed flow is
// recorded with its names.
func (e *Engine) learnFlow(f Flow, d Decision, asHost bool) Decision {
	if d.Rule == RuleDefault && d.Action != Allow && !asHost && e.learnable(f) {
		d = Decision{Action: Allow, Rule: RuleLearned, ByName: f.Domain != "" || len(e.pins.Lookup(f.Dst.Addr())) > 0}
	}
	d = e.sideDoors(f, d)
	if d.Action == Allow && f.Direction == Egress && f.Dst.Addr().IsValid() {
		if f.Domain != "" {
			e.learn.Named(f.ID, f.Proto, f.Dst, f.Domain, e.pinned(f.Dst.Addr()))
		} else {
			e.learn.UseFlow(f.ID, f.Proto, f.Dst, e.pins.Lookup(f.Dst.Addr()))
		}
	}
	return d
}

// learnRequest is learn mode's part of CheckRequest.
func (e *Engine) learnRequest(f Flow, d Decision) Decision {
	if d.Rule == RuleDefault && d.Action != Allow && e.learnable(f) {
		d = Decision{Action: Allow, Rule: RuleLearned}
	}
	if d.Action == Allow && f.Domain != "" {
		e.learn.Named(f.ID, TCP, f.Dst, f.Domain, e.pinned(f.Dst.Addr()))
	}
	return d
}

// pinned is the names pinned to a, never nil (nil tells Named the pins
// are not known).
func (e *Engine) pinned(a netip.Addr) []string {
	if names := e.pins.Lookup(a); names != nil {
		return names
	}
	return []string{}
}

// learnQuery is learn mode's part of CheckQuery.
func (e *Engine) learnQuery(name string, d Decision) Decision {
	if d.Rule == RuleDefault && d.Action != Allow {
		d = Decision{Action: Allow, Rule: RuleLearned}
	}
	if d.Action == Allow {
		e.learn.Query(name)
	}
	return d
}
