package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"
)

var (
	gw4  = netip.MustParseAddr("100.96.0.1")
	gw6  = netip.MustParseAddr("fd42:6d73:62::1")
	host = NewHostSet(gw4, gw6, netip.MustParseAddr("192.0.2.77"))
	src4 = netip.MustParseAddrPort("100.96.0.2:40000")
)

func mustCompile(t testing.TB, js string, o Options) *Engine {
	t.Helper()
	f, err := ParseFile([]byte(js))
	if err != nil {
		t.Fatalf("parse: %v", err)
	}
	if o.Host == nil {
		o.Host = host
	}
	e, err := Compile(f, o)
	if err != nil {
		t.Fatalf("compile: %v", err)
	}
	return e
}

func flow(p Proto, dst string) Flow {
	ap, err := netip.ParseAddrPort(dst)
	if err != nil {
		ap = netip.AddrPortFrom(netip.MustParseAddr(dst), 0)
	}
	return Flow{Proto: p, Src: src4, Dst: ap}
}

func TestGroups(t *testing.T) {
	for _, tc := range []struct {
		addr  string
		group Group
		want  bool
	}{
		{"127.0.0.1", GroupLoopback, true},
		{"127.255.0.9", GroupLoopback, true},
		{"::1", GroupLoopback, true},
		{"10.1.2.3", GroupPrivate, true},
		{"172.16.0.1", GroupPrivate, true},
		{"172.32.0.1", GroupPrivate, false},
		{"192.168.9.9", GroupPrivate, true},
		{"100.64.0.1", GroupPrivate, true},
		{"100.128.0.1", GroupPrivate, false},
		{"fd00::1", GroupPrivate, true},
		{"fc00::1", GroupPrivate, true},
		{"169.254.1.1", GroupLinkLocal, true},
		{"fe80::1", GroupLinkLocal, true},
		{"169.254.169.254", GroupMetadata, true},
		{"169.254.169.254", GroupLinkLocal, true},
		{"fd00:ec2::254", GroupMetadata, true},
		{"100.100.100.200", GroupMetadata, true},
		{"224.0.0.251", GroupMulticast, true},
		{"255.255.255.255", GroupMulticast, true},
		{"ff02::1", GroupMulticast, true},
		{"100.96.0.1", GroupHost, true},
		{"fd42:6d73:62::1", GroupHost, true},
		{"192.0.2.77", GroupHost, true},
		{"192.0.2.78", GroupHost, false},
		{"198.51.100.10", GroupPublic, true},
		{"2001:db8::10", GroupPublic, true},
		{"8.8.8.8", GroupPublic, true},
		{"2606:4700::1", GroupPublic, true},
		{"10.0.0.1", GroupPublic, false},
		{"127.0.0.1", GroupPublic, false},
		{"169.254.169.254", GroupPublic, false},
		{"100.96.0.1", GroupPublic, false},
		{"192.0.2.77", GroupPublic, false},
		{"224.0.0.1", GroupPublic, false},
		{"0.0.0.0", GroupPublic, false},
		{"::", GroupPublic, false},
		{"fe80::1", GroupPublic, false},
		{"fd00::1", GroupPublic, false},
		// IPv6 that carries IPv4 is classified by the IPv4 it carries.
		{"64:ff9b::a9fe:a9fe", GroupMetadata, true}, // NAT64 → 169.254.169.254
		{"64:ff9b::a9fe:a9fe", GroupPublic, false},
		{"64:ff9b::a00:1", GroupPrivate, true}, // NAT64 → 10.0.0.1
		{"64:ff9b::7f00:1", GroupLoopback, true},
		{"64:ff9b::c633:640a", GroupPublic, true}, // → 198.51.100.10
		{"64:ff9b:1::a9fe:a9fe", GroupPublic, false},
		{"2002:a9fe:a9fe::1", GroupMetadata, true}, // 6to4
		{"2002:a00:1::1", GroupPublic, false},
		{"2002:c633:640a::1", GroupPublic, true},
		{"::a9fe:a9fe", GroupMetadata, true},         // IPv4-compatible
		{"::ffff:0:a00:1", GroupPrivate, true},       // SIIT
		{"::ffff:0:6440:6464", GroupMetadata, false}, // 100.64.100.100: CGNAT, not metadata
		{"::ffff:0:6440:6464", GroupPrivate, true},
		{"64:ff9b::6460:1", GroupHost, true},    // carries the gateway: conservative
		{"64:ff9b::6460:1", GroupPrivate, true}, // 100.96.0.1: CGNAT
		// Special-purpose ranges are never public.
		{"0.1.2.3", GroupPublic, false},
		{"240.0.0.1", GroupPublic, false},
		{"198.18.0.1", GroupPublic, false},
		{"192.0.0.170", GroupPublic, false},
		{"2001::1", GroupPublic, false}, // Teredo
		{"2001:2::1", GroupPublic, false},
		{"100::1", GroupPublic, false},
		{"fec0::1", GroupPublic, false},
		{"192.0.2.1", GroupPublic, true}, // documentation ranges count as public
		{"203.0.113.5", GroupPublic, true},
	} {
		if got := InGroup(netip.MustParseAddr(tc.addr), tc.group, host); got != tc.want {
			t.Errorf("%s in %s: got %v, want %v", tc.addr, tc.group, got, tc.want)
		}
	}
}

