package policy

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

type fakeAnswers map[string]Action

func (f fakeAnswers) Answer(name string, addr netip.Addr) (Action, bool) {
	if name != "" {
		a, ok := f[name]
		return a, ok
	}
	a, ok := f[addr.String()]
	return a, ok
}

// TestAsk: an ask (rule or default) stays an ask, by name where the
// address has one, unless the destination is metadata or the host, an
// explicit deny matches it (wherever the deny stands), or a standing
// answer decides.
func TestAsk(t *testing.T) {
	pins := NewPins(0)
	named := netip.MustParseAddr("198.51.100.7")
	pins.Add(named, "ask.example.test", time.Hour)
	answers := fakeAnswers{"answered.example.test": Allow, "198.51.100.8": Deny}
	e := mustCompile(t, `{"default_action": "ask", "rules": [
		{"destination": {"domain": "listed.example.test"}, "protocols": ["tcp"], "ports": [{"start": 443}], "action": "ask"},
		{"destination": {"cidr": "198.51.100.66"}, "action": "deny"},
		{"destination": {"cidr": "198.51.100.0/24"}, "ports": [{"start": 25}], "action": "terminate"}]}`, Options{Pins: pins, Answers: answers})
	for _, tc := range []struct {
		what   string
		f      Flow
		want   Action
		rule   int
		byName bool
	}{
		{"a named address", Flow{Proto: TCP, Src: src4, Dst: netip.AddrPortFrom(named, 443)}, Ask, RuleDefault, true},
		{"a bare address", Flow{Proto: TCP, Src: src4, Dst: netip.MustParseAddrPort("198.51.100.9:443")}, Ask, RuleDefault, false},
		{"metadata", Flow{Proto: TCP, Src: src4, Dst: netip.MustParseAddrPort("169.254.169.254:80")}, Deny, RuleMetadata, false},
		{"the gateway", Flow{Proto: TCP, Src: src4, Dst: netip.AddrPortFrom(gw4, 80)}, Deny, RuleHost, false},
		{"an explicit deny", Flow{Proto: TCP, Src: src4, Dst: netip.MustParseAddrPort("198.51.100.66:443")}, Deny, 1, false},
		{"an explicit terminate", Flow{Proto: TCP, Src: src4, Dst: netip.MustParseAddrPort("198.51.100.9:25")}, Terminate, 2, false},
		{"an ask rule, then a deny", Flow{Proto: TCP, Src: src4, Dst: netip.MustParseAddrPort("198.51.100.66:443"), Domain: "listed.example.test"}, Deny, 1, false},
		{"answered by name", Flow{Proto: TCP, Src: src4, Dst: netip.MustParseAddrPort("198.51.100.20:443"), Domain: "answered.example.test"}, Allow, RuleAnswered, true},
		{"answered by address", Flow{Proto: TCP, Src: src4, Dst: netip.MustParseAddrPort("198.51.100.8:22")}, Deny, RuleAnswered, false},
	} {
		d := e.Check(tc.f)
		if d.Action != tc.want || d.Rule != tc.rule || (tc.want == Ask && d.ByName != tc.byName) || (tc.want == Allow && !d.ByName && tc.byName) {
			t.Errorf("%s: got %+v (%s), want %v by rule %d, by name %v", tc.what, d, e.Describe(d.Rule), tc.want, tc.rule, tc.byName)
		}
	}
	// An ask rule that names metadata or the host: still never asked.
	g := mustCompile(t, `{"default_action": "deny", "rules": [
		{"destination": {"group": "metadata"}, "action": "ask"},
		{"destination": {"group": "host"}, "action": "ask"}]}`, Options{Pins: pins, Answers: answers})
	for _, dst := range []netip.AddrPort{netip.MustParseAddrPort("169.254.169.254:80"), netip.AddrPortFrom(gw4, 80)} {
		if d := g.Check(Flow{Proto: TCP, Src: src4, Dst: dst}); d.Action != Deny || d.Rule != RuleNotAsked {
			t.Errorf("an ask rule naming %v: got %+v, want deny by RuleNotAsked", dst, d)
		}
	}
	for name, want := range map[string]Action{"listed.example.test": Allow, "unlisted.example.test": Ask, "answered.example.test": Allow} {
		if d := e.CheckQuery(name); d.Action != want {
			t.Errorf("resolving %s: got %v, want %v", name, d.Action, want)
		}
	}
	// Requests are never held.
	if d := e.CheckRequest(Flow{Proto: TCP, Src: src4, Dst: netip.AddrPortFrom(named, 80), Domain: "ask.example.test"}, "GET", "/"); d.Action != Deny {
		t.Errorf("a request under default ask, unanswered: %v", d.Action)
	}
	if d := e.CheckRequest(Flow{Proto: TCP, Src: src4, Dst: netip.AddrPortFrom(named, 80), Domain: "answered.example.test"}, "GET", "/"); d.Action != Allow {
		t.Errorf("a request to an answered name: %v", d.Action)
	}
	if !e.AsksAnything() || !e.AllowsAnything() {
		t.Error("an ask policy asks, and may allow")
	}
	if n := e.AskName(Flow{Proto: TCP, Dst: netip.AddrPortFrom(named, 443)}); n != "ask.example.test" {
		t.Errorf("AskName: %q", n)
	}
	for _, js := range []string{
		`{"default_action": "deny", "rules": [{"destination": {"domain": "x.example"}, "http": {"methods": ["GET"]}, "action": "ask"}]}`,
		`{"default_action": "deny", "rules": [{"direction": "ingress", "source": "any", "action": "ask"}]}`,
	} {
		if _, err := ParseFile([]byte(js)); err == nil || !strings.Contains(err.Error(), "action: ask") {
			t.Errorf("%s: got %v", js, err)
		}
	}
}
