package policy

import (
	"encoding/json"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"
)

// validHostname is a stricter check than the policy's (which must accept
// whatever names a resolver answers): letters, digits and hyphens, labels
// of 1 to 63 characters that neither start nor end with a hyphen, at
// least two labels.
func validHostname(n string) bool {
	labels := strings.Split(n, ".")
	if len(n) > 253 || len(labels) < 2 {
		return false
	}
	for _, l := range labels {
		if len(l) == 0 || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return false
		}
		for _, c := range l {
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}

// TestNamePresetsAreValid: every preset the issue asks for is there, each
// with a source, ports and names that pass the policy's name checks (and a
// stricter host-name check), none listed twice or already covered by one
// of its suffixes, and ports 80 only where the registry serves plain HTTP.
func TestNamePresetsAreValid(t *testing.T) {
	want := []string{"alpine", "crates", "debian", "docker-hub", "github", "gitlab", "go", "huggingface", "maven", "npm", "pypi", "rubygems", "ubuntu"}
	if got := NamePresetNames(); !slices.Equal(got, want) {
		t.Fatalf("presets: got %v, want %v", got, want)
	}
	plainHTTP := map[string]bool{"debian": true, "ubuntu": true, "alpine": true}
	for _, name := range want {
		p, _ := LookupNamePreset(name)
		if p.Description == "" || len(p.Sources) == 0 {
			t.Errorf("%s: no description or sources", name)
		}
		if !slices.Contains(p.Ports, 443) {
			t.Errorf("%s: ports %v lack 443", name, p.Ports)
		}
		if slices.Contains(p.Ports, 80) != plainHTTP[name] {
			t.Errorf("%s: ports %v: 80 only for registries that serve plain HTTP", name, p.Ports)
		}
		seen := map[string]bool{}
		all := append(slices.Clone(p.Domains), p.DomainSuffixes...)
		for i, n := range all {
			kind := Target{Domain: n}
			if i >= len(p.Domains) {
				kind = Target{DomainSuffix: n}
			}
			tg, err := compileTarget(&kind)
			if err != nil {
				t.Errorf("%s: %q: %v", name, n, err)
				continue
			}
			if tg.name != n || !validHostname(n) {
				t.Errorf("%s: %q is not a lower-case host name", name, n)
			}
			if seen[n] {
				t.Errorf("%s: %q listed twice", name, n)
			}
			seen[n] = true
		}
		for _, d := range p.Domains {
			for _, s := range p.DomainSuffixes {
				if nameMatches(&target{kind: matchSuffix, name: s}, d) {
					t.Errorf("%s: domain %q is already under domain_suffix %q", name, d, s)
				}
			}
		}
	}
}

func TestParseNamePresetErrors(t *testing.T) {
	for _, tc := range []struct{ js, want string }{
		{`{"name": "x", "sources": ["s"], "ports": [443], "domains": ["a b.example"]}`, "domains[0]"},
		{`{"name": "x", "sources": ["s"], "ports": [443], "domain_suffixes": ["a..example"]}`, "domain_suffixes[0]"},
		{`{"name": "x", "ports": [443], "domains": ["a.example"]}`, "sources"},
		{`{"name": "x", "sources": ["s"], "domains": ["a.example"]}`, "ports"},
		{`{"name": "x", "sources": ["s"], "ports": [0], "domains": ["a.example"]}`, "ports[0]"},
		{`{"name": "x", "sources": ["s"], "ports": [443]}`, "no domains"},
		{`{"name": "x", "sources": ["s"], "ports": [443], "domains": ["a.example"], "extra": 1}`, "extra"},
	} {
		if _, err := parseNamePreset([]byte(tc.js)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want an error about %s", tc.js, err, tc.want)
		}
	}
}

// TestPresetRuleAllowsItsNamesOnly: a preset rule allows the preset's
// names, through their pins, on its ports, over TCP; not an address the
// sandbox never looked up, not a name outside the preset (by pin, SNI or
// query), not another port or UDP.
func TestPresetRuleAllowsItsNamesOnly(t *testing.T) {
	pins := NewPins(0)
	pypi := netip.MustParseAddr("198.51.100.7")
	files := netip.MustParseAddr("198.51.100.8")
	other := netip.MustParseAddr("198.51.100.9")
	mirror := netip.MustParseAddr("198.51.100.11")
	pins.Add(pypi, "pypi.org", time.Hour)
	pins.Add(files, "files.pythonhosted.org", time.Hour)
	pins.Add(other, "evil.example", time.Hour)
	pins.Add(mirror, "de.archive.ubuntu.com", time.Hour)
	e := mustCompile(t, `{"default_action": "deny", "rules": [
		{"destination": {"preset": "pypi"}, "action": "allow"},
		{"destination": {"preset": "ubuntu"}, "action": "allow"}]}`, Options{Pins: pins})
	ap := func(a netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(a, port) }
	for _, tc := range []struct {
		what string
		f    Flow
		want Action
	}{
		{"pypi.org:443", Flow{Proto: TCP, Src: src4, Dst: ap(pypi, 443)}, Allow},
		{"files.pythonhosted.org:443", Flow{Proto: TCP, Src: src4, Dst: ap(files, 443)}, Allow},
		{"pypi.org:80 (not a pypi port)", Flow{Proto: TCP, Src: src4, Dst: ap(pypi, 80)}, Deny},
		{"pypi.org udp 443", Flow{Proto: UDP, Src: src4, Dst: ap(pypi, 443)}, Deny},
		{"pypi.org udp 53", Flow{Proto: UDP, Src: src4, Dst: ap(pypi, 53)}, Deny},
		{"a name outside the preset", Flow{Proto: TCP, Src: src4, Dst: ap(other, 443)}, Deny},
		{"an address never looked up", Flow{Proto: TCP, Src: src4, Dst: netip.MustParseAddrPort("198.51.100.99:443")}, Deny},
		{"SNI outside the preset", Flow{Proto: TCP, Src: src4, Dst: ap(pypi, 443), Domain: "evil.example"}, Deny},
		{"SNI pypi.org", Flow{Proto: TCP, Src: src4, Dst: ap(pypi, 443), Domain: "pypi.org"}, Allow},
		{"SNI under pypi.org, not listed", Flow{Proto: TCP, Src: src4, Dst: ap(pypi, 443), Domain: "x.pypi.org"}, Deny},
		{"ubuntu mirror, port 80", Flow{Proto: TCP, Src: src4, Dst: ap(mirror, 80)}, Allow},
		{"ubuntu mirror, port 22", Flow{Proto: TCP, Src: src4, Dst: ap(mirror, 22)}, Deny},
		{"SNI archive.ubuntu.com.evil.example", Flow{Proto: TCP, Src: src4, Dst: ap(mirror, 443), Domain: "archive.ubuntu.com.evil.example"}, Deny},
		{"SNI xarchive.ubuntu.com", Flow{Proto: TCP, Src: src4, Dst: ap(mirror, 443), Domain: "xarchive.ubuntu.com"}, Deny},
	} {
		d := e.Check(tc.f)
		if d.Action != tc.want {
			t.Errorf("%s: got %v by %s, want %v", tc.what, d.Action, e.Describe(d.Rule), tc.want)
		}
		if d.Action == Allow && !d.ByName {
			t.Errorf("%s: allowed, but not by name: the SNI and Host would go unchecked", tc.what)
		}
	}
	for name, want := range map[string]Action{"pypi.org": Allow, "files.pythonhosted.org": Allow, "us.archive.ubuntu.com": Allow,
		"evil.example": Deny, "pythonhosted.org": Deny, "ubuntu.com": Deny} {
		if d := e.CheckQuery(name); d.Action != want {
			t.Errorf("resolving %s: got %v, want %v", name, d.Action, want)
		}
	}
	if !e.HasDomainRules() {
		t.Error("a preset rule is a domain rule: QUIC and DNS over TLS must be refused")
	}
}

// TestPresetRulePortsAndDeny: a rule's own ports and protocols replace the
// preset's; a deny with a preset covers every port (and the names then
// do not resolve).
func TestPresetRulePortsAndDeny(t *testing.T) {
	pins := NewPins(0)
	gh := netip.MustParseAddr("198.51.100.20")
	pins.Add(gh, "github.com", time.Hour)
	e := mustCompile(t, `{"default_action": "deny", "rules": [
		{"destination": {"preset": "github"}, "ports": [{"start": 22}], "action": "allow"}]}`, Options{Pins: pins})
	if d := e.Check(Flow{Proto: TCP, Src: src4, Dst: netip.AddrPortFrom(gh, 22)}); d.Action != Allow {
		t.Errorf("github.com:22 with the rule's own port: got %v", d.Action)
	}
	if d := e.Check(Flow{Proto: TCP, Src: src4, Dst: netip.AddrPortFrom(gh, 443)}); d.Action != Deny {
		t.Errorf("github.com:443 when the rule says 22: got %v", d.Action)
	}
	e = mustCompile(t, `{"default_action": "allow", "rules": [
		{"destination": {"preset": "github"}, "action": "deny"}]}`, Options{Pins: pins})
	for _, port := range []uint16{22, 443, 9418} {
		if d := e.Check(Flow{Proto: TCP, Src: src4, Dst: netip.AddrPortFrom(gh, port)}); d.Action != Deny {
			t.Errorf("deny github, port %d: got %v", port, d.Action)
		}
	}
	if d := e.CheckQuery("api.github.com"); d.Action != Deny {
		t.Errorf("deny github: api.github.com resolves (%v)", d.Action)
	}
}

func TestPresetRuleErrors(t *testing.T) {
	for _, tc := range []struct{ js, want string }{
		{`{"default_action": "deny", "rules": [{"destination": {"preset": "nosuch"}, "action": "allow"}]}`, "rules[0].destination: preset: \"nosuch\""},
		{`{"default_action": "deny", "rules": [{"destination": {"preset": "pypi", "domain": "x.example"}, "action": "allow"}]}`, "exactly one"},
		{`{"default_action": "deny", "rules": [{"direction": "ingress", "source": {"preset": "pypi"}, "action": "allow"}]}`, "not domains"},
	} {
		if _, err := ParseFile([]byte(tc.js)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want %q", tc.js, err, tc.want)
		}
	}
	// HTTP rules work on a preset's names.
	if _, err := ParseFile([]byte(`{"default_action": "deny", "rules": [{"destination": {"preset": "github"}, "http": {"methods": ["GET"]}, "action": "allow"}]}`)); err != nil {
		t.Errorf("http on a preset: %v", err)
	}
}

func TestAllowRules(t *testing.T) {
	rules, err := AllowRules([]string{"pypi,npm", " github ,pypi"})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range rules {
		if r.Action != "allow" || r.Destination == nil {
			t.Fatalf("rule %+v", r)
		}
		got = append(got, r.Destination.Preset)
	}
	if !slices.Equal(got, []string{"pypi", "npm", "github"}) {
		t.Errorf("got %v", got)
	}
	if _, err := AllowRules([]string{"pypi,nosuch"}); err == nil || !strings.Contains(err.Error(), `"nosuch" is no preset`) {
		t.Errorf("unknown preset: %v", err)
	}
	base := &File{DefaultAction: "deny", Rules: []FileRule{{Destination: &Target{Group: "metadata"}, Action: "terminate"}}}
	f := WithRulesFirst(base, rules)
	if len(f.Rules) != 4 || f.Rules[0].Destination.Preset != "pypi" || f.Rules[3].Action != "terminate" || len(base.Rules) != 1 {
		t.Errorf("WithRulesFirst: %+v (base %+v)", f.Rules, base.Rules)
	}
	// The combined policy round-trips through its JSON form (ctl policy
	// get, then set).
	js, err := json.Marshal(f)
	if err != nil {
		t.Fatal(err)
	}
	g, err := ParseFile(js)
	if err != nil || len(g.Rules) != 4 || g.Rules[2].Destination.Preset != "github" {
		t.Errorf("round trip of %s: %v, %+v", js, err, g)
	}
}

func TestExplainNamePreset(t *testing.T) {
	p, _ := LookupNamePreset("ubuntu")
	s := p.Explain()
	for _, want := range []string{"preset ubuntu", "tcp 80, 443", "domain security.ubuntu.com", "domain_suffix archive.ubuntu.com", "source: ", "--allow ubuntu"} {
		if !strings.Contains(s, want) {
			t.Errorf("explain lacks %q:\n%s", want, s)
		}
	}
}

// BenchmarkCheckPresets: a flow to a pinned name checked against every
// preset, its match in the last one (the SYN's check on the packet path).
func BenchmarkCheckPresets(b *testing.B) {
	var rules []string
	for _, n := range NamePresetNames() {
		rules = append(rules, `{"destination": {"preset": "`+n+`"}, "action": "allow"}`)
	}
	pins := NewPins(0)
	a := netip.MustParseAddr("198.51.100.7")
	pins.Add(a, "de.archive.ubuntu.com", time.Hour) // ubuntu, the last preset
	e := mustCompile(b, `{"default_action": "deny", "rules": [`+strings.Join(rules, ",")+`]}`, Options{Pins: pins})
	fl := Flow{Proto: TCP, Src: src4, Dst: netip.AddrPortFrom(a, 443)}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if e.Check(fl).Action != Allow {
			b.Fatal("wrong decision")
		}
	}
}
