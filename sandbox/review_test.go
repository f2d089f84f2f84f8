package sandbox

import (
	"crypto/rand"
	"encoding/hex"
	"strings"
	"testing"
)

// TestEnvironLocaleByName: the locale variables are inherited by name,
// not every LC_ one: sshd accepts LC_* from its clients (AcceptEnv), which
// is how tokens get passed (LC_GITHUB_TOKEN), and those stay out unless
// --env names them.
func TestEnvironLocaleByName(t *testing.T) {
	b := make([]byte, 12)
	rand.Read(b)
	token := hex.EncodeToString(b)
	host := []string{"LC_GITHUB_TOKEN=" + token, "LC_MY_SECRET=" + token, "LC_MESSAGES=C", "LC_CTYPE=C.UTF-8", "LC_ALL=C"}
	env, err := Environ(EnvOptions{Host: host, User: nobody})
	if err != nil {
		t.Fatal(err)
	}
	got := envMap(t, env)
	if strings.Contains(strings.Join(env, "\n"), token) {
		t.Errorf("an LC_ variable that is no locale reached the command: %q", env)
	}
	for _, k := range []string{"LC_MESSAGES", "LC_CTYPE", "LC_ALL"} {
		if _, ok := got[k]; !ok {
			t.Errorf("%s not inherited: %q", k, env)
		}
	}
	env, _ = Environ(EnvOptions{Host: host, User: nobody, Extra: []string{"LC_GITHUB_TOKEN"}})
	if envMap(t, env)["LC_GITHUB_TOKEN"] != token {
		t.Errorf("--env LC_GITHUB_TOKEN: %q", env)
	}
}

// TestWorkDirBind: a working directory below a private directory is shared
// with the command (a checkout in /tmp keeps working); the private
// directory itself, a directory outside them, and one a bind already
// shares are not.
func TestWorkDirBind(t *testing.T) {
	for _, tc := range []struct {
		dir   string
		binds []Bind
		want  string
	}{
		{"/tmp/ci/tests/integration", nil, "/tmp/ci/tests/integration"},
		{"/var/tmp/work", nil, "/var/tmp/work"},
		{"/tmp", nil, ""},
		{"/run", nil, ""},
		{"/", nil, ""},
		{"/etc", nil, ""},
		{"/tmp/ci/x", []Bind{{Path: "/tmp/ci"}}, ""},
		{"", nil, ""},
	} {
		if got := workDirBind(tc.dir, tc.binds); got != tc.want {
			t.Errorf("workDirBind(%q, %v) = %q, want %q", tc.dir, tc.binds, got, tc.want)
		}
	}
}
