package policy

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

// Policies that open everything some broad way: none of them may reach
// what only a rule naming it reaches.
var broadPolicies = map[string]string{
	"default allow":          `{"default_action": "allow"}`,
	"allow any":              `{"default_action": "deny", "rules": [{"destination": "any", "action": "allow"}]}`,
	"allow public, private":  `{"default_action": "deny", "rules": [{"destination": {"group": "public"}, "action": "allow"}, {"destination": {"group": "private"}, "action": "allow"}, {"destination": {"group": "link_local"}, "action": "allow"}]}`,
	"allow 0.0.0.0/0, ::/0":  `{"default_action": "deny", "rules": [{"destination": {"cidr": "0.0.0.0/0"}, "action": "allow"}, {"destination": {"cidr": "::/0"}, "action": "allow"}]}`,
	"default allow, deny md": `{"default_action": "allow", "rules": [{"destination": {"cidr": "169.254.169.254"}, "action": "deny"}]}`,
}

func checkAll(t *testing.T, e *Engine, what string, dsts []string, want Action) {
	t.Helper()
	for _, dst := range dsts {
		for _, p := range []Proto{TCP, UDP} {
			if d := e.Check(flow(p, dst)); d.Action != want {
				t.Errorf("%s: %s %s: %s by %q, want %s", what, p, dst, d.Action, e.Describe(d.Rule), want)
			}
		}
	}
}

var metadataDsts = []string{
	"168.63.129.16:80", "168.63.129.16:32526", // Azure WireServer: a public address
	"169.254.169.254:80", "100.100.100.200:80", "169.254.170.2:80", "169.254.170.23:80",
	"[fd00:ec2::254]:80", "[fd20:ce::254]:80", "[fd00:c1::a9fe:a9fe]:80",
	"[::ffff:168.63.129.16]:80", "[64:ff9b::a83f:8110]:80", "[2002:a83f:8110::1]:80", // the WireServer embedded in IPv6
}

// TestMetadataOnlyByItsGroup: cloud metadata, Azure's public WireServer
// included, is refused under every preset and every broad allow, and a
// rule naming the metadata group is the one line that allows it.
func TestMetadataOnlyByItsGroup(t *testing.T) {
	if InGroup(netip.MustParseAddr("168.63.129.16"), GroupPublic, host) {
		t.Error("168.63.129.16 (Azure WireServer) is public")
	}
	if !InGroup(netip.MustParseAddr("168.63.129.16"), GroupMetadata, host) {
		t.Error("168.63.129.16 (Azure WireServer) is not metadata")
	}
	for _, name := range PresetNames() {
		f, _ := Preset(name)
		e, err := Compile(f, Options{Host: host})
		if err != nil {
			t.Fatal(err)
		}
		checkAll(t, e, "preset "+name, metadataDsts, Deny)
	}
	for what, js := range broadPolicies {
		e := mustCompile(t, js, Options{})
		checkAll(t, e, what, metadataDsts, Deny)
		if what == "default allow" {
			if d := e.Check(flow(TCP, "168.63.129.16:80")); d.Rule != RuleMetadata || !strings.Contains(e.Describe(d.Rule), `"metadata"`) {
				t.Errorf("default allow: refused by %d %q, want the metadata refusal", d.Rule, e.Describe(d.Rule))
			}
		}
	}
	// A CIDR or a name that covers the address exactly does not open it.
	pins := NewPins(0)
	e := mustCompile(t, `{"default_action": "deny", "rules": [
		{"destination": {"cidr": "168.63.129.16/32"}, "action": "allow"},
		{"destination": {"domain": "wireserver.test"}, "action": "allow"}]}`, Options{Pins: pins})
	pins.Add(netip.MustParseAddr("168.63.129.16"), "wireserver.test", time.Minute)
	checkAll(t, e, "cidr /32 and a pinned name", []string{"168.63.129.16:80"}, Deny)
	if d := e.Check(Flow{Proto: TCP, Src: src4, Dst: netip.MustParseAddrPort("168.63.129.16:80"), Domain: "wireserver.test"}); d.Action != Deny {
		t.Errorf("a name rule with the flow's name: %+v", d)
	}

	// The one line that allows it, and only it.
	e = mustCompile(t, `{"default_action": "deny", "rules": [{"destination": {"group": "metadata"}, "ports": [{"start": 80}], "action": "allow"}]}`, Options{})
	checkAll(t, e, "allow group metadata", metadataDsts[:1], Allow)
	checkAll(t, e, "allow group metadata, another port", []string{"168.63.129.16:81", "198.51.100.10:80"}, Deny)
	// After a broad allow, the metadata rule further down still decides.
	e = mustCompile(t, `{"default_action": "allow", "rules": [{"destination": "any", "action": "allow"}, {"destination": {"group": "metadata"}, "action": "allow"}]}`, Options{})
	if d := e.Check(flow(TCP, "169.254.169.254:80")); d.Action != Allow || d.Rule != 1 {
		t.Errorf("any, then metadata: %+v, want allow by rules[1]", d)
	}
	// Deny rules match as written, and a refusal is fatal where denies are.
	e = mustCompile(t, `{"default_action": "allow", "rules": [{"destination": {"cidr": "168.63.0.0/16"}, "action": "terminate"}]}`, Options{})
	if d := e.Check(flow(TCP, "168.63.129.16:80")); d.Action != Terminate || d.Rule != 0 {
		t.Errorf("terminate by cidr: %+v", d)
	}
	e = mustCompile(t, `{"default_action": "allow"}`, Options{DenyIsFatal: true})
	if d := e.Check(flow(TCP, "169.254.169.254:80")); d.Action != Terminate {
		t.Errorf("default allow, deny is fatal: %+v", d)
	}
}

