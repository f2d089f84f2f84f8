package settings

import (
	"encoding/json"
	"errors"
	"io"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/msbtap/msbtap/internal/fielderr"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// mapSource is a Source from a map, with run's defaults.
type mapSource map[string]any

var defaults = mapSource{"tap": "eth0", "ready-fd": -1, "tap-owner": -1, "offload": "on", "fast-path": "off", "seccomp": "on", "memory-limit": "48MiB",
	"log-format": "text", "log-level": "info", "max-connections": 256, "policy": "public-only", "deny-mode": "reject",
	"on-violation": "deny", "audit-log-max-size": "64MiB", "pcap-max-size": "100MiB", "rate-up": "off", "rate-down": "off",
	"tls-intercept": "auto"}

func (m mapSource) get(n string) any {
	if v, ok := m[n]; ok {
		return v
	}
	return defaults[n]
}
func (m mapSource) String(n string) string                { s, _ := m.get(n).(string); return s }
func (m mapSource) Int(n string) int                      { i, _ := m.get(n).(int); return i }
func (m mapSource) Bool(n string) bool                    { b, _ := m.get(n).(bool); return b }
func (m mapSource) Float(n string) float64                { f, _ := m.get(n).(float64); return f }
func (m mapSource) Strings(n string) []string             { s, _ := m.get(n).([]string); return s }
func (m mapSource) IsGiven(n string) bool                 { _, ok := m[n]; return ok }
func (m mapSource) InlinePolicy() (json.RawMessage, bool) { return nil, false }
func (m mapSource) Args() []string                        { s, _ := m["args"].([]string); return s }
func (m mapSource) Err() error                            { return nil }

func TestBuild(t *testing.T) {
	cfg, err := Build(mapSource{"netns": "sb1", "rate-down": "50mbit", "tls-intercept": "all"}, io.Discard)
	if err != nil || cfg.Netns != "/run/netns/sb1" || cfg.RateDown != 50e6/8 || cfg.TLS.Mode.String() != "all" {
		t.Fatalf("%+v %v", cfg, err)
	}
	if _, err := Build(mapSource{}, io.Discard); !errors.Is(err, ErrNothingToAttach) {
		t.Errorf("nothing to attach: %v", err)
	}
	// Errors name the setting, never a flag.
	for _, tc := range []struct {
		s    mapSource
		want string
	}{
		{mapSource{"netns": "x", "rate-up": "fast"}, "rate_up"},
		{mapSource{"netns": "x", "user": "nobody"}, "user"},
		{mapSource{"netns": "x", "vm": true}, "netns"},
		{mapSource{"netns": "x", "pprof": true}, "pprof"},
		{mapSource{"netns": "x", "secret": []string{"NOHOST"}}, "secret"},
		{mapSource{"netns": "x", "tls-bypass": []string{"*"}}, "tls_bypass"},
	} {
		_, err := Build(tc.s, io.Discard)
		var fe *fielderr.Error
		if !errors.As(err, &fe) || fe.Field != tc.want || strings.Contains(err.Error(), "--") {
			t.Errorf("%v: %v, want an error naming %s", tc.s, err, tc.want)
		}
	}
}
