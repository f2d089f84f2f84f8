package policy

import (
	"net/netip"
	"strings"
	"testing"
)

func TestNormalizeName(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"Example.COM", "example.com"},
		{"example.com.", "example.com"},
		{"Bücher.Test", "xn--bcher-kva.test"},
		{"xn--bcher-kva.test", "xn--bcher-kva.test"},
		{"ｅvil.test", "evil.test"}, // full-width letters map to ASCII
		{"evil。test", "evil.test"}, // so does an ideographic full stop
		{"r3---sn-4g5e.googlevideo.com", "r3---sn-4g5e.googlevideo.com"},
		{"1.2.3.4", "1.2.3.4"},
		{strings.Repeat("a", 63) + ".test", strings.Repeat("a", 63) + ".test"},
	} {
		if got, err := NormalizeName(tc.in); err != nil || got != tc.want {
			t.Errorf("%q: %q %v, want %q", tc.in, got, err, tc.want)
		}
	}
	for _, bad := range []string{"", ".", "a..b", "a.b..", ".a.b", "evil\x00.test", "evil\n.test", "ev il.test",
		"a_b.test", "-a.test", "a-.test", "xn--zz.test", "xn--.test", "a\\.b.test", "*.test", "a:80", "[::1]",
		strings.Repeat("a", 64) + ".test", strings.Repeat("abcdefg.", 32) + "test", "evil\x7f.test", "e/vil.test"} {
		if got, err := NormalizeName(bad); err == nil {
			t.Errorf("%q: accepted as %q", bad, got)
		}
	}
}

func TestNormalizeQuery(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"_dmarc.Example.com.", "_dmarc.example.com"},
		{"_sip._tcp.example.com.", "_sip._tcp.example.com"},
		{".", ""},
		{"WWW.example.com.", "www.example.com"},
	} {
		if got, err := NormalizeQuery(tc.in); err != nil || got != tc.want {
			t.Errorf("%q: %q %v, want %q", tc.in, got, err, tc.want)
		}
	}
	// miekg/dns writes the bytes no host name has as escapes.
	for _, bad := range []string{`evil\000.test.`, `a\.b.test.`, `a\032b.test.`, "a..test.", `\195\188.test.`, ""} {
		if got, err := NormalizeQuery(bad); err == nil {
			t.Errorf("%q: accepted as %q", bad, got)
		}
	}
}

// FuzzNormalizeName: whatever the input, a name that passes is in its one
// form (normalizing it again changes nothing), ASCII letters, digits,
// hyphens and dots only, within the length limits.
func FuzzNormalizeName(f *testing.F) {
	for _, s := range []string{"Example.COM.", "Bücher.Test", "xn--bcher-kva.test", "a..b", "evil\x00.test", "_dmarc.x.", "ｅvil。test"} {
		f.Add(s, false)
		f.Add(s, true)
	}
	f.Fuzz(func(t *testing.T, s string, query bool) {
		n, err := normalize(s, query)
		if err != nil {
			return
		}
		if n == "" && !(query && s == ".") {
			t.Fatalf("%q: empty name accepted", s)
		}
		if len(n) > maxNameLen {
			t.Fatalf("%q: %d bytes", s, len(n))
		}
		for i := 0; i < len(n); i++ {
			c := n[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '.' || query && c == '_') {
				t.Fatalf("%q gave %q with byte %#02x", s, n, c)
			}
		}
		if n == "" {
			return
		}
		again, err := normalize(n, query)
		if err != nil || again != n {
			t.Fatalf("%q gave %q, which normalizes to %q %v", s, n, again, err)
		}
	})
}

// TestPolicyNamesNormalized: names in policy files are in the one form
// (an IDN rule matches its A-label), and a name no host has is an error
// that names the rule and the field.
func TestPolicyNamesNormalized(t *testing.T) {
	e := mustCompile(t, `{"default_action": "deny", "rules": [
		{"destination": {"domain": "Bücher.Test."}, "action": "allow"}]}`, Options{})
	dst := netip.MustParseAddrPort("198.51.100.7:443")
	if d := e.Check(Flow{Proto: TCP, Dst: dst, Domain: "xn--bcher-kva.test"}); d.Action != Allow {
		t.Errorf("the A-label of an IDN rule: %+v", d)
	}
	for _, bad := range []string{`{"domain": "evil\u0000.test"}`, `{"domain_suffix": "a..test"}`, `{"domain": "a_b.test"}`, `{"domain": "-a.test"}`} {
		_, err := ParseFile([]byte(`{"default_action": "deny", "rules": [{"destination": {"cidr": "10.0.0.0/8"}, "action": "allow"},
			{"destination": ` + bad + `, "action": "allow"}]}`))
		if err == nil || !strings.Contains(err.Error(), "rules[1].destination") || !strings.Contains(err.Error(), "domain") {
			t.Errorf("%s: %v", bad, err)
		}
	}
}

// TestReadsNames: flows are read for their names only while some domain
// rule denies, on 80, 443 and the ports domain rules name.
func TestReadsNames(t *testing.T) {
	flow := func(proto Proto, port uint16) Flow {
		return Flow{Proto: proto, Dst: netip.AddrPortFrom(netip.MustParseAddr("198.51.100.7"), port)}
	}
	allowOnly := mustCompile(t, `{"default_action": "deny", "rules": [{"destination": {"domain": "a.test"}, "action": "allow"}]}`, Options{})
	if allowOnly.ReadsNames(flow(TCP, 80)) || allowOnly.ReadsNames(flow(TCP, 443)) {
		t.Error("read for names without a domain deny rule")
	}
	e := mustCompile(t, `{"default_action": "allow", "rules": [
		{"destination": {"domain": "evil.test"}, "action": "deny"},
		{"destination": {"domain_suffix": "svc.test"}, "ports": [{"start": 8443}, {"start": 9000, "end": 9001}], "action": "allow"}]}`, Options{})
	for _, tc := range []struct {
		f    Flow
		want bool
	}{{flow(TCP, 80), true}, {flow(TCP, 443), true}, {flow(TCP, 8443), true}, {flow(TCP, 9001), true},
		{flow(TCP, 22), false}, {flow(TCP, 8080), false}, {flow(UDP, 443), false}} {
		if got := e.ReadsNames(tc.f); got != tc.want {
			t.Errorf("%v %v: %v, want %v", tc.f.Proto, tc.f.Dst, got, tc.want)
		}
	}
}

// TestRuleMethods: a rule's methods are upper-case RFC 9110 tokens
// (extension methods included); a lower-case one, which would match no
// request sent as GET, is an error.
func TestRuleMethods(t *testing.T) {
	for m, ok := range map[string]bool{"GET": true, "PROPFIND": true, "M-SEARCH": true, "get": false, "GE T": false, "GET(": false, "": false} {
		_, err := ParseFile([]byte(`{"default_action": "deny", "rules": [{"destination": {"domain": "a.test"}, "http": {"methods": ["` + m + `"]}, "action": "allow"}]}`))
		if (err == nil) != ok {
			t.Errorf("method %q: %v", m, err)
		}
	}
}
