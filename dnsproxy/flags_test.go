package dnsproxy

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// guestQuery is a query as a 0x20 resolver with DNSSEC would send it.
func guestQuery(name string, cd, do, ad bool) *dns.Msg {
	q := query(name)
	q.Id = 777
	q.CheckingDisabled = cd
	q.AuthenticatedData = ad
	q.SetEdns0(4096, do)
	return q
}

// TestDNSUpstreamGetsNoGuestCaseOrFlags: the letter case of the guest's
// name and its CD, DO and AD bits never reach the resolver (a covert
// channel to whoever watches it): every upstream query carries the name in
// lower case and the agent's own flags. The guest still gets its question
// back as it asked it, case and all, as 0x20 resolvers require.
func TestDNSUpstreamGetsNoGuestCaseOrFlags(t *testing.T) {
	up := newRecordingUpstream(t)
	d, _ := New(Options{Upstreams: []string{up.addr}, Timeout: 2 * time.Second})
	defer d.Close()
	variants := []struct {
		name        string
		cd, do, ad  bool
		plainOrNone bool
	}{
		{"WwW.ExAmPlE.TeSt", true, true, true, false},
		{"wWw.oThEr.TEST", false, true, false, false},
		{"MAIL.EXAMPLE.TEST", true, false, false, false},
		{"plain.example.test", false, false, false, true},
	}
	for _, v := range variants {
		q := guestQuery(v.name, v.cd, v.do, v.ad)
		if v.plainOrNone {
			q = query(v.name) // no OPT at all
			q.Id = 777
		}
		a := d.Resolve(context.Background(), netip.AddrPort{}, q)
		if a.Rcode != dns.RcodeSuccess || a.Id != 777 || len(a.Question) != 1 || a.Question[0].Name != dns.Fqdn(v.name) {
			t.Fatalf("%s: the guest's answer: id %d, question %v, rcode %s", v.name, a.Id, a.Question, dns.RcodeToString[a.Rcode])
		}
		if a.CheckingDisabled != v.cd {
			t.Errorf("%s: the answer's CD %v, want the guest's %v", v.name, a.CheckingDisabled, v.cd)
		}
		if len(a.Answer) != 1 || a.Answer[0].Header().Name != dns.Fqdn(v.name) {
			t.Errorf("%s: the answer's records %v, want the question's name with its case", v.name, a.Answer)
		}
		if opt := a.IsEdns0(); (opt != nil) == v.plainOrNone || (opt != nil && opt.Do() != v.do) {
			t.Errorf("%s: the answer's OPT %v, want one only if the guest sent one, with its DO", v.name, opt)
		}
	}
	got := up.queries()
	if len(got) != len(variants) {
		t.Fatalf("upstream saw %d queries, want %d", len(got), len(variants))
	}
	for i, u := range got {
		want := dns.Fqdn(lower(variants[i].name))
		if u.Question[0].Name != want {
			t.Errorf("upstream query %d: name %q, want %q", i, u.Question[0].Name, want)
		}
		opt := u.IsEdns0()
		if u.CheckingDisabled || u.AuthenticatedData || !u.RecursionDesired || opt == nil || !opt.Do() || len(opt.Option) != 0 {
			t.Errorf("upstream query %d: CD %v AD %v RD %v OPT %v, want the agent's own flags (RD, DO, no CD, no AD)",
				i, u.CheckingDisabled, u.AuthenticatedData, u.RecursionDesired, opt)
		}
	}
	// Every upstream query has the same header flags and OPT but for its ID.
	flags := func(m *dns.Msg) dns.MsgHdr { h := m.MsgHdr; h.Id = 0; return h }
	for i, u := range got[1:] {
		if flags(u) != flags(got[0]) || u.IsEdns0().String() != got[0].IsEdns0().String() {
			t.Errorf("upstream query %d differs from the first in its flags: %+v / %v vs %+v / %v", i+1, flags(u), u.IsEdns0(), flags(got[0]), got[0].IsEdns0())
		}
	}

	// The same name in another case, with other flags, is the same
	// question upstream: answered from the cache, in the new guest's case.
	a := d.Resolve(context.Background(), netip.AddrPort{}, guestQuery("www.EXAMPLE.test", false, false, false))
	if n := len(up.queries()); n != len(variants) {
		t.Errorf("upstream saw %d queries, want the cached answer used", n)
	}
	if a.Question[0].Name != "www.EXAMPLE.test." || len(a.Answer) != 1 || a.Answer[0].Header().Name != "www.EXAMPLE.test." {
		t.Errorf("the cached answer: question %v, records %v, want the guest's case", a.Question, a.Answer)
	}
}

func lower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

// TestDNSSECRecordsOnlyForDO: the agent always asks with DO, so a guest
// that did not set it gets no RRSIG, NSEC or NSEC3 and no AD bit; one that
// did gets them.
func TestDNSSECRecordsOnlyForDO(t *testing.T) {
	up := newRecordingUpstream(t)
	up.mu.Lock()
	up.mangle = func(m *dns.Msg) {
		m.AuthenticatedData = true
		name := m.Question[0].Name
		m.Answer = append(m.Answer, &dns.RRSIG{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeRRSIG, Class: dns.ClassINET, Ttl: 60},
			TypeCovered: dns.TypeA, Algorithm: dns.ECDSAP256SHA256, Labels: 3, OrigTtl: 60, Expiration: 2000000000, Inception: 1700000000,
			KeyTag: 1, SignerName: "example.test.", Signature: "AAAA"})
		m.Ns = append(m.Ns, &dns.NSEC{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeNSEC, Class: dns.ClassINET, Ttl: 60},
			NextDomain: "zzz.example.test.", TypeBitMap: []uint16{dns.TypeA}})
	}
	up.mu.Unlock()
	d, _ := New(Options{Upstreams: []string{up.addr}, Timeout: 2 * time.Second})
	defer d.Close()
	count := func(a *dns.Msg) (n int) {
		for _, sec := range [][]dns.RR{a.Answer, a.Ns, a.Extra} {
			for _, rr := range sec {
				switch rr.Header().Rrtype {
				case dns.TypeRRSIG, dns.TypeNSEC, dns.TypeNSEC3:
					n++
				}
			}
		}
		return n
	}
	for _, tc := range []struct {
		what   string
		q      *dns.Msg
		dnssec int
		ad     bool
	}{
		{"no OPT", query("signed.example.test"), 0, false},
		{"OPT without DO", guestQuery("signed.example.test", false, false, false), 0, false},
		{"AD without DO", guestQuery("signed.example.test", false, false, true), 0, true},
		{"DO", guestQuery("Signed.Example.Test", false, true, false), 2, true},
	} {
		a := d.Resolve(context.Background(), netip.AddrPort{}, tc.q)
		if a.Rcode != dns.RcodeSuccess || len(a.Answer) == 0 {
			t.Fatalf("%s: %v", tc.what, a)
		}
		if n := count(a); n != tc.dnssec || a.AuthenticatedData != tc.ad {
			t.Errorf("%s: %d DNSSEC records, AD %v; want %d, AD %v", tc.what, n, a.AuthenticatedData, tc.dnssec, tc.ad)
		}
	}
}
