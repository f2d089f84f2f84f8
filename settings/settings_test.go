package settings

import (
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/msbtap/msbtap/internal/fielderr"
	"github.com/msbtap/msbtap/sandbox"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// mapSource is a Source from a map, with run's defaults.
type mapSource map[string]any

var defaults = mapSource{"tap": "eth0", "ready-fd": -1, "terminated-fd": -1, "tap-owner": -1, "offload": "on", "fast-path": "off", "seccomp": "on", "memory-limit": "48MiB",
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
	cfg, err = Build(mapSource{"netns": "sb1", "allow": []string{"pypi,npm", "github"}}, io.Discard)
	if err != nil || len(cfg.Allow) != 3 || cfg.Allow[2].Destination.Preset != "github" || cfg.Allow[0].Action != "allow" {
		t.Errorf("--allow: %+v %v", cfg.Allow, err)
	}
	cfg, err = Build(mapSource{"netns": "sb1", "learn": "learned.json", "learn-suffix-depth": 3}, io.Discard)
	if err != nil || !strings.HasSuffix(cfg.Learn, "/learned.json") || !strings.HasPrefix(cfg.Learn, "/") || cfg.LearnSuffixDepth != 3 {
		t.Errorf("--learn: %q %d %v", cfg.Learn, cfg.LearnSuffixDepth, err)
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
		{mapSource{"netns": "x", "allow": []string{"nosuch"}}, "allow"},
		{mapSource{"netns": "x", "learn-suffix-depth": 2}, "learn_suffix_depth"},
		{mapSource{"netns": "x", "ask-timeout": "soon"}, "ask_timeout"},
		{mapSource{"netns": "x", "ask-timeout": "1ms"}, "ask_timeout"},
		{mapSource{"netns": "x", "learn": "/tmp/l.json", "learn-suffix-depth": 1}, "learn_suffix_depth"},
		{mapSource{"netns": "x", "learn": "/nonexistent-dir/l.json"}, "learn"},
		{mapSource{"netns": "x", "env": []string{"A=1"}}, "env"},
		{mapSource{"args": []string{"true"}, "env": []string{"1A=1"}}, "env"},
		{mapSource{"args": []string{"true"}, "env": []string{"A-B"}}, "env"},
		{mapSource{"args": []string{"true"}, "bind": []string{"/nonexistent/msbtap"}}, "bind"},
		{mapSource{"args": []string{"true"}, "bind-ro": []string{"/"}}, "bind_ro"},
		{mapSource{"args": []string{"true"}, "vm": true, "bind": []string{"/etc"}}, "bind"},
		{mapSource{"netns": "x", "upstream-proxy-bypass": []string{"10.0.0.0/8"}}, "upstream_proxy_bypass"},
		{mapSource{"netns": "x", "upstream-proxy-credentials-env": "X"}, "upstream_proxy_credentials_env"},
	} {
		_, err := Build(tc.s, io.Discard)
		var fe *fielderr.Error
		if !errors.As(err, &fe) || fe.Field != tc.want || strings.Contains(err.Error(), "--") {
			t.Errorf("%v: %v, want an error naming %s", tc.s, err, tc.want)
		}
	}
}

// TestCommandSettings: --env and the binds reach the agent's Config, a
// relative bind made absolute; without --user and sudo the command is
// never root.
func TestCommandSettings(t *testing.T) {
	os.Unsetenv("SUDO_UID")
	dir := t.TempDir()
	t.Chdir(dir)
	os.Mkdir("work", 0o755)
	cfg, err := Build(mapSource{"args": []string{"true"}, "env": []string{"A", "B=x,y"},
		"bind": []string{"work"}, "bind-ro": []string{"/etc"}}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(cfg.CommandEnv, []string{"A", "B=x,y"}) {
		t.Errorf("env: %q", cfg.CommandEnv)
	}
	want := []sandbox.Bind{{Path: filepath.Join(dir, "work")}, {Path: "/etc", ReadOnly: true}}
	if !slices.Equal(cfg.CommandBinds, want) {
		t.Errorf("binds: %+v, want %+v", cfg.CommandBinds, want)
	}
	if cfg.CommandUID == 0 || cfg.CommandGID == 0 {
		t.Errorf("the command runs as %d:%d by default", cfg.CommandUID, cfg.CommandGID)
	}
	if cfg, err = Build(mapSource{"args": []string{"true"}, "user": "root"}, io.Discard); err != nil || cfg.CommandUID != 0 {
		t.Errorf("--user root: %d %v", cfg.CommandUID, err)
	}
}
