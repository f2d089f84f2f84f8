package policy

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// TestLearnRoundTrip: in learn mode under "none", what the default would
// refuse is allowed and recorded (names from pins, SNI, Host and lookups;
// a bare address as such), never metadata, the host or what an explicit
// deny matches; the learned policy, compiled without learn mode, allows
// the same flows and nothing new.
func TestLearnRoundTrip(t *testing.T) {
	pins := NewPins(0)
	api := netip.MustParseAddr("198.51.100.7")
	cdn := netip.MustParseAddr("198.51.100.8")
	pins.Add(api, "api.example.test", time.Hour)
	pins.Add(cdn, "www.example.test", time.Hour)
	pins.Add(cdn, "edge.cdn.test", time.Hour) // the CNAME target of www.example.test
	l := NewLearner()
	base := `{"default_action": "deny", "rules": [
		{"destination": {"cidr": "198.51.100.66"}, "action": "deny"},
		{"destination": {"group": "metadata"}, "action": "terminate"}]}`
	e := mustCompile(t, base, Options{Pins: pins, Learn: l})
	ap := func(a netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(a, port) }
	bare := netip.MustParseAddrPort("198.51.100.9:7002")

	for _, n := range []string{"api.example.test", "www.example.test", "only-looked-up.test."} {
		if d := e.CheckQuery(n); d.Action != Allow || d.Rule != RuleLearned {
			t.Errorf("learn: resolving %s: %v by %s", n, d.Action, e.Describe(d.Rule))
		}
	}
	used := []Flow{
		{Proto: TCP, Src: src4, Dst: ap(api, 443)},
		{Proto: TCP, Src: src4, Dst: ap(api, 8443)},
		{Proto: TCP, Src: src4, Dst: ap(cdn, 80)},
		{Proto: UDP, Src: src4, Dst: bare},
		{Proto: ICMP, Src: src4, Dst: ap(api, 0)},
	}
	for _, f := range used {
		d := e.Check(f)
		if d.Action != Allow || d.Rule != RuleLearned {
			t.Errorf("learn: %v %v: %v by %s", f.Proto, f.Dst, d.Action, e.Describe(d.Rule))
		}
		if named := len(pins.Lookup(f.Dst.Addr())) > 0; d.ByName != named {
			t.Errorf("learn: %v: ByName %v, want %v (the SNI and Host are to be seen)", f.Dst, d.ByName, named)
		}
	}
	// The TLS SNI and an HTTP request's Host on the flows.
	if d := e.Check(Flow{Proto: TCP, Src: src4, Dst: ap(api, 443), Domain: "api.example.test"}); d.Action != Allow {
		t.Errorf("learn: SNI: %v", d.Action)
	}
	if d := e.CheckRequest(Flow{Proto: TCP, Src: src4, Dst: ap(cdn, 80), Domain: "www.example.test"}, "GET", "/"); d.Action != Allow || d.Rule != RuleLearned {
		t.Errorf("learn: request: %v by %s", d.Action, e.Describe(d.Rule))
	}
	// Never learned.
	for _, tc := range []struct {
		what string
		f    Flow
		want Action
	}{
		{"an explicit deny", Flow{Proto: TCP, Src: src4, Dst: netip.MustParseAddrPort("198.51.100.66:80")}, Deny},
		{"metadata", Flow{Proto: TCP, Src: src4, Dst: netip.MustParseAddrPort("169.254.169.254:80")}, Terminate},
		{"the gateway (host)", Flow{Proto: TCP, Src: src4, Dst: netip.AddrPortFrom(gw4, 8080)}, Deny},
		{"QUIC to a named host", Flow{Proto: UDP, Src: src4, Dst: ap(api, 443)}, Deny},
	} {
		if d := e.Check(tc.f); d.Action != tc.want {
			t.Errorf("learn: %s: got %v by %s, want %v", tc.what, d.Action, e.Describe(d.Rule), tc.want)
		}
	}
	if d := e.CheckAsHost(Flow{Proto: TCP, Src: src4, Dst: netip.MustParseAddrPort("192.0.2.200:22")}); d.Action == Allow {
		t.Errorf("learn: a destination the host's routes call local was learned")
	}

	f := l.Policy(LearnOptions{})
	js, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	got := string(js)
	for _, want := range []string{`"domain": "api.example.test"`, `"domain": "www.example.test"`, `"cidr": "198.51.100.9"`, `"domain": "only-looked-up.test"`} {
		if !strings.Contains(got, want) {
			t.Errorf("learned policy lacks %s:\n%s", want, got)
		}
	}
	for _, bad := range []string{"edge.cdn.test", "198.51.100.7", "198.51.100.8", "198.51.100.66", "169.254", "100.96", "8080"} {
		if strings.Contains(got, bad) {
			t.Errorf("learned policy names %s (a CNAME target, a named address, or something never allowed):\n%s", bad, got)
		}
	}
	g, err := ParseFile(js)
	if err != nil {
		t.Fatalf("the learned policy does not parse: %v\n%s", err, js)
	}
	le := mustCompile(t, got, Options{Pins: pins})
	for _, fl := range append(used, Flow{Proto: TCP, Src: src4, Dst: ap(api, 443), Domain: "api.example.test"}) {
		if d := le.Check(fl); d.Action != Allow {
			t.Errorf("under the learned policy, %v %v: %v", fl.Proto, fl.Dst, d.Action)
		}
	}
	for _, n := range []string{"api.example.test", "www.example.test", "only-looked-up.test"} {
		if d := le.CheckQuery(n); d.Action != Allow {
			t.Errorf("under the learned policy, resolving %s: %v", n, d.Action)
		}
	}
	for _, fl := range []Flow{
		{Proto: TCP, Src: src4, Dst: ap(api, 22)},                                // a new port
		{Proto: UDP, Src: src4, Dst: ap(api, 53)},                                // a new protocol
		{Proto: TCP, Src: src4, Dst: netip.MustParseAddrPort("198.51.100.9:80")}, // the bare address, another port
		{Proto: TCP, Src: src4, Dst: ap(api, 443), Domain: "other.example.test"}, // another SNI
	} {
		if d := le.Check(fl); d.Action == Allow {
			t.Errorf("under the learned policy, a new destination %v %v (%s) is allowed", fl.Proto, fl.Dst, fl.Domain)
		}
	}
	if d := le.CheckQuery("other.example.test"); d.Action == Allow {
		t.Errorf("under the learned policy, an unlearned name resolves")
	}
	// A name only looked up resolves, and nothing connects to it.
	pins.Add(netip.MustParseAddr("198.51.100.12"), "only-looked-up.test", time.Hour)
	if d := le.Check(Flow{Proto: TCP, Src: src4, Dst: netip.MustParseAddrPort("198.51.100.12:443")}); d.Action == Allow {
		t.Errorf("a name only looked up may be connected to")
	}
	if g.DefaultAction != "deny" {
		t.Errorf("learned default %q", g.DefaultAction)
	}
}

