package policy

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/miekg/dns"
)

func answer(q *dns.Msg, rrs ...string) *dns.Msg {
	a := new(dns.Msg)
	a.SetReply(q)
	for _, s := range rrs {
		rr, err := dns.NewRR(s)
		if err != nil {
			panic(err)
		}
		a.Answer = append(a.Answer, rr)
	}
	return a
}

func newGuard(t *testing.T, js string, rebind bool) (*DNSGuard, *Pins) {
	t.Helper()
	pins := NewPins(0)
	e := mustCompile(t, js, Options{Pins: pins})
	g, err := NewDNSGuard(DNSGuardOptions{Policy: NewHolder(e), Pins: pins, RebindProtection: rebind, BlockSuffix: []string{"blocked.test"}})
	if err != nil {
		t.Fatal(err)
	}
	return g, pins
}

// TestAnswerPinsOnlyTheQuestionsChain: an answer to an attacker's name that
// also carries an A record for an allowed name must not pin that address to
// the allowed name.
func TestAnswerPinsOnlyTheQuestionsChain(t *testing.T) {
	g, pins := newGuard(t, `{"default_action": "deny", "rules": [
		{"destination": {"domain": "files.pythonhosted.org"}, "action": "allow"}]}`, true)
	q := new(dns.Msg)
	q.SetQuestion("x.attacker.example.", dns.TypeA)
	a := answer(q,
		"x.attacker.example. 60 IN A 198.51.100.66",
		"files.pythonhosted.org. 60 IN A 198.51.100.77")
	m, _ := g.Answer(netip.AddrPort{}, q, a)
	if got := pins.Lookup(netip.MustParseAddr("198.51.100.77")); got != nil {
		t.Fatalf("off-chain record pinned: %v", got)
	}
	if m == nil || len(m.Answer) != 1 || m.Answer[0].Header().Name != "x.attacker.example." {
		t.Errorf("the off-chain record was not stripped: %v", m)
	}
	e := g.o.Policy.Load()
	if d := e.Check(flow(TCP, "198.51.100.77:443")); d.Action != Deny {
		t.Errorf("the smuggled address is allowed: %+v", d)
	}
}

func TestAnswerFollowsCNAMEChain(t *testing.T) {
	g, pins := newGuard(t, `{"default_action": "allow"}`, true)
	q := new(dns.Msg)
	q.SetQuestion("www.example.test.", dns.TypeA)
	a := answer(q,
		"www.example.test. 60 IN CNAME cdn.example.net.",
		"cdn.example.net. 60 IN CNAME edge.example.org.",
		"edge.example.org. 60 IN A 198.51.100.10")
	if m, v := g.Answer(netip.AddrPort{}, q, a); m != nil || v != nil {
		t.Fatalf("a clean chain was changed: %v %v", m, v)
	}
	got := pins.Lookup(netip.MustParseAddr("198.51.100.10"))
	for _, want := range []string{"www.example.test", "cdn.example.net", "edge.example.org"} {
		if !contains(got, want) {
			t.Errorf("pins %v lack %s", got, want)
		}
	}
	// A CNAME to a blocked name refuses the whole answer.
	a = answer(q, "www.example.test. 60 IN CNAME x.blocked.test.", "x.blocked.test. 60 IN A 198.51.100.11")
	if m, v := g.Answer(netip.AddrPort{}, q, a); m == nil || m.Rcode != dns.RcodeNameError || v == nil || v.Decision.Rule != RuleBlockList {
		t.Errorf("blocked CNAME target: %v %+v", m, v)
	}
	// Rebinding through the chain.
	a = answer(q, "www.example.test. 60 IN CNAME inner.example.net.", "inner.example.net. 60 IN A 10.0.0.5")
	if m, v := g.Answer(netip.AddrPort{}, q, a); m == nil || m.Rcode != dns.RcodeNameError || v == nil || v.Decision.Rule != RuleRebind {
		t.Errorf("rebinding through a CNAME: %v %+v", m, v)
	}
}

func TestAnswerPinsAreCapped(t *testing.T) {
	g, pins := newGuard(t, `{"default_action": "allow"}`, false)
	q := new(dns.Msg)
	q.SetQuestion("many.example.test.", dns.TypeA)
	a := new(dns.Msg)
	a.SetReply(q)
	for i := 0; i < 200; i++ {
		a.Answer = append(a.Answer, &dns.A{Hdr: dns.RR_Header{Name: "many.example.test.", Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60},
			A: net.IPv4(198, 51, 100, byte(i))})
	}
	g.Answer(netip.AddrPort{}, q, a)
	if n := pins.Len(); n != maxPinsPerAnswer {
		t.Errorf("one answer pinned %d addresses, cap %d", n, maxPinsPerAnswer)
	}
}

func TestPinsEvictOldestFirst(t *testing.T) {
	p := NewPins(3)
	for i := 1; i <= 3; i++ {
		p.Add(netip.AddrFrom4([4]byte{198, 51, 100, byte(i)}), fmt.Sprintf("n%d", i), MinPinTTL)
	}
	p.Add(netip.MustParseAddr("198.51.100.1"), "n1", MinPinTTL) // refreshed: now the newest
	p.Add(netip.MustParseAddr("198.51.100.4"), "n4", MinPinTTL)
	if p.Lookup(netip.MustParseAddr("198.51.100.2")) != nil {
		t.Error("the oldest entry survived")
	}
	for _, a := range []string{"198.51.100.1", "198.51.100.3", "198.51.100.4"} {
		if p.Lookup(netip.MustParseAddr(a)) == nil {
			t.Errorf("%s evicted", a)
		}
	}
}

// BenchmarkPinsAddFull inserts into a full table of 65,536 pins: each insert
// evicts one entry, in constant time.
func BenchmarkPinsAddFull(b *testing.B) {
	p := NewPins(DefaultPins)
	for i := 0; i < DefaultPins; i++ {
		p.Add(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), "n.example", MinPinTTL)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		p.Add(netip.AddrFrom4([4]byte{11, byte(i >> 16), byte(i >> 8), byte(i)}), "n.example", MinPinTTL)
	}
}

// Under domain rules, HTTPS records lose their ech parameter (the name
// must travel in the clear) and their address hints are pinned like A
// records.
func TestAnswerStripsECH(t *testing.T) {
	g, pins := newGuard(t, `{"default_action": "deny", "rules": [{"destination": {"domain": "web.test"}, "action": "allow"}]}`, true)
	q := new(dns.Msg)
	q.SetQuestion("web.test.", dns.TypeHTTPS)
	a := new(dns.Msg)
	a.SetReply(q)
	rr, err := dns.NewRR(`web.test. 300 IN HTTPS 1 . alpn="h2" ipv4hint="198.51.100.9" ech="AEn+DQBFKwAgACABWIHUGj4u+PIggYXcR5JF0gYk3dCRioBW8uJq9H4mKAAIAAEAAQABAANAEnB1YmxpYy50bHMtZWNoLmRldgAA"`)
	if err != nil {
		t.Fatal(err)
	}
	a.Answer = append(a.Answer, rr)
	m, _ := g.Answer(netip.AddrPort{}, q, a)
	if m == nil || strings.Contains(m.Answer[0].String(), "ech=") || !strings.Contains(m.Answer[0].String(), "alpn=") {
		t.Fatalf("answer: %v", m)
	}
	if names := pins.Lookup(netip.MustParseAddr("198.51.100.9")); len(names) != 1 || names[0] != "web.test" {
		t.Fatalf("hint pins: %v", names)
	}
}
