package agent

import (
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/msbtap/msbtap/internal/fielderr"
	"github.com/msbtap/msbtap/secrets"
)

// TestCheckCommandEnv: --env may not name a secret's source variable (its
// value would reach the command) nor a secret's name (where the
// placeholder goes); the error names the env setting and holds no value.
func TestCheckCommandEnv(t *testing.T) {
	specs := []secrets.Spec{{Name: "TOKEN", FromEnv: "TOKEN"}, {Name: "GH_TOKEN", FromEnv: "REAL_GH"}, {Name: "FILE_TOKEN", FromFile: "/x"}}
	for _, tc := range []struct {
		env []string
		ok  bool
	}{
		{[]string{"A", "B=1", "NO_PROXY=a,b"}, true},
		{[]string{"A", "TOKEN"}, false},
		{[]string{"REAL_GH=x"}, false},
		{[]string{"GH_TOKEN=mine"}, false},
		{[]string{"FILE_TOKEN"}, false},
		{[]string{"REAL_GH_2"}, true},
	} {
		a := &Agent{cfg: Config{CommandEnv: tc.env}}
		err := a.checkCommandEnv(specs)
		var fe *fielderr.Error
		if tc.ok != (err == nil) || (err != nil && (!errors.As(err, &fe) || fe.Field != "env" || !strings.Contains(err.Error(), "secret"))) {
			t.Errorf("--env %q: %v", tc.env, err)
		}
	}
}

// TestReloadKeepsCommandEnvSafe: a secrets file re-read on SIGHUP cannot
// make a variable the command already inherited (LANG, say) a secret's
// source, nor one --env passed on; the old secrets stay in force.
func TestReloadKeepsCommandEnvSafe(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "secrets.json")
	write := func(fromEnv string) {
		os.WriteFile(file, []byte(`{"secrets": [{"name": "TOKEN", "from_env": "`+fromEnv+`", "hosts": ["new.test"]}]}`), 0o600)
	}
	t.Setenv("TOKEN_SRC", "value-one")
	t.Setenv("LANG", "value-lang")
	t.Setenv("PASSED", "value-passed")
	st, err := secrets.New([]secrets.Spec{{Name: "TOKEN", FromEnv: "TOKEN_SRC", Hosts: []string{"old.test"}}}, os.Getenv)
	if err != nil {
		t.Fatal(err)
	}
	a := &Agent{cfg: Config{ForCommand: true, CommandEnv: []string{"PASSED"}, Secrets: SecretsConfig{File: file}},
		log: slog.New(slog.NewTextHandler(io.Discard, nil)), secrets: st, secretSrc: []string{"TOKEN_SRC"}}
	for _, src := range []string{"LANG", "PASSED"} {
		write(src)
		a.ReloadSecrets()
		if h := st.Hosts(); len(h) != 1 || h[0] != "old.test" {
			t.Errorf("from_env %s: reloaded, hosts %v", src, h)
		}
	}
	write("TOKEN_SRC")
	a.ReloadSecrets()
	if h := st.Hosts(); len(h) != 1 || h[0] != "new.test" {
		t.Errorf("a fine reload was refused: hosts %v", h)
	}
}