func TestUnspecifiedInEveryForm(t *testing.T) {
	for _, a := range []string{"0.0.0.0", "::", "::ffff:0.0.0.0", "64:ff9b::", "2002::1"} {
		if !Unspecified(netip.MustParseAddr(a)) {
			t.Errorf("%s: not seen as unspecified", a)
		}
	}
	for _, a := range []string{"0.0.0.1", "::1", "198.51.100.1", "64:ff9b::1"} {
		if Unspecified(netip.MustParseAddr(a)) {
			t.Errorf("%s: seen as unspecified", a)
		}
	}
}

func TestPublicOnlyPreset(t *testing.T) {
	f, _ := Preset("public-only")
	e, err := Compile(f, Options{Host: host})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		p    Proto
		dst  string
		want Action
	}{
		{TCP, "198.51.100.10:80", Allow},
		{UDP, "198.51.100.10:7002", Allow},
		{ICMP, "198.51.100.10", Allow},
		{TCP, "[2001:db8::10]:80", Allow},
		{ICMPv6, "2001:db8::10", Allow},
		{TCP, "10.0.0.1:80", Deny},
		{UDP, "192.168.1.1:53", Deny},
		{ICMP, "172.16.0.1", Deny},
		{TCP, "169.254.169.254:80", Deny},
		{TCP, "[fd00:ec2::254]:80", Deny},
		{TCP, "100.96.0.1:22", Deny},
		{ICMP, "100.96.0.1", Deny},
		{TCP, "[fd42:6d73:62::1]:22", Deny},
		{TCP, "192.0.2.77:22", Deny},
		{TCP, "127.0.0.1:80", Deny},
		{TCP, "[::1]:80", Deny},
		{TCP, "[fe80::1]:80", Deny},
		{UDP, "224.0.0.251:5353", Deny},
		{TCP, "[fd00::5]:80", Deny},
		// IPv4-mapped IPv6 is normalised before matching.
		{TCP, "[::ffff:10.0.0.1]:80", Deny},
		{TCP, "[::ffff:169.254.169.254]:80", Deny},
		{TCP, "[::ffff:198.51.100.10]:80", Allow},
	} {
		if got := e.Check(flow(tc.p, tc.dst)).Action; got != tc.want {
			t.Errorf("%s %s: got %s, want %s", tc.p, tc.dst, got, tc.want)
		}
	}
}

func TestPresets(t *testing.T) {
	for _, tc := range []struct {
		preset, dst string
		want        Action
	}{
		{"none", "198.51.100.10:80", Deny},
		{"allow-all", "10.0.0.1:80", Allow},
		{"allow-all", "100.96.0.1:22", Allow},
		{"non-local", "10.0.0.1:80", Allow},
		{"non-local", "198.51.100.10:80", Allow},
		{"non-local", "169.254.169.254:80", Deny},
		{"non-local", "100.96.0.1:80", Deny},
		{"non-local", "127.0.0.1:80", Deny},
	} {
		f, ok := Preset(tc.preset)
		if !ok {
			t.Fatalf("no preset %s", tc.preset)
		}
		e, _ := Compile(f, Options{Host: host})
		if got := e.Check(flow(TCP, tc.dst)).Action; got != tc.want {
			t.Errorf("%s %s: got %s, want %s", tc.preset, tc.dst, got, tc.want)
		}
	}
}

