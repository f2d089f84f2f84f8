package policy

import (
	"fmt"
	"os"
	"sort"
	"strings"
)

func grp(g string) *Target { return &Target{Group: g} }

var presets = map[string]*File{
	// none: nothing gets out.
	"none": {DefaultAction: "deny"},
	// public-only: public addresses only; never the host, cloud metadata,
	// loopback, private, link-local or multicast ranges.
	"public-only": {DefaultAction: "deny", Resolve: ResolveAll, Rules: []FileRule{
		{Destination: grp("host"), Action: "deny"},
		{Destination: grp("metadata"), Action: "deny"},
		{Destination: grp("public"), Action: "allow"},
	}},
	// non-local: public and private networks, but not the host itself,
	// loopback, link-local, metadata or multicast.
	"non-local": {DefaultAction: "deny", Resolve: ResolveAll, Rules: []FileRule{
		{Destination: grp("host"), Action: "deny"},
		{Destination: grp("metadata"), Action: "deny"},
		{Destination: grp("public"), Action: "allow"},
		{Destination: grp("private"), Action: "allow"},
	}},
	// allow-all: everything, the host included, but cloud metadata (which
	// only a rule naming the metadata group reaches).
	"allow-all": {DefaultAction: "allow", Rules: []FileRule{
		{Destination: grp("host"), Action: "allow"},
	}},
}

// DefaultPreset is the policy used when none is given.
const DefaultPreset = "public-only"

// Preset returns the named preset policy.
func Preset(name string) (*File, bool) {
	f, ok := presets[name]
	return f, ok
}

// PresetNames lists the presets.
func PresetNames() []string {
	var n []string
	for k := range presets {
		n = append(n, k)
	}
	sort.Strings(n)
	return n
}

// Load returns the preset called s, or else the policy file at path s.
func Load(s string) (*File, error) {
	if f, ok := Preset(s); ok {
		return f, nil
	}
	if _, err := os.Stat(s); err != nil {
		return nil, fmt.Errorf("%q is neither a preset (%s) nor a readable file: %w", s, strings.Join(PresetNames(), ", "), err)
	}
	return LoadFile(s)
}
