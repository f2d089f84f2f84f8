package policy

import (
	"bytes"
	"embed"
	"encoding/json"
	"fmt"
	"path"
	"sort"
	"strings"
)

// NamePreset is a named, documented group of the names a package manager
// or code host uses (pypi, npm, github, …), kept as data in
// policy/presets/*.json. A rule names one as its destination
// ({"preset": "pypi"}) and matches those names as domain and
// domain_suffix rules do, through the DNS pins and the SNI and Host checks.
// An allowing rule that gives no ports or protocols of its own gets the
// preset's: TCP to Ports.
type NamePreset struct {
	Name        string `json:"name"`
	Description string `json:"description"`
	// Sources say where each list comes from (the registry's own
	// documentation), so that a reviewer can check it.
	Sources []string `json:"sources"`
	// Ports the registry serves on: 443, and 80 where its clients fetch
	// over plain HTTP (signed archives such as Debian's).
	Ports []uint16 `json:"ports"`
	// Domains are exact names; DomainSuffixes match the name and every
	// name under it.
	Domains        []string `json:"domains,omitempty"`
	DomainSuffixes []string `json:"domain_suffixes,omitempty"`

	names []target // compiled Domains and DomainSuffixes
}

//go:embed presets/*.json
var namePresetFiles embed.FS

// namePresets are the presets by name, loaded once from the embedded files;
// a bad file is a build mistake the package's tests catch.
var namePresets = mustLoadNamePresets()

func mustLoadNamePresets() map[string]*NamePreset {
	m, err := loadNamePresets()
	if err != nil {
		panic(err)
	}
	return m
}

func loadNamePresets() (map[string]*NamePreset, error) {
	files, err := namePresetFiles.ReadDir("presets")
	if err != nil {
		return nil, err
	}
	m := map[string]*NamePreset{}
	for _, f := range files {
		b, err := namePresetFiles.ReadFile("presets/" + f.Name())
		if err != nil {
			return nil, err
		}
		p, err := parseNamePreset(b)
		if err != nil {
			return nil, fmt.Errorf("policy/presets/%s: %w", f.Name(), err)
		}
		if want := strings.TrimSuffix(f.Name(), path.Ext(f.Name())); p.Name != want {
			return nil, fmt.Errorf("policy/presets/%s: name %q: want the file's name %q", f.Name(), p.Name, want)
		}
		m[p.Name] = p
	}
	return m, nil
}

// parseNamePreset parses and checks one preset file: every entry a valid
// name, at least one port, a source for the list.
func parseNamePreset(b []byte) (*NamePreset, error) {
	var p NamePreset
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(&p); err != nil {
		return nil, fmt.Errorf("%s", cleanJSONErr(err))
	}
	switch {
	case p.Name == "":
		return nil, fmt.Errorf("name: missing")
	case len(p.Sources) == 0:
		return nil, fmt.Errorf("sources: missing (say where the list comes from)")
	case len(p.Ports) == 0:
		return nil, fmt.Errorf("ports: missing")
	case len(p.Domains)+len(p.DomainSuffixes) == 0:
		return nil, fmt.Errorf("no domains or domain_suffixes")
	}
	for i, port := range p.Ports {
		if port == 0 {
			return nil, fmt.Errorf("ports[%d]: 0 is no port", i)
		}
	}
	// The names go through the checks a domain rule's name does.
	for i, n := range p.Domains {
		name, err := normName(n)
		if err != nil {
			return nil, fmt.Errorf("domains[%d]: %v", i, err)
		}
		p.names = append(p.names, target{kind: matchDomain, name: name})
	}
	for i, n := range p.DomainSuffixes {
		name, err := normName(strings.TrimPrefix(n, "."))
		if err != nil {
			return nil, fmt.Errorf("domain_suffixes[%d]: %v", i, err)
		}
		p.names = append(p.names, target{kind: matchSuffix, name: name})
	}
	return &p, nil
}

// LookupNamePreset returns the preset called name.
func LookupNamePreset(name string) (*NamePreset, bool) {
	p, ok := namePresets[name]
	return p, ok
}

// NamePresetNames lists the presets, sorted.
func NamePresetNames() []string {
	n := make([]string, 0, len(namePresets))
	for k := range namePresets {
		n = append(n, k)
	}
	sort.Strings(n)
	return n
}

// portRanges returns the preset's ports as a rule's ranges.
func (p *NamePreset) portRanges() []PortRange {
	rs := make([]PortRange, len(p.Ports))
	for i, port := range p.Ports {
		rs[i] = PortRange{Start: port, End: port}
	}
	return rs
}

// Matches reports whether name is one of the preset's.
func (p *NamePreset) Matches(name string) bool {
	for i := range p.names {
		if nameMatches(&p.names[i], name) {
			return true
		}
	}
	return false
}

// AllowRules are the rules --allow adds before a policy's own: one allow
// rule per preset named in the comma-separated lists (each preset once,
// in order).
func AllowRules(lists []string) ([]FileRule, error) {
	var rules []FileRule
	seen := map[string]bool{}
	for _, l := range lists {
		for _, n := range strings.Split(l, ",") {
			n = strings.TrimSpace(n)
			if n == "" || seen[n] {
				continue
			}
			if _, ok := LookupNamePreset(n); !ok {
				return nil, fmt.Errorf("%q is no preset (want one of %s)", n, strings.Join(NamePresetNames(), ", "))
			}
			seen[n] = true
			rules = append(rules, FileRule{Destination: &Target{Preset: n}, Action: "allow"})
		}
	}
	return rules, nil
}

// WithRulesFirst returns a copy of f with rules before its own.
func WithRulesFirst(f *File, rules []FileRule) *File {
	if len(rules) == 0 {
		return f
	}
	g := *f
	g.Rules = append(append(make([]FileRule, 0, len(rules)+len(f.Rules)), rules...), f.Rules...)
	return &g
}

// Explain describes the preset for `msbtap policy explain --preset`.
func (p *NamePreset) Explain() string {
	var b strings.Builder
	fmt.Fprintf(&b, "preset %s: %s\n", p.Name, p.Description)
	ports := make([]string, len(p.Ports))
	for i, port := range p.Ports {
		ports[i] = fmt.Sprint(port)
	}
	fmt.Fprintf(&b, "ports: tcp %s (for an allow rule that gives none of its own)\n", strings.Join(ports, ", "))
	for _, n := range p.Domains {
		fmt.Fprintf(&b, "domain %s\n", n)
	}
	for _, n := range p.DomainSuffixes {
		fmt.Fprintf(&b, "domain_suffix %s (the name and every name under it)\n", n)
	}
	for _, s := range p.Sources {
		fmt.Fprintf(&b, "source: %s\n", s)
	}
	fmt.Fprintf(&b, "as a rule: {\"destination\": {\"preset\": %q}, \"action\": \"allow\"}; on the command line: msbtap run --allow %s\n", p.Name, p.Name)
	return b.String()
}