func TestRulesMatching(t *testing.T) {
	e := mustCompile(t, `{"default_action": "allow", "rules": [
		{"destination": {"cidr": "198.51.100.0/28"}, "protocols": ["tcp"], "ports": [{"start": 8000, "end": 8999}], "action": "deny"},
		{"destination": {"cidr": "198.51.100.0/24"}, "protocols": ["udp"], "action": "terminate"},
		{"destination": {"cidr": "2001:db8::/32"}, "protocols": ["icmpv6"], "action": "deny"},
		{"destination": {"cidr": "198.51.100.5"}, "action": "deny"},
		{"destination": {"group": "private"}, "ports": [{"start": 22}], "action": "deny"},
		{"destination": "any", "protocols": ["icmp"], "action": "deny"}
	]}`, Options{})
	for _, tc := range []struct {
		p    Proto
		dst  string
		want Action
		rule int
	}{
		{TCP, "198.51.100.10:8000", Deny, 0},
		{TCP, "198.51.100.10:8999", Deny, 0},
		{TCP, "198.51.100.10:9000", Allow, -1},
		{TCP, "198.51.100.10:7999", Allow, -1},
		{TCP, "198.51.100.20:8000", Allow, -1}, // outside the /28
		{UDP, "198.51.100.20:8000", Terminate, 1},
		{ICMPv6, "2001:db8::1", Deny, 2},
		{TCP, "[2001:db8::1]:80", Allow, -1},
		{TCP, "198.51.100.5:80", Deny, 3},
		{TCP, "10.1.1.1:22", Deny, 4},
		{TCP, "10.1.1.1:23", Allow, -1},
		{ICMP, "10.1.1.1", Deny, 5}, // port rules never match ICMP
		{ICMP, "8.8.8.8", Deny, 5},
	} {
		d := e.Check(flow(tc.p, tc.dst))
		if d.Action != tc.want || d.Rule != tc.rule {
			t.Errorf("%s %s: got %s by rule %d, want %s by rule %d", tc.p, tc.dst, d.Action, d.Rule, tc.want, tc.rule)
		}
	}
}

func TestFirstMatchWins(t *testing.T) {
	e := mustCompile(t, `{"default_action": "deny", "rules": [
		{"destination": {"cidr": "198.51.100.10/32"}, "action": "allow"},
		{"destination": {"cidr": "198.51.100.0/24"}, "action": "deny"},
		{"destination": {"cidr": "198.51.100.20/32"}, "action": "allow"}
	]}`, Options{})
	if d := e.Check(flow(TCP, "198.51.100.10:1")); d.Action != Allow || d.Rule != 0 {
		t.Errorf("first rule: got %+v", d)
	}
	if d := e.Check(flow(TCP, "198.51.100.20:1")); d.Action != Deny || d.Rule != 1 {
		t.Errorf("a later allow must not override an earlier deny: got %+v", d)
	}
}

func TestDenyIsFatal(t *testing.T) {
	e := mustCompile(t, `{"default_action": "deny", "rules": [{"destination": {"cidr": "198.51.100.0/24"}, "action": "allow"}]}`, Options{DenyIsFatal: true})
	if got := e.Check(flow(TCP, "10.0.0.1:1")).Action; got != Terminate {
		t.Errorf("got %s, want terminate", got)
	}
	if got := e.Check(flow(TCP, "198.51.100.1:1")).Action; got != Allow {
		t.Errorf("got %s, want allow", got)
	}
}

func TestIngressRules(t *testing.T) {
	e := mustCompile(t, `{"default_action": "deny", "rules": [
		{"direction": "ingress", "source": {"cidr": "127.0.0.0/8"}, "ports": [{"start": 8080}], "action": "allow"},
		{"direction": "ingress", "source": {"cidr": "10.0.0.0/8"}, "action": "deny"},
		{"destination": "any", "action": "allow"}
	]}`, Options{})
	in := func(src, dst string) Flow {
		return Flow{Direction: Ingress, Proto: TCP, Src: netip.MustParseAddrPort(src), Dst: netip.MustParseAddrPort(dst)}
	}
	if got := e.Check(in("127.0.0.1:5000", "127.0.0.1:8080")); got.Action != Allow || got.Rule != 0 {
		t.Errorf("loopback client: %+v", got)
	}
	if got := e.Check(in("127.0.0.1:5000", "127.0.0.1:8081")); got.Action != Allow || got.Rule != -1 {
		t.Errorf("other port, no ingress rule matches: %+v, want allow (default_action is for egress)", got)
	}
	if got := e.Check(in("10.1.1.1:5000", "127.0.0.1:8080")); got.Action != Deny || got.Rule != 1 {
		t.Errorf("10.x client: %+v", got)
	}
	// Egress rules do not apply to ingress flows and vice versa.
	if got := e.Check(flow(TCP, "10.1.1.1:80")); got.Action != Allow || got.Rule != 2 {
		t.Errorf("egress: %+v", got)
	}
}

