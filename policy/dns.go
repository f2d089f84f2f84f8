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
}

// DNSGuard applies the policy to name resolution: block lists, domain rules
// (a denied name gets NXDOMAIN, which resolvers fail fast on), rebinding
// protection, and recording answers as pins for domain rules. It implements
// proxy.DNSFilter: every decision is returned for the forwarder to report.
type DNSGuard struct {
	o      DNSGuardOptions
	block  map[string]bool
	suffix []target
}

// Decision rule numbers for verdicts that come from outside the rules.
const (
	RuleDefault   = -1 // the policy's default action
	RuleBlockList = -2 // --dns-block / --dns-block-suffix
	RuleRebind    = -3 // rebinding protection
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

// Query implements proxy.DNSFilter.
func (g *DNSGuard) Query(src netip.AddrPort, q *dns.Msg) (*dns.Msg, *Verdict) {
	name := strings.ToLower(strings.TrimSuffix(q.Question[0].Name, "."))
	if g.blockedName(name) {
		return nxdomain(q), verdict(src, name, Decision{Action: Deny, Rule: RuleBlockList})
	}
	d := g.o.Policy.Load().CheckQuery(name)
	if d.Action != Allow {
		return nxdomain(q), verdict(src, name, d)
	}
	return nil, verdict(src, name, d)
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

// Answer implements proxy.DNSFilter.
func (g *DNSGuard) Answer(src netip.AddrPort, q, a *dns.Msg) (*dns.Msg, *Verdict) {
	qname := strings.ToLower(strings.TrimSuffix(q.Question[0].Name, "."))
	type pin struct {
		addr netip.Addr
		name string
		ttl  time.Duration
	}
	var pins []pin
	for _, rr := range a.Answer {
		var ip netip.Addr
		switch r := rr.(type) {
		case *dns.A:
			ip, _ = netip.AddrFromSlice(r.A)
		case *dns.AAAA:
			ip, _ = netip.AddrFromSlice(r.AAAA)
		case *dns.CNAME:
			// A CNAME target is a name the sandbox may now connect to; a
			// block on it applies as on the queried name.
			if t := strings.ToLower(strings.TrimSuffix(r.Target, ".")); g.blockedName(t) {
				return nxdomain(q), verdict(src, t, Decision{Action: Deny, Rule: RuleBlockList})
			}
			continue
		default:
			continue
		}
		ip = ip.Unmap()
		if g.o.RebindProtection && NonPublic(ip) && !isPrivateZone(qname) {
			return nxdomain(q), verdict(src, qname, Decision{Action: Deny, Rule: RuleRebind})
		}
		ttl := time.Duration(rr.Header().Ttl) * time.Second
		pins = append(pins, pin{ip, qname, ttl})
		if owner := strings.ToLower(strings.TrimSuffix(rr.Header().Name, ".")); owner != qname {
			pins = append(pins, pin{ip, owner, ttl})
		}
	}
	for _, p := range pins {
		g.o.Pins.Add(p.addr, p.name, p.ttl)
	}
	return nil, nil
}

func isPrivateZone(name string) bool {
	for i := range privateZones {
		if nameMatches(&privateZones[i], name) {
			return true
		}
	}
	return false
}