func TestLearnSuffixDepthAndPorts(t *testing.T) {
	l := NewLearner()
	dst := netip.MustParseAddrPort("198.51.100.7:443")
	for _, n := range []string{"files.pythonhosted.org", "a.b.pythonhosted.org", "pypi.org"} {
		l.Query(n)
		l.Use(TCP, dst, []string{n})
	}
	for _, p := range []uint16{8000, 8001, 8002, 9000} {
		l.Use(TCP, netip.AddrPortFrom(dst.Addr(), p), []string{"pypi.org"})
	}
	l.Query("x.y.only.example")
	f := l.Policy(LearnOptions{SuffixDepth: 2})
	js, _ := json.Marshal(f)
	want := `{"default_action":"deny","rules":[` +
		`{"destination":{"domain_suffix":"only.example"},"protocols":["dns"],"action":"allow"},` +
		`{"destination":{"domain":"pypi.org"},"protocols":["tcp"],"ports":[{"start":443,"end":443},{"start":8000,"end":8002},{"start":9000,"end":9000}],"action":"allow"},` +
		`{"destination":{"domain_suffix":"pythonhosted.org"},"protocols":["tcp"],"ports":[{"start":443,"end":443}],"action":"allow"}]}`
	if string(js) != want {
		t.Errorf("got  %s\nwant %s", js, want)
	}
	if _, err := ParseFile(js); err != nil {
		t.Error(err)
	}
}

func TestLearnerBounded(t *testing.T) {
	l := NewLearner()
	l.max = 10
	for i := 0; i < 25; i++ {
		l.Use(UDP, netip.AddrPortFrom(netip.MustParseAddr("198.51.100.7"), uint16(1000+i)), nil)
		l.Query("n" + string(rune('a'+i)) + ".example")
	}
	if l.Dropped() != 30 || len(l.uses) != 10 || len(l.queries) != 10 {
		t.Errorf("dropped %d, kept %d uses and %d queries", l.Dropped(), len(l.uses), len(l.queries))
	}
}