func TestDomainRulesMatchThroughPins(t *testing.T) {
	pins := NewPins(0)
	e := mustCompile(t, `{"default_action": "deny", "rules": [
		{"destination": {"domain": "api.example.com"}, "protocols": ["tcp"], "ports": [{"start": 443}], "action": "allow"},
		{"destination": {"domain_suffix": "cdn.example.net"}, "action": "allow"},
		{"destination": {"domain_suffix": ".bad.example"}, "action": "terminate"}
	]}`, Options{Pins: pins})
	ip1, ip2, ip3 := netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("198.51.100.2"), netip.MustParseAddr("2001:db8::3")
	// Nothing resolved yet: no domain rule can match.
	if got := e.Check(flow(TCP, "198.51.100.1:443")).Action; got != Deny {
		t.Errorf("unresolved address: got %s, want deny", got)
	}
	pins.Add(ip1, "API.example.com.", time.Minute)
	pins.Add(ip2, "img.cdn.example.net", time.Minute)
	pins.Add(ip3, "x.bad.example", time.Minute)
	for _, tc := range []struct {
		p    Proto
		dst  string
		want Action
	}{
		{TCP, "198.51.100.1:443", Allow},
		{TCP, "198.51.100.1:80", Deny},
		{UDP, "198.51.100.1:443", Deny},
		{TCP, "198.51.100.2:80", Allow},
		{UDP, "198.51.100.2:53", Allow},
		{TCP, "[2001:db8::3]:80", Terminate},
		{TCP, "[::ffff:198.51.100.2]:80", Allow},
		{TCP, "198.51.100.9:443", Deny}, // never looked up
	} {
		if got := e.Check(flow(tc.p, tc.dst)).Action; got != tc.want {
			t.Errorf("%s %s: got %s, want %s", tc.p, tc.dst, got, tc.want)
		}
	}
	// Suffix rules match the name itself and subdomains, not look-alikes.
	pins.Add(netip.MustParseAddr("198.51.100.4"), "evilcdn.example.net", time.Minute)
	if got := e.Check(flow(TCP, "198.51.100.4:80")).Action; got != Deny {
		t.Errorf("look-alike suffix: got %s, want deny", got)
	}
}

func TestPinsExpireAndBound(t *testing.T) {
	p := NewPins(3)
	now := time.Unix(1000, 0)
	p.now = func() time.Time { return now }
	a := netip.MustParseAddr("198.51.100.1")
	p.Add(a, "a.example", time.Second) // raised to the minimum TTL
	now = now.Add(MinPinTTL - time.Second)
	if got := p.Lookup(a); len(got) != 1 || got[0] != "a.example" {
		t.Fatalf("lookup before expiry: %v", got)
	}
	now = now.Add(2 * time.Second)
	if got := p.Lookup(a); got != nil {
		t.Fatalf("lookup after expiry: %v", got)
	}
	for i := 0; i < 10; i++ {
		p.Add(netip.AddrFrom4([4]byte{198, 51, 100, byte(10 + i)}), fmt.Sprintf("n%d.example", i), time.Hour)
	}
	if n := p.Len(); n > 3 {
		t.Fatalf("pins grew to %d entries, bound is 3", n)
	}
}

func TestCheckQuery(t *testing.T) {
	allowOne := mustCompile(t, `{"default_action": "deny", "rules": [
		{"destination": {"domain": "www.example.test"}, "action": "allow"}]}`, Options{})
	if got := allowOne.CheckQuery("www.example.test."); got.Action != Allow {
		t.Errorf("allowed name: %+v", got)
	}
	if got := allowOne.CheckQuery("other.example.test"); got.Action != Deny {
		t.Errorf("other name under deny-by-default: %+v", got)
	}
	f, _ := Preset("public-only")
	po, _ := Compile(f, Options{Host: host})
	if got := po.CheckQuery("anything.example"); got.Action != Allow {
		t.Errorf("public-only must let names resolve: %+v", got)
	}
	denyName := mustCompile(t, `{"default_action": "allow", "rules": [
		{"destination": {"domain_suffix": "blocked.test"}, "action": "deny"},
		{"destination": {"domain": "web.test"}, "ports": [{"start": 80}], "action": "deny"}]}`, Options{})
	if got := denyName.CheckQuery("a.blocked.test"); got.Action != Deny || got.Rule != 0 {
		t.Errorf("denied suffix: %+v", got)
	}
	if got := denyName.CheckQuery("web.test"); got.Action != Allow {
		t.Errorf("a port-limited deny must not stop resolution: %+v", got)
	}
}