// TestHostOnlyByItsGroup: a CIDR, a group or a name that covers one of the
// host's addresses never reaches it (nor an address the kernel calls
// local: CheckAsHost); only a rule naming the host group does.
func TestHostOnlyByItsGroup(t *testing.T) {
	hs := NewHostSet(gw4, gw6, netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("2001:db8::1"))
	hostDsts := []string{"198.51.100.1:8080", "[2001:db8::1]:8080", "100.96.0.1:22", "[fd42:6d73:62::1]:22", "[::ffff:198.51.100.1]:8080", "[64:ff9b::c633:6401]:8080"}
	cidr := `{"default_action": "deny", "rules": [{"destination": {"cidr": "198.51.100.0/24"}, "action": "allow"}, {"destination": {"cidr": "2001:db8::/32"}, "action": "allow"}, {"destination": {"cidr": "100.96.0.0/16"}, "action": "allow"}, {"destination": {"cidr": "fd42::/16"}, "action": "allow"}, {"destination": {"cidr": "64:ff9b::/96"}, "action": "allow"}]}`
	for what, js := range map[string]string{"cidr rules": cidr, "default allow": broadPolicies["default allow"],
		"allow any": broadPolicies["allow any"], "allow public, private": broadPolicies["allow public, private"]} {
		e := mustCompile(t, js, Options{Host: hs})
		checkAll(t, e, what, hostDsts, Deny)
		// An address the host gained after the set was read, or an AnyIP
		// route: the dial-time check decides it as the host.
		for _, dst := range []string{"198.51.100.77:8080", "[2001:db8::77]:8080"} {
			f := flow(TCP, dst)
			if d := e.Check(f); what == "cidr rules" && d.Action != Allow {
				t.Errorf("%s: %s, not the host's: %+v", what, dst, d)
			}
			if d := e.CheckAsHost(f); d.Action != Deny {
				t.Errorf("%s: %s as the host: %+v, want deny", what, dst, d)
			}
		}
	}
	e := mustCompile(t, cidr, Options{Host: hs})
	if d := e.Check(flow(TCP, "198.51.100.10:80")); d.Action != Allow || d.Rule != 0 {
		t.Errorf("another address in the range: %+v", d)
	}
	if d := mustCompile(t, `{"default_action": "allow"}`, Options{Host: hs}).Check(flow(TCP, "198.51.100.1:80")); d.Rule != RuleHost {
		t.Errorf("default allow to the host: refused by %d, want RuleHost", d.Rule)
	}
	// A name the sandbox resolved to the host's address does not open it.
	pins := NewPins(0)
	e = mustCompile(t, `{"default_action": "deny", "rules": [{"destination": {"domain": "host.test"}, "action": "allow"}]}`, Options{Host: hs, Pins: pins})
	pins.Add(netip.MustParseAddr("198.51.100.1"), "host.test", time.Minute)
	checkAll(t, e, "a pinned name", []string{"198.51.100.1:80"}, Deny)

	// A host rule allows it, as the host and as an address the kernel
	// calls local; the CIDR rule still decides the rest of its range.
	e = mustCompile(t, `{"default_action": "deny", "rules": [{"destination": {"cidr": "198.51.100.0/24"}, "action": "allow"}, {"destination": {"group": "host"}, "protocols": ["tcp"], "ports": [{"start": 8080}], "action": "allow"}]}`, Options{Host: hs})
	if d := e.Check(flow(TCP, "198.51.100.1:8080")); d.Action != Allow || d.Rule != 1 {
		t.Errorf("host rule: %+v, want allow by rules[1]", d)
	}
	if d := e.CheckAsHost(flow(TCP, "198.51.100.77:8080")); d.Action != Allow || d.Rule != 1 {
		t.Errorf("host rule, a local address: %+v, want allow by rules[1]", d)
	}
	if d := e.Check(flow(TCP, "198.51.100.1:8081")); d.Action != Deny {
		t.Errorf("host rule, another port: %+v", d)
	}
	// allow-all says it includes the host, and does.
	f, _ := Preset("allow-all")
	aa, _ := Compile(f, Options{Host: hs})
	checkAll(t, aa, "allow-all", hostDsts, Allow)
}

