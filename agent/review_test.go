package agent

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/msbtap/msbtap/internal/fielderr"
	"github.com/msbtap/msbtap/upstream"
)

// TestUpstreamCredentialsNeverReachTheCommand: the upstream proxy's
// credentials are a secret like the others. Their variable never takes
// msbtap's value in the command's environment, even under a name the
// allow-list passes on (LC_*); --env naming it is refused with an env
// error; their file is masked in the command's mount namespace (as --user
// root, the command could read root's 0600 file otherwise).
func TestUpstreamCredentialsNeverReachTheCommand(t *testing.T) {
	b := make([]byte, 12)
	rand.Read(b)
	pass := hex.EncodeToString(b)
	t.Setenv("LC_PROXY_AUTH", "user:"+pass)
	a := &Agent{cfg: Config{Command: []string{"sh"},
		Upstream: upstream.Config{URL: "http://127.0.0.1:3128", CredentialsEnv: "LC_PROXY_AUTH"}}}
	env, err := a.commandEnv()
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range env {
		if strings.Contains(kv, pass) {
			t.Errorf("the command's environment holds the proxy's password: %s", kv)
		}
	}
	for _, e := range []string{"LC_PROXY_AUTH", "LC_PROXY_AUTH=mine"} {
		a.cfg.CommandEnv = []string{e}
		a.ctl = &controller{a: a, reg: prometheus.NewRegistry()}
		a.log = slog.New(slog.NewTextHandler(io.Discard, nil))
		err := a.buildUpstream()
		var fe *fielderr.Error
		if !errors.As(err, &fe) || fe.Field != "env" || strings.Contains(err.Error(), pass) {
			t.Errorf("--env %s: %v, want an env error without the value", e, err)
		}
		if env, err := a.commandEnv(); err == nil && strings.Contains(strings.Join(env, "\n"), pass) {
			t.Errorf("--env %s: the command gets the password", e)
		}
	}

	creds := filepath.Join(t.TempDir(), "proxy-credentials")
	a = &Agent{cfg: Config{Command: []string{"sh"},
		Upstream: upstream.Config{URL: "socks5://127.0.0.1:1080", CredentialsFile: creds}}}
	if hide := a.hiddenFromCommand(); !slices.Contains(hide, creds) {
		t.Errorf("the credentials file %s is not masked from the command: %v", creds, hide)
	}
}