// TestDenyByDefaultResolvesOnlyListedNames: under default deny an address
// rule that allows something no longer opens DNS to every name (a channel
// out); "resolve": "all" does, explicitly.
func TestDenyByDefaultResolvesOnlyListedNames(t *testing.T) {
	js := `{"default_action": "deny", %s "rules": [
		{"destination": {"cidr": "198.51.100.0/24"}, "protocols": ["udp"], "action": "allow"},
		{"destination": {"domain_suffix": "pypi.org"}, "action": "allow"}]}`
	e := mustCompile(t, fmt.Sprintf(js, ""), Options{})
	if got := e.CheckQuery("exfil-4f2a9c.attacker.example"); got.Action != Deny {
		t.Errorf("unlisted name under deny-by-default: %+v, want deny", got)
	}
	if got := e.CheckQuery("files.pypi.org"); got.Action != Allow || got.Rule != 1 {
		t.Errorf("listed name: %+v", got)
	}
	all := mustCompile(t, fmt.Sprintf(js, `"resolve": "all",`), Options{})
	if got := all.CheckQuery("anything.example"); got.Action != Allow || got.Rule != RuleResolveAll {
		t.Errorf(`resolve "all": %+v`, got)
	}
	if d := all.Describe(RuleResolveAll); !strings.Contains(d, `resolve "all"`) {
		t.Errorf("describe: %q", d)
	}
	if _, err := ParseFile([]byte(`{"default_action": "deny", "resolve": "some"}`)); err == nil || !strings.Contains(err.Error(), "resolve") {
		t.Errorf("bad resolve value: %v", err)
	}
}

// TestSuffixMatchesWholeLabels: a dot escaped inside a label is no label
// boundary, so "x.evil\.example.com" is not under example.com; and since
// no host name has a backslash, any escape makes the name one that no rule
// allows.
func TestSuffixMatchesWholeLabels(t *testing.T) {
	e := mustCompile(t, `{"default_action": "deny", "rules": [
		{"destination": {"domain_suffix": "example.com"}, "action": "allow"}]}`, Options{})
	for name, want := range map[string]Action{
		"example.com":            Allow,
		"a.example.com.":         Allow,
		"x.evil\\.example.com":   Deny,
		"x.evil\\\\.example.com": Deny, // an escaped backslash, then a real dot
		"evilexample.com":        Deny,
		"example.com\\.":         Deny,
	} {
		if got := e.CheckQuery(name); got.Action != want {
			t.Errorf("%s: %s, want %s", name, got.Action, want)
		}
	}
}

func TestMappedCIDRMustBeAtLeast96(t *testing.T) {
	if _, err := ParseFile([]byte(`{"default_action": "allow", "rules": [{"destination": {"cidr": "::ffff:169.254.0.0/80"}, "action": "deny"}]}`)); err == nil ||
		!strings.Contains(err.Error(), "/96 or longer") {
		t.Errorf("mapped /80: %v", err)
	}
	e := mustCompile(t, `{"default_action": "allow", "rules": [{"destination": {"cidr": "::ffff:169.254.0.0/112"}, "action": "deny"}]}`, Options{})
	if got := e.Check(flow(TCP, "169.254.169.254:80")); got.Action != Deny {
		t.Errorf("mapped /112 does not match its IPv4 range: %+v", got)
	}
}

// TestCIDRMatchesEmbeddedIPv4: a rule on an IPv4 range also decides the
// NAT64 and 6to4 addresses that reach it.
func TestCIDRMatchesEmbeddedIPv4(t *testing.T) {
	e := mustCompile(t, `{"default_action": "allow", "rules": [{"destination": {"cidr": "169.254.0.0/16"}, "action": "deny"}]}`, Options{})
	for _, dst := range []string{"[64:ff9b::a9fe:a9fe]:80", "[2002:a9fe:a9fe::1]:80"} {
		if got := e.Check(flow(TCP, dst)); got.Action != Deny {
			t.Errorf("%s: %+v, want deny", dst, got)
		}
	}
	f, _ := Preset("public-only")
	po, _ := Compile(f, Options{Host: host})
	for _, dst := range []string{"[64:ff9b::a9fe:a9fe]:80", "[64:ff9b::a00:1]:80", "[2002:7f00:1::1]:80", "[2001::1]:80", "240.0.0.1:80"} {
		if got := po.Check(flow(TCP, dst)); got.Action != Deny {
			t.Errorf("public-only %s: %+v, want deny", dst, got)
		}
	}
}

