package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
)

// File is a policy as written in JSON (snake_case):
//
//	{"default_action": "deny",
//	 "rules": [
//	   {"direction": "egress", "destination": {"domain_suffix": "example.com"},
//	    "protocols": ["tcp"], "ports": [{"start": 443, "end": 443}],
//	    "action": "allow"}]}
type File struct {
	DefaultAction string `json:"default_action"`
	// Resolve says which names the sandbox may resolve under default
	// deny: "listed" (the default) or "all"; see ResolveListed.
	Resolve string     `json:"resolve,omitempty"`
	Rules   []FileRule `json:"rules"`
}

// FileRule is one rule of a policy file.
type FileRule struct {
	// Direction is "egress" (default) or "ingress".
	Direction string `json:"direction,omitempty"`
	// Destination is what an egress rule matches: "any" or an object with
	// one of cidr, domain, domain_suffix, group. For ingress rules it is
	// the sandbox side and may be omitted.
	Destination *Target `json:"destination,omitempty"`
	// Source is what an ingress rule matches (the host client); egress
	// rules must not set it.
	Source *Target `json:"source,omitempty"`
	// Protocols: tcp, udp, icmp, icmpv6, and dns (resolving the rule's
	// names, no connection); empty means any.
	Protocols []string `json:"protocols,omitempty"`
	// Ports are inclusive ranges; empty means any. A rule with ports
	// never matches ICMP.
	Ports []PortRange `json:"ports,omitempty"`
	// HTTP narrows an egress domain rule to some requests: it is decided
	// per request, on intercepted connections (see HTTPRule).
	HTTP *HTTPRule `json:"http,omitempty"`
	// Action is allow, deny or terminate.
	Action string `json:"action"`
}

// HTTPRule matches requests by method and path. Methods are upper-case
// tokens (any if empty). A path without '*' is a prefix; in one with '*',
// each '*' matches any run of characters, '/' included, and the whole path
// must match (any if empty). The query string is not part of the path.
type HTTPRule struct {
	Methods []string `json:"methods,omitempty"`
	Paths   []string `json:"paths,omitempty"`
}

// PortRange is an inclusive range of ports.
type PortRange struct {
	Start uint16 `json:"start"`
	End   uint16 `json:"end"`
}

// Target is a rule's destination or source.
type Target struct {
	Any          bool   `json:"-"`
	CIDR         string `json:"cidr,omitempty"`
	Domain       string `json:"domain,omitempty"`
	DomainSuffix string `json:"domain_suffix,omitempty"`
	Group        string `json:"group,omitempty"`
	// Preset names a group of names kept with msbtap (pypi, github, …;
	// see NamePreset).
	Preset string `json:"preset,omitempty"`
}

// UnmarshalJSON accepts "any" or an object with exactly one field.
func (t *Target) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		if s != "any" {
			return fmt.Errorf("%q: want \"any\" or an object with cidr, domain, domain_suffix, group or preset", s)
		}
		*t = Target{Any: true}
		return nil
	}
	type plain Target
	var p plain
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(&p); err != nil {
		return fmt.Errorf("want \"any\" or an object with cidr, domain, domain_suffix, group or preset: %v", cleanJSONErr(err))
	}
	*t = Target(p)
	return nil
}

// MarshalJSON writes "any" or the object form.
func (t Target) MarshalJSON() ([]byte, error) {
	if t.Any {
		return []byte(`"any"`), nil
	}
	type plain Target
	return json.Marshal(plain(t))
}

// Errors is every problem found in one policy, each naming its rule index
// and field, e.g. `rules[2].ports[0]: start 500 is after end 400`.
type Errors []error

func (e Errors) Error() string {
	lines := make([]string, len(e))
	for i, err := range e {
		lines[i] = err.Error()
	}
	return strings.Join(lines, "\n")
}

// Unwrap returns the errors, for errors.Is and errors.As.
func (e Errors) Unwrap() []error { return e }