// TestLocalNAT64OnlyByItsPrefix: an address in 64:ff9b:1::/48 may carry
// any IPv4 address (metadata here), so only a CIDR rule within that
// prefix allows it.
func TestLocalNAT64OnlyByItsPrefix(t *testing.T) {
	dsts := []string{"[64:ff9b:1::a9fe:a9fe]:80", "[64:ff9b:1:a9fe:a9fe::]:80", "[64:ff9b:1:ffff::1]:443"}
	for what, js := range broadPolicies {
		checkAll(t, mustCompile(t, js, Options{}), what, dsts, Deny)
	}
	e := mustCompile(t, `{"default_action": "allow", "rules": [{"destination": {"group": "metadata"}, "action": "deny"}]}`, Options{})
	checkAll(t, e, "default allow, deny metadata", dsts, Deny)
	if d := e.Check(flow(TCP, dsts[0])); d.Rule != RuleLocalNAT64 {
		t.Errorf("refused by %d %q, want the local-use NAT64 refusal", d.Rule, e.Describe(d.Rule))
	}
	e = mustCompile(t, `{"default_action": "deny", "rules": [{"destination": {"cidr": "64:ff9b::/32"}, "action": "allow"}, {"destination": {"cidr": "64:ff9b:1::/48"}, "action": "allow"}]}`, Options{})
	checkAll(t, e, "a CIDR within it", dsts, Allow)
	if d := e.Check(flow(TCP, dsts[0])); d.Rule != 1 {
		t.Errorf("allowed by rules[%d], want rules[1] (the /32 around it does not name it)", d.Rule)
	}
	e = mustCompile(t, `{"default_action": "deny", "rules": [{"destination": {"cidr": "64:ff9b:1:a9fe::/64"}, "action": "allow"}]}`, Options{})
	checkAll(t, e, "a /64 within it", dsts[1:2], Allow)
	checkAll(t, e, "a /64 within it, outside the /64", []string{dsts[2]}, Deny)
}

// TestBroadcastAndMulticastNeverLeave: the host's subnets' broadcast
// addresses and every multicast address are refused under every policy.
func TestBroadcastAndMulticastNeverLeave(t *testing.T) {
	hs := NewHostSet(gw4, netip.MustParseAddr("198.51.100.1"))
	b, ok := SubnetBroadcast(netip.MustParsePrefix("198.51.100.1/24"))
	if !ok || b != netip.MustParseAddr("198.51.100.255") {
		t.Fatalf("broadcast of 198.51.100.1/24: %s %v", b, ok)
	}
	for _, p := range []string{"198.51.100.1/31", "198.51.100.1/32", "2001:db8::1/64"} {
		if b, ok := SubnetBroadcast(netip.MustParsePrefix(p)); ok {
			t.Errorf("%s has broadcast %s", p, b)
		}
	}
	if b, _ := SubnetBroadcast(netip.MustParsePrefix("10.77.0.1/20")); b != netip.MustParseAddr("10.77.15.255") {
		t.Errorf("broadcast of 10.77.0.1/20: %s", b)
	}
	hs.SetBroadcast(b)
	dsts := []string{"198.51.100.255:7002", "[::ffff:198.51.100.255]:7002", "[64:ff9b::c633:64ff]:7002",
		"255.255.255.255:67", "224.0.0.251:5353", "239.255.255.250:1900", "[ff02::fb]:5353", "[ff05::1:3]:547"}
	policies := map[string]string{
		"public-only": "", "allow-all": "",
		"cidr":          `{"default_action": "deny", "rules": [{"destination": {"cidr": "198.51.100.0/24"}, "action": "allow"}, {"destination": {"cidr": "224.0.0.0/4"}, "action": "allow"}, {"destination": {"cidr": "ff00::/8"}, "action": "allow"}]}`,
		"group":         `{"default_action": "deny", "rules": [{"destination": {"group": "multicast"}, "action": "allow"}]}`,
		"default allow": broadPolicies["default allow"],
	}
	for what, js := range policies {
		var e *Engine
		if js == "" {
			f, _ := Preset(what)
			e, _ = Compile(f, Options{Host: hs})
		} else {
			e = mustCompile(t, js, Options{Host: hs, DenyIsFatal: true})
		}
		for _, dst := range dsts {
			if d := e.Check(flow(UDP, dst)); d.Action != Deny || d.Rule != RuleBroadcast {
				t.Errorf("%s: udp %s: %s by %q, want a (non-fatal) broadcast refusal", what, dst, d.Action, e.Describe(d.Rule))
			}
		}
		if what == "cidr" {
			checkAll(t, e, what, []string{"198.51.100.254:7002"}, Allow)
		}
	}
	// The broadcast set follows the host: a subnet gone, its broadcast is
	// an ordinary address again.
	hs.SetBroadcast()
	e := mustCompile(t, policies["cidr"], Options{Host: hs})
	checkAll(t, e, "no broadcast known", []string{"198.51.100.255:7002"}, Allow)
	if InGroup(netip.MustParseAddr("198.51.100.255"), GroupPublic, nil) != true {
		t.Error("198.51.100.255 with no host set: not public")
	}
}