func TestAllowsAnythingAndCheckAsHost(t *testing.T) {
	none, _ := Preset("none")
	e, _ := Compile(none, Options{Host: host})
	if e.AllowsAnything() {
		t.Error("none allows something")
	}
	po, _ := Preset("public-only")
	e, _ = Compile(po, Options{Host: host})
	if !e.AllowsAnything() {
		t.Error("public-only allows nothing")
	}
	// An address the kernel calls local is decided as the host.
	fl := flow(TCP, "198.51.100.99:22")
	if got := e.Check(fl); got.Action != Allow {
		t.Fatalf("public address: %+v", got)
	}
	if got := e.CheckAsHost(fl); got.Action != Deny || got.Rule != 0 {
		t.Errorf("the same address as the host: %+v, want deny by rules[0]", got)
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct {
		js, want string
	}{
		{`{`, "policy:"},
		{`{"rules": []}`, "default_action: missing"},
		{`{"default_action": "maybe"}`, `default_action: "maybe"`},
		{`{"default_action": "deny", "extra": 1}`, `unknown field "extra"`},
		{`{"default_action": "deny", "rules": [{"destination": "any"}]}`, "rules[0].action: missing"},
		{`{"default_action": "deny", "rules": [{"destination": "any", "action": "allow"}, {"destination": "all", "action": "allow"}]}`, "rules[1]"},
		{`{"default_action": "deny", "rules": [{"action": "allow"}]}`, "rules[0].destination: missing"},
		{`{"default_action": "deny", "rules": [{"destination": {"cidr": "10.0.0.0/33"}, "action": "deny"}]}`, "rules[0].destination: cidr"},
		{`{"default_action": "deny", "rules": [{"destination": {"group": "intranet"}, "action": "deny"}]}`, `rules[0].destination: group: unknown group "intranet"`},
		{`{"default_action": "deny", "rules": [{"destination": {"cidr": "10.0.0.0/8", "group": "private"}, "action": "deny"}]}`, "exactly one"},
		{`{"default_action": "deny", "rules": [{"destination": {"domian": "x"}, "action": "deny"}]}`, `rules[0]`},
		{`{"default_action": "deny", "rules": [{"destination": "any", "protocols": ["sctp"], "action": "deny"}]}`, `rules[0].protocols[0]: "sctp"`},
		{`{"default_action": "deny", "rules": [{"destination": "any", "ports": [{"start": 500, "end": 400}], "action": "deny"}]}`, "rules[0].ports[0]: start 500 is after end 400"},
		{`{"default_action": "deny", "rules": [{"destination": "any", "ports": [{"start": 0}], "action": "deny"}]}`, "rules[0].ports[0]"},
		{`{"default_action": "deny", "rules": [{"destination": "any", "ports": [{"start": 70000}], "action": "deny"}]}`, "rules[0]"},
		{`{"default_action": "deny", "rules": [{"direction": "sideways", "destination": "any", "action": "deny"}]}`, "rules[0].direction"},
		{`{"default_action": "deny", "rules": [{"destination": "any", "source": {"cidr": "10.0.0.0/8"}, "action": "deny"}]}`, "rules[0].source"},
		{`{"default_action": "deny", "rules": [{"destination": {"domain": "a b"}, "action": "deny"}]}`, "rules[0].destination: domain"},
		{`{"default_action": "deny", "rules": [{"destination": "any", "action": "allow", "protocols": "tcp"}]}`, "rules[0]: protocols"},
	} {
		_, err := ParseFile([]byte(tc.js))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s:\n got %v\nwant an error containing %q", tc.js, err, tc.want)
		}
	}
}