// ParseFile parses and validates a policy in JSON. It reports every problem
// it finds, not only the first, as Errors.
func ParseFile(data []byte) (*File, error) {
	var raw struct {
		DefaultAction *string           `json:"default_action"`
		Resolve       string            `json:"resolve"`
		Rules         []json.RawMessage `json:"rules"`
	}
	d := json.NewDecoder(bytes.NewReader(data))
	d.DisallowUnknownFields()
	if err := d.Decode(&raw); err != nil {
		return nil, Errors{fmt.Errorf("policy: %v", cleanJSONErr(err))}
	}
	if d.More() {
		return nil, Errors{errors.New("policy: trailing data after the JSON object")}
	}
	var errs Errors
	f := &File{}
	if raw.DefaultAction == nil {
		errs = append(errs, errors.New("policy: default_action: missing (want allow, deny, terminate or ask)"))
	} else {
		f.DefaultAction = *raw.DefaultAction
		if _, err := ParseAction(f.DefaultAction); err != nil {
			errs = append(errs, fmt.Errorf("policy: default_action: %v", err))
		}
	}
	f.Resolve = raw.Resolve
	if raw.Resolve != "" && raw.Resolve != ResolveListed && raw.Resolve != ResolveAll {
		errs = append(errs, fmt.Errorf("policy: resolve: %q: want %s or %s", raw.Resolve, ResolveListed, ResolveAll))
	}
	for i, rr := range raw.Rules {
		var r FileRule
		rd := json.NewDecoder(bytes.NewReader(rr))
		rd.DisallowUnknownFields()
		if err := rd.Decode(&r); err != nil {
			errs = append(errs, fmt.Errorf("policy: rules[%d]: %v", i, cleanJSONErr(err)))
			continue
		}
		for _, err := range ruleErrors(r) {
			errs = append(errs, fmt.Errorf("policy: rules[%d].%v", i, err))
		}
		f.Rules = append(f.Rules, r)
	}
	if len(errs) > 0 {
		return nil, errs
	}
	return f, nil
}

// LoadFile reads and parses a policy file; every error names the file.
func LoadFile(path string) (*File, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("policy file: %w", err)
	}
	f, err := ParseFile(b)
	if err != nil {
		var errs Errors
		errors.As(err, &errs)
		for i := range errs {
			errs[i] = fmt.Errorf("%s: %w", path, errs[i])
		}
		return nil, errs
	}
	return f, nil
}

// cleanJSONErr makes encoding/json's messages read as field errors.
func cleanJSONErr(err error) string {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		return fmt.Sprintf("%s: want %s, got %s", te.Field, te.Type, te.Value)
	}
	s := err.Error()
	s = strings.TrimPrefix(s, "json: ")
	return s
}

// ParseAction parses allow, deny, terminate or ask.
func ParseAction(s string) (Action, error) {
	switch s {
	case "allow":
		return Allow, nil
	case "deny":
		return Deny, nil
	case "terminate":
		return Terminate, nil
	case "ask":
		return Ask, nil
	}
	return 0, fmt.Errorf("%q: want allow, deny, terminate or ask", s)
}

// ParseProto parses a protocol name.
func ParseProto(s string) (Proto, error) {
	switch s {
	case "tcp":
		return TCP, nil
	case "udp":
		return UDP, nil
	case "icmp":
		return ICMP, nil
	case "icmpv6":
		return ICMPv6, nil
	case "dns":
		return DNS, nil
	}
	return 0, fmt.Errorf("%q: want tcp, udp, icmp, icmpv6 or dns", s)
}

// targetKind says how a compiled target matches.
type targetKind uint8

const (
	matchAny targetKind = iota
	matchCIDR
	matchDomain
	matchSuffix
	matchGroup
	matchPreset // any of a NamePreset's names
)

type target struct {
	kind   targetKind
	prefix netip.Prefix
	name   string // lower case, no trailing dot; suffix without leading dot
	group  Group
	preset *NamePreset
}

// byName reports whether the target matches names rather than addresses.
func (t *target) byName() bool {
	return t.kind == matchDomain || t.kind == matchSuffix || t.kind == matchPreset
}