// TestDNSProtocolRules: a dns rule lets its names resolve (allow) or
// refuses them (deny) and matches no connection.
func TestDNSProtocolRules(t *testing.T) {
	pins := NewPins(0)
	a := netip.MustParseAddr("198.51.100.7")
	pins.Add(a, "look.example", time.Hour)
	e := mustCompile(t, `{"default_action": "deny", "rules": [
		{"destination": {"domain": "look.example"}, "protocols": ["dns"], "action": "allow"}]}`, Options{Pins: pins})
	if d := e.CheckQuery("look.example"); d.Action != Allow {
		t.Errorf("dns allow: resolving: %v", d.Action)
	}
	for _, p := range []Proto{TCP, UDP, ICMP} {
		if d := e.Check(Flow{Proto: p, Src: src4, Dst: netip.AddrPortFrom(a, 443)}); d.Action != Deny {
			t.Errorf("dns allow: a %v connection: %v", p, d.Action)
		}
	}
	e = mustCompile(t, `{"default_action": "allow", "rules": [
		{"destination": {"domain_suffix": "nolook.example"}, "protocols": ["dns"], "action": "deny"},
		{"destination": {"domain": "tcponly.example"}, "protocols": ["tcp"], "action": "deny"}]}`, Options{Pins: pins})
	if d := e.CheckQuery("a.nolook.example"); d.Action != Deny {
		t.Errorf("dns deny: resolving: %v", d.Action)
	}
	if d := e.CheckQuery("tcponly.example"); d.Action != Allow {
		t.Errorf("a tcp deny refused the lookup: %v", d.Action)
	}
	for _, tc := range []struct{ js, want string }{
		{`{"default_action": "deny", "rules": [{"destination": {"cidr": "198.51.100.0/24"}, "protocols": ["dns"], "action": "allow"}]}`, "protocols: dns is for rules to a domain"},
		{`{"default_action": "deny", "rules": [{"destination": {"domain": "x.example"}, "protocols": ["dns"], "ports": [{"start": 53}], "action": "allow"}]}`, "no port"},
	} {
		if _, err := ParseFile([]byte(tc.js)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want %q", tc.js, err, tc.want)
		}
	}
}

// TestLearnSharedAddress: names that share an address are told apart by
// what each connection asks for (SNI, Host); a connection that says
// nothing (SSH) is recorded under every name the sandbox looked up there.
func TestLearnSharedAddress(t *testing.T) {
	pins := NewPins(0)
	shared := netip.MustParseAddr("198.51.100.31")
	l := NewLearner()
	e := mustCompile(t, `{"default_action": "deny"}`, Options{Pins: pins, Learn: l})
	for _, n := range []string{"a.example.test", "b.example.test", "c.example.test"} {
		e.CheckQuery(n)
		pins.Add(shared, n, time.Hour)
	}
	at := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(shared, port) }
	e.Check(Flow{ID: 5, Proto: TCP, Src: src4, Dst: at(443)})
	e.Check(Flow{ID: 5, Proto: TCP, Src: src4, Dst: at(443), Domain: "a.example.test"})
	e.Check(Flow{ID: 6, Proto: TCP, Src: src4, Dst: at(80)})
	e.CheckRequest(Flow{ID: 6, Proto: TCP, Src: src4, Dst: at(80), Domain: "b.example.test"}, "GET", "/")
	e.Check(Flow{ID: 7, Proto: TCP, Src: src4, Dst: at(22)})
	// A name not pinned there (curl --resolve): the pins still let the
	// connection in, so both are kept.
	e.Check(Flow{ID: 8, Proto: TCP, Src: src4, Dst: at(8443)})
	e.Check(Flow{ID: 8, Proto: TCP, Src: src4, Dst: at(8443), Domain: "elsewhere.test"})
	js, _ := json.Marshal(l.Policy(LearnOptions{}))
	got := string(js)
	for _, want := range []string{
		`{"destination":{"domain":"a.example.test"},"protocols":["tcp"],"ports":[{"start":22,"end":22},{"start":443,"end":443},{"start":8443,"end":8443}],"action":"allow"}`,
		`{"destination":{"domain":"b.example.test"},"protocols":["tcp"],"ports":[{"start":22,"end":22},{"start":80,"end":80},{"start":8443,"end":8443}],"action":"allow"}`,
		`{"destination":{"domain":"c.example.test"},"protocols":["tcp"],"ports":[{"start":22,"end":22},{"start":8443,"end":8443}],"action":"allow"}`,
		`{"destination":{"domain":"elsewhere.test"},"protocols":["tcp"],"ports":[{"start":8443,"end":8443}],"action":"allow"}`,
	} {
		if !strings.Contains(got, want) {
			t.Errorf("learned policy lacks %s:\n%s", want, got)
		}
	}
	if strings.Count(got, `"destination"`) != 4 {
		t.Errorf("learned policy has more than the four rules:\n%s", got)
	}
}

// BenchmarkCheckLearn: the check of a flow in learn mode, recorded (the
// destination already known, as for every flow after a destination's
// first).
func BenchmarkCheckLearn(b *testing.B) {
	pins := NewPins(0)
	a := netip.MustParseAddr("198.51.100.7")
	pins.Add(a, "api.example.test", time.Hour)
	e := mustCompile(b, `{"default_action": "deny"}`, Options{Pins: pins, Learn: NewLearner()})
	fl := Flow{Proto: TCP, Src: src4, Dst: netip.AddrPortFrom(a, 443)}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if e.Check(fl).Action != Allow {
			b.Fatal("wrong decision")
		}
	}
}