// TestParseReportsEveryError: a file with three mistakes names all three,
// each with its rule index and field.
func TestParseReportsEveryError(t *testing.T) {
	_, err := ParseFile([]byte(`{"default_action": "maybe", "rules": [
		{"destination": "any", "action": "allow"},
		{"destination": {"group": "lan"}, "protocols": ["sctp"], "action": "deny"},
		{"destination": "any", "ports": [{"start": 9, "end": 2}]}]}`))
	var errs Errors
	if !errors.As(err, &errs) {
		t.Fatalf("got %v, want Errors", err)
	}
	want := []string{
		`policy: default_action: "maybe"`,
		`policy: rules[1].destination: group: unknown group "lan"`,
		`policy: rules[1].protocols[0]: "sctp"`,
		`policy: rules[2].ports[0]: start 9 is after end 2`,
		`policy: rules[2].action: missing`,
	}
	if len(errs) != len(want) {
		t.Fatalf("got %d errors, want %d:\n%v", len(errs), len(want), err)
	}
	for i, w := range want {
		if !strings.HasPrefix(errs[i].Error(), w) {
			t.Errorf("error %d: got %q, want it to start with %q", i, errs[i], w)
		}
	}
}

func TestLoad(t *testing.T) {
	if _, err := Load("public-only"); err != nil {
		t.Errorf("preset: %v", err)
	}
	_, err := Load("/nonexistent/policy.json")
	if err == nil || !strings.Contains(err.Error(), "neither a preset") {
		t.Errorf("missing file: %v", err)
	}
}

func TestDescribe(t *testing.T) {
	e := mustCompile(t, `{"default_action": "deny", "rules": [
		{"destination": {"group": "private"}, "protocols": ["tcp"], "ports": [{"start": 443, "end": 443}, {"start": 8000, "end": 8100}], "action": "deny"}]}`, Options{})
	if got, want := e.Describe(0), "rules[0]: deny egress tcp to group private ports 443,8000-8100"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	if got := e.Describe(-1); got != "default_action deny" {
		t.Errorf("got %q", got)
	}
}

