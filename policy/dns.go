package policy

import (
	"net/netip"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// DNSGuardOptions configure the DNS side of the policy.
type DNSGuardOptions struct {
	Policy *Holder
	Pins   *Pins
	// Block and BlockSuffix are names answered NXDOMAIN whatever the
	// policy says.
	Block, BlockSuffix []string
	// RebindProtection refuses answers that map a public name to a
	// non-public address.
	RebindProtection bool
	// StripECH removes the ech parameter from HTTPS and SVCB answers, so
	// that clients send the server name in the clear; it is always on
	// while the policy has domain rules.
	StripECH bool
	// Ask, if set, holds a query for a name the policy asks about until
	// the question is answered, and reports whether the name may resolve.
	// Without it such a name is refused.
	Ask func(src netip.AddrPort, name string) bool
}

// DNSGuard applies the policy to name resolution: block lists, domain rules
// (a denied name gets NXDOMAIN, which resolvers fail fast on), rebinding
// protection, and recording answers as pins for domain rules. It implements
// dnsproxy.Filter: every decision is returned for the forwarder to report.
type DNSGuard struct {
	o      DNSGuardOptions
	block  map[string]bool
	suffix []target
}

// Decision rule numbers for verdicts that come from outside the rules.
const (
	RuleDefault     = -1  // the policy's default action
	RuleBlockList   = -2  // --dns-block / --dns-block-suffix
	RuleRebind      = -3  // rebinding protection
	RuleResolveAll  = -4  // resolve "all" let an unlisted name resolve
	RuleGatewayEcho = -5  // the gateway answers its own echo
	RuleLocal       = -6  // the host's routing table says the destination is local
	RuleUnspecified = -7  // an unspecified address is never dialed
	RuleQUIC        = -8  // QUIC refused where names are checked
	RuleDoT         = -9  // DNS over TLS refused under domain rules
	RuleSecret      = -10 // a secret's placeholder where it may not go
	RuleBadName     = -11 // a name no host has (see NormalizeName)
)

// NewDNSGuard returns a guard; names in the block lists must be valid.
func NewDNSGuard(o DNSGuardOptions) (*DNSGuard, error) {
	g := &DNSGuard{o: o, block: map[string]bool{}}
	for _, n := range o.Block {
		nn, err := normName(n)
		if err != nil {
			return nil, err
		}
		g.block[nn] = true
	}
	for _, n := range o.BlockSuffix {
		nn, err := normName(strings.TrimPrefix(n, "."))
		if err != nil {
			return nil, err
		}
		g.suffix = append(g.suffix, target{kind: matchSuffix, name: nn})
	}
	return g, nil
}

func nxdomain(q *dns.Msg) *dns.Msg {
	m := new(dns.Msg)
	m.SetRcode(q, dns.RcodeNameError)
	m.RecursionAvailable = true
	return m
}

func verdict(src netip.AddrPort, name string, d Decision) *Verdict {
	return &Verdict{Flow: Flow{Proto: UDP, Src: src, Dst: netip.AddrPortFrom(netip.Addr{}, 53), Domain: name, DNS: true}, Decision: d}
}

// Query implements dnsproxy.Filter.
func (g *DNSGuard) Query(src netip.AddrPort, q *dns.Msg) (*dns.Msg, *Verdict) {
	name, err := NormalizeQuery(q.Question[0].Name)
	if err != nil {
		return nxdomain(q), verdict(src, "", Decision{Action: Deny, Rule: RuleBadName})
	}
	if g.blockedName(name) {
		return nxdomain(q), verdict(src, name, Decision{Action: Deny, Rule: RuleBlockList})
	}
	d := g.o.Policy.Load().CheckQuery(name)
	if d.Action == Ask {
		d.Action = Deny
		if g.o.Ask != nil && g.o.Ask(src, name) {
			d = Decision{Action: Allow, Rule: RuleAnswered}
		} else if g.o.Ask != nil {
			d.Rule = RuleAnswered
		}
	}
	if d.Action != Allow {
		return nxdomain(q), verdict(src, name, d)
	}
	return nil, verdict(src, name, d)
}

// Holds reports whether Query may hold q (its name is asked about), so
// that it is never decided on the packet path.
func (g *DNSGuard) Holds(src netip.AddrPort, q *dns.Msg) bool {
	if g.o.Ask == nil || len(q.Question) != 1 {
		return false
	}
	return g.o.Policy.Load().CheckQuery(q.Question[0].Name).Action == Ask
}

func (g *DNSGuard) blockedName(name string) bool {
	if g.block[name] {
		return true
	}
	for i := range g.suffix {
		if nameMatches(&g.suffix[i], name) {
			return true
		}
	}
	return false
}

// privateZones may legitimately resolve to private addresses.
var privateZones = []target{
	{kind: matchSuffix, name: "localhost"},
	{kind: matchSuffix, name: "local"},
	{kind: matchSuffix, name: "internal"},
	{kind: matchSuffix, name: "home.arpa"},
	{kind: matchSuffix, name: "lan"},
}

// Bounds on what one answer may pin.
const (
	maxCNAMEChain    = 8  // CNAME hops followed from the question
	maxPinsPerAnswer = 32 // addresses pinned from one answer
)

func canonical(name string) string { return strings.ToLower(strings.TrimSuffix(name, ".")) }

// Answer implements dnsproxy.Filter. Only records on the CNAME chain that
// starts at the question count: they are checked (block lists on every
// name of the chain, rebinding protection on every address) and their
// addresses pinned to the chain's names; records about other names are
// stripped, so an answer cannot pin an address to a name nobody asked for.
func (g *DNSGuard) Answer(src netip.AddrPort, q, a *dns.Msg) (*dns.Msg, *Verdict) {
	qname := canonical(q.Question[0].Name)
	chain := []string{qname}
	for hop := 0; hop < maxCNAMEChain; hop++ {
		next := ""
		for _, rr := range a.Answer {
			if c, ok := rr.(*dns.CNAME); ok && canonical(c.Hdr.Name) == chain[len(chain)-1] {
				next = canonical(c.Target)
				break
			}
		}
		if next == "" || contains(chain, next) {
			break
		}
		// A CNAME target is a name the sandbox may now connect to; a
		// block on it applies as on the queried name.
		if g.blockedName(next) {
			return nxdomain(q), verdict(src, next, Decision{Action: Deny, Rule: RuleBlockList})
		}
		chain = append(chain, next)
	}
	kept := make([]dns.RR, 0, len(a.Answer))
	pinned, changed := 0, false
	stripECH := g.o.StripECH || g.o.Policy.Load().HasDomainRules()
	for _, rr := range a.Answer {
		if !contains(chain, canonical(rr.Header().Name)) {
			changed = true
			continue // off the chain: stripped
		}
		kept = append(kept, rr)
		var ips []netip.Addr
		switch r := rr.(type) {
		case *dns.A:
			ip, _ := netip.AddrFromSlice(r.A)
			ips = append(ips, ip)
		case *dns.AAAA:
			ip, _ := netip.AddrFromSlice(r.AAAA)
			ips = append(ips, ip)
		case *dns.HTTPS:
			ips, changed = svcb(&r.SVCB, stripECH, changed)
		case *dns.SVCB:
			ips, changed = svcb(r, stripECH, changed)
		}
		for _, ip := range ips {
			ip = ip.Unmap()
			if g.o.RebindProtection && NonPublic(ip) && !isPrivateZone(qname) {
				return nxdomain(q), verdict(src, qname, Decision{Action: Deny, Rule: RuleRebind})
			}
			if pinned < maxPinsPerAnswer {
				pinned++
				ttl := time.Duration(rr.Header().Ttl) * time.Second
				for _, n := range chain {
					g.o.Pins.Add(ip, n, ttl)
				}
			}
		}
	}
	if changed {
		a.Answer = kept
		return a, nil
	}
	return nil, nil
}

// svcb returns the address hints of an HTTPS or SVCB record that points
// at its own name (clients connect to them as to its A and AAAA records),
// and strips its ech parameter if asked to.
func svcb(r *dns.SVCB, stripECH, changed bool) ([]netip.Addr, bool) {
	var ips []netip.Addr
	kept := r.Value[:0]
	for _, kv := range r.Value {
		switch v := kv.(type) {
		case *dns.SVCBECHConfig:
			if stripECH {
				changed = true
				continue
			}
		case *dns.SVCBIPv4Hint:
			if r.Target == "." {
				for _, ip := range v.Hint {
					if a, ok := netip.AddrFromSlice(ip); ok {
						ips = append(ips, a)
					}
				}
			}
		case *dns.SVCBIPv6Hint:
			if r.Target == "." {
				for _, ip := range v.Hint {
					if a, ok := netip.AddrFromSlice(ip); ok {
						ips = append(ips, a)
					}
				}
			}
		}
		kept = append(kept, kv)
	}
	r.Value = kept
	return ips, changed
}

func isPrivateZone(name string) bool {
	for i := range privateZones {
		if nameMatches(&privateZones[i], name) {
			return true
		}
	}
	return false
}
