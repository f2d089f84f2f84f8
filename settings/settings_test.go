package settings

import (
	"encoding/json"
	"errors"
	"fmt"
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

// mapSource is a Source from a map by setting name; "args" is the
// command.
type mapSource map[string]any

func (m mapSource) Lookup(s *Setting, v any) (bool, error) {
	x, ok := m[s.Name]
	if !ok {
		return false, nil
	}
	switch v := v.(type) {
	case *string:
		*v = x.(string)
	case *int:
		*v = x.(int)
	case *bool:
		*v = x.(bool)
	case *float64:
		*v = x.(float64)
	case *[]string:
		*v = x.([]string)
	}
	return true, nil
}
func (m mapSource) Object(*Setting) (json.RawMessage, bool) { return nil, false }
func (m mapSource) Args() []string                          { s, _ := m["args"].([]string); return s }

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

// TestTable: each setting's default is of its kind's type, names are
// unique, and every one has help.
func TestTable(t *testing.T) {
	seen := map[string]bool{}
	for _, s := range All() {
		if seen[s.Name] || s.Usage == "" || s.value == nil {
			t.Errorf("%s: a second time, or without usage or value", s.Name)
		}
		seen[s.Name] = true
		if s.Default == nil {
			continue
		}
		if got := fmt.Sprintf("%T", s.Default); got != s.Kind().String() {
			t.Errorf("%s: default %v is a %s, want %s", s.Name, s.Default, got, s.Kind())
		}
	}
}

// TestChoicesSorted: a wrong choice lists the choices in one order, every
// time.
func TestChoicesSorted(t *testing.T) {
	for _, tc := range []struct{ name, want string }{
		{"offload", `offload "x": want one of off, on`},
		{"deny-mode", `deny_mode "x": want one of drop, reject`},
		{"on-violation", `on_violation "x": want one of deny, terminate`},
		{"log-format", `log_format "x": want one of json, text`},
	} {
		for range 5 {
			_, err := Build(mapSource{"netns": "x", tc.name: "x"}, io.Discard)
			if err == nil || err.Error() != tc.want {
				t.Fatalf("got %v, want %s", err, tc.want)
			}
		}
	}
}