func FuzzParseFile(f *testing.F) {
	f.Add([]byte(`{"default_action": "allow", "rules": [{"direction": "egress", "destination": {"group": "private"}, "protocols": ["tcp"], "ports": [{"start": 443, "end": 443}], "action": "deny"}]}`))
	f.Add([]byte(`{"default_action": "deny", "rules": [{"destination": {"domain_suffix": "example.com"}, "action": "allow"}, {"destination": "any", "action": "terminate"}]}`))
	f.Add([]byte(`{"default_action": "deny", "rules": [{"direction": "ingress", "source": {"cidr": "::ffff:10.0.0.0/104"}, "action": "allow"}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		pf, err := ParseFile(b)
		if err != nil {
			return
		}
		e, err := Compile(pf, Options{Host: host, Pins: NewPins(16)})
		if err != nil {
			t.Fatalf("ParseFile accepted what Compile rejects: %v", err)
		}
		for _, fl := range []Flow{flow(TCP, "198.51.100.1:443"), flow(ICMP, "10.0.0.1"), {Direction: Ingress, Proto: UDP, Src: src4, Dst: src4}} {
			d := e.Check(fl)
			if d.Rule >= len(pf.Rules) {
				t.Fatalf("rule index %d out of range", d.Rule)
			}
			_ = e.Describe(d.Rule)
		}
		e.CheckQuery("www.example.com")
	})
}

func BenchmarkCheck100Rules(b *testing.B) {
	var sb strings.Builder
	sb.WriteString(`{"default_action": "allow", "rules": [`)
	for i := 0; i < 99; i++ {
		fmt.Fprintf(&sb, `{"destination": {"cidr": "10.%d.0.0/16"}, "protocols": ["tcp"], "ports": [{"start": %d, "end": %d}], "action": "deny"},`, i, 1000+i, 2000+i)
	}
	sb.WriteString(`{"destination": {"domain_suffix": "example.com"}, "action": "deny"}]}`)
	pins := NewPins(0)
	e := mustCompile(b, sb.String(), Options{Pins: pins})
	fl := flow(TCP, "198.51.100.10:443")
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if e.Check(fl).Action != Allow {
			b.Fatal("wrong decision")
		}
	}
}

func TestHTTPRules(t *testing.T) {
	pins := NewPins(0)
	e := mustCompile(t, `{"default_action": "deny", "rules": [
		{"destination": {"domain": "api.github.com"}, "http": {"methods": ["GET"], "paths": ["/repos/org/*", "/user"]}, "action": "allow"},
		{"destination": {"domain_suffix": "github.com"}, "http": {"methods": ["DELETE"]}, "action": "terminate"},
		{"destination": {"domain": "web.test"}, "action": "allow"}]}`, Options{Pins: pins})
	ip := netip.MustParseAddr("198.51.100.7")
	pins.Add(ip, "api.github.com", time.Minute)
	f := flow(TCP, "198.51.100.7:443")
	// The flow starts (its requests decide) whatever the rule's action.
	if d := e.Check(f); d.Action != Allow || !d.PerRequest || !d.ByName || d.Rule != 0 {
		t.Fatalf("flow: %+v", d)
	}
	f.Domain = "api.github.com"
	for _, tc := range []struct {
		method, path string
		want         Action
		rule         int
	}{
		{"GET", "/repos/org/x/issues", Allow, 0},
		{"GET", "/user", Allow, 0},
		{"GET", "/users", Allow, 0}, // a prefix
		{"GET", "/repos/other/x", Deny, -1},
		{"POST", "/repos/org/x", Deny, -1},
		{"DELETE", "/repos/org/x", Terminate, 1},
	} {
		if d := e.CheckRequest(f, tc.method, tc.path); d.Action != tc.want || d.Rule != tc.rule {
			t.Errorf("%s %s: %+v, want %v by %d", tc.method, tc.path, d, tc.want, tc.rule)
		}
	}
	// A rule without HTTP conditions decides every request of its host.
	if d := e.CheckRequest(withName(f, "web.test"), "POST", "/anything"); d.Action != Allow || d.Rule != 2 {
		t.Errorf("web.test: %+v", d)
	}
	if !e.HasHTTPRules() || !e.HasDomainRules() {
		t.Error("HasHTTPRules or HasDomainRules is false")
	}
	for _, bad := range []string{
		`{"rules": [{"destination": {"cidr": "10.0.0.0/8"}, "http": {}, "action": "allow"}]}`,
		`{"rules": [{"destination": {"domain": "a.test"}, "protocols": ["udp"], "http": {}, "action": "allow"}]}`,
		`{"rules": [{"destination": {"domain": "a.test"}, "http": {"methods": ["get"]}, "action": "allow"}]}`,
		`{"rules": [{"destination": {"domain": "a.test"}, "http": {"paths": ["repos"]}, "action": "allow"}]}`,
	} {
		if _, err := ParseFile([]byte(bad)); err == nil {
			t.Errorf("accepted: %s", bad)
		}
	}
}

func withName(f Flow, n string) Flow {
	f.Domain = n
	return f
}

func TestPathGlobs(t *testing.T) {
	for _, tc := range []struct {
		pattern, path string
		want          bool
	}{
		{"/v1/", "/v1/x", true}, {"/v1/", "/v2/x", false},
		{"/repos/*/issues", "/repos/a/b/issues", true}, {"/repos/*/issues", "/repos/a/pulls", false},
		{"/a*b*c", "/abc", true}, {"/a*b*c", "/ac", false}, {"*", "/anything", true},
	} {
		if got := pathMatches(tc.pattern, tc.path); got != tc.want {
			t.Errorf("%q ~ %q = %v", tc.pattern, tc.path, got)
		}
	}
}

// QUIC is refused where names are checked, DNS over TLS wherever domain
// rules are; neither is fatal.
func TestSideDoors(t *testing.T) {
	pins := NewPins(0)
	e := mustCompile(t, `{"default_action": "allow", "rules": [{"destination": {"domain": "web.test"}, "action": "allow"}]}`, Options{Pins: pins, DenyIsFatal: true})
	pins.Add(netip.MustParseAddr("198.51.100.7"), "web.test", time.Minute)
	if d := e.Check(flow(UDP, "198.51.100.7:443")); d.Action != Deny || d.Rule != RuleQUIC {
		t.Errorf("QUIC to a pinned name: %+v", d)
	}
	if d := e.Check(flow(UDP, "198.51.100.8:443")); d.Action != Allow {
		t.Errorf("QUIC to an address the default allows: %+v", d)
	}
	if d := e.Check(flow(TCP, "198.51.100.8:853")); d.Action != Deny || d.Rule != RuleDoT {
		t.Errorf("DNS over TLS: %+v", d)
	}
	all := mustCompile(t, `{"default_action": "allow"}`, Options{RefuseQUIC: true})
	if d := all.Check(flow(UDP, "198.51.100.8:443")); d.Rule != RuleQUIC {
		t.Errorf("QUIC with RefuseQUIC: %+v", d)
	}
	if d := all.Check(flow(TCP, "198.51.100.8:853")); d.Action != Allow {
		t.Errorf("DNS over TLS without domain rules: %+v", d)
	}
}