func compileTarget(t *Target) (target, error) {
	if t == nil || t.Any {
		return target{kind: matchAny}, nil
	}
	n := 0
	for _, s := range []string{t.CIDR, t.Domain, t.DomainSuffix, t.Group, t.Preset} {
		if s != "" {
			n++
		}
	}
	if n != 1 {
		return target{}, errors.New("want exactly one of cidr, domain, domain_suffix, group, preset")
	}
	switch {
	case t.CIDR != "":
		p, err := netip.ParsePrefix(t.CIDR)
		if err != nil {
			a, aerr := netip.ParseAddr(t.CIDR)
			if aerr != nil {
				return target{}, fmt.Errorf("cidr: %q is not an address or prefix", t.CIDR)
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		if p.Addr().Is4In6() {
			if p.Bits() < 96 {
				return target{}, fmt.Errorf("cidr: %q: a prefix of IPv4-mapped addresses must be /96 or longer (it is matched as IPv4)", t.CIDR)
			}
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		return target{kind: matchCIDR, prefix: p.Masked()}, nil
	case t.Domain != "":
		name, err := normName(t.Domain)
		if err != nil {
			return target{}, fmt.Errorf("domain: %v", err)
		}
		return target{kind: matchDomain, name: name}, nil
	case t.DomainSuffix != "":
		name, err := normName(strings.TrimPrefix(t.DomainSuffix, "."))
		if err != nil {
			return target{}, fmt.Errorf("domain_suffix: %v", err)
		}
		return target{kind: matchSuffix, name: name}, nil
	case t.Preset != "":
		p, ok := LookupNamePreset(t.Preset)
		if !ok {
			return target{}, fmt.Errorf("preset: %q: want one of %s", t.Preset, strings.Join(NamePresetNames(), ", "))
		}
		return target{kind: matchPreset, preset: p}, nil
	default:
		g, err := ParseGroup(t.Group)
		if err != nil {
			return target{}, fmt.Errorf("group: %v", err)
		}
		return target{kind: matchGroup, group: g}, nil
	}
}

// normName is NormalizeName, for names in policy files and block lists.
func normName(s string) (string, error) { return NormalizeName(s) }

type rule struct {
	dir    Direction
	protos uint8 // bit per Proto; 0 = any
	ports  []PortRange
	dst    target
	src    target
	http   *HTTPRule // nil: decides whole flows
	action Action
}

// compileRule compiles one rule, or returns its first error.
func compileRule(r FileRule) (rule, error) {
	c, errs := compileRuleAll(r)
	if len(errs) > 0 {
		return c, errs[0]
	}
	return c, nil
}

// ruleErrors returns every problem of one rule.
func ruleErrors(r FileRule) []error {
	_, errs := compileRuleAll(r)
	return errs
}

func compileRuleAll(r FileRule) (c rule, errs []error) {
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	switch r.Direction {
	case "", "egress":
		c.dir = Egress
		if r.Source != nil {
			bad("source: only ingress rules have a source")
		}
	case "ingress":
		c.dir = Ingress
	default:
		bad("direction: %q: want egress or ingress", r.Direction)
	}
	if c.dir == Egress && r.Destination == nil {
		bad("destination: missing (use \"any\" to match every destination)")
	}
	var err error
	if c.dst, err = compileTarget(r.Destination); err != nil {
		bad("destination: %v", err)
	}
	if c.src, err = compileTarget(r.Source); err != nil {
		bad("source: %v", err)
	}
	if c.dir == Ingress && (c.dst.byName() || c.src.byName()) {
		bad("source: ingress rules match addresses, not domains")
	}
	for i, p := range r.Protocols {
		pr, err := ParseProto(p)
		if err != nil {
			bad("protocols[%d]: %v", i, err)
			continue
		}
		c.protos |= 1 << pr
	}
	for i, pr := range r.Ports {
		if pr.Start == 0 {
			bad("ports[%d]: start must be 1..65535", i)
			continue
		}
		if pr.End == 0 {
			pr.End = pr.Start
		}
		if pr.Start > pr.End {
			bad("ports[%d]: start %d is after end %d", i, pr.Start, pr.End)
			continue
		}
		c.ports = append(c.ports, pr)
	}
	if c.protos&(1<<DNS) != 0 {
		switch {
		case c.dir != Egress || !c.dst.byName():
			bad("protocols: dns is for rules to a domain, domain_suffix or preset (it decides whether the names resolve)")
		case c.protos == 1<<DNS && len(c.ports) > 0:
			bad("ports: a dns rule decides lookups, which have no port")
		}
	}
	if r.HTTP != nil {
		if c.dir != Egress || !c.dst.byName() {
			bad("http: only egress rules to a domain, domain_suffix or preset decide requests")
		}
		if c.protos&^(1<<TCP) != 0 {
			bad("http: requests run over tcp; the rule's protocols say otherwise")
		}
		for i, m := range r.HTTP.Methods {
			if !isMethod(m) {
				bad("http.methods[%d]: %q is not an upper-case method token like GET or PROPFIND", i, m)
			}
		}
		for i, p := range r.HTTP.Paths {
			if !strings.HasPrefix(p, "/") {
				bad("http.paths[%d]: %q must start with /", i, p)
			}
		}
		c.http = r.HTTP
	}
	if r.Action == "" {
		bad("action: missing (want allow, deny, terminate or ask)")
	} else if c.action, err = ParseAction(r.Action); err != nil {
		bad("action: %v", err)
	}
	if c.action == Ask && (c.http != nil || c.dir != Egress) {
		bad("action: ask holds new egress flows; it decides no ingress and no single requests")
	}
	// A preset states the ports its registry serves on: an allowing rule
	// that states none of its own allows TCP to those. A deny keeps to
	// what it says (every port, if it says none).
	if c.dst.kind == matchPreset && c.action == Allow {
		if len(r.Ports) == 0 {
			c.ports = c.dst.preset.portRanges()
		}
		if len(r.Protocols) == 0 {
			c.protos = 1 << TCP
		}
	}
	return c, errs
}

// isMethod reports whether m is an RFC 9110 token without lower-case
// letters: requests' methods are compared with a rule's as written, so a
// rule's "get" would match nothing a client sends as GET.
func isMethod(m string) bool {
	if m == "" {
		return false
	}
	for i := 0; i < len(m); i++ {
		c := m[i]
		switch {
		case c >= 'A' && c <= 'Z', c >= '0' && c <= '9', strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0:
		default:
			return false
		}
	}
	return true
}
