package sandbox

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// envMap checks that every name appears once and returns the variables.
func envMap(t *testing.T, env []string) map[string]string {
	t.Helper()
	m := map[string]string{}
	for _, kv := range env {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			t.Fatalf("%q: no '='", kv)
		}
		if _, dup := m[k]; dup {
			t.Fatalf("%s twice in %q", k, env)
		}
		m[k] = v
	}
	return m
}

var nobody = Account{Name: "nobody", Home: "/nonexistent", Shell: "/usr/sbin/nologin"}

func TestEnvironAllowList(t *testing.T) {
	host := []string{"PATH=/opt/bin:/usr/bin", "HOME=/root", "USER=root", "LOGNAME=root", "SHELL=/bin/bash",
		"TERM=xterm", "LANG=C.UTF-8", "LC_ALL=C", "LC_TIME=en_GB.UTF-8", "TZ=UTC",
		"SSH_AUTH_SOCK=/tmp/ssh-x/agent.1", "DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/0/bus", "XDG_RUNTIME_DIR=/run/user/0",
		"LD_PRELOAD=/tmp/evil.so", "AWS_SECRET_ACCESS_KEY=abc", "SUDO_USER=alice", "MSBTAP_X=1", "noequals", "=empty"}
	env, err := Environ(EnvOptions{Host: host, User: nobody, Own: []string{"SSL_CERT_FILE=/tmp/b.pem"}})
	if err != nil {
		t.Fatal(err)
	}
	got := envMap(t, env)
	want := map[string]string{"PATH": "/opt/bin:/usr/bin", "HOME": "/nonexistent", "USER": "nobody", "LOGNAME": "nobody",
		"SHELL": "/usr/sbin/nologin", "TERM": "xterm", "LANG": "C.UTF-8", "LC_ALL": "C", "LC_TIME": "en_GB.UTF-8", "TZ": "UTC",
		"SSL_CERT_FILE": "/tmp/b.pem"}
	if len(got) != len(want) {
		t.Errorf("got %q, want %v", env, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s=%q, want %q", k, got[k], v)
		}
	}
	if !slices.IsSorted(env) {
		t.Errorf("not sorted: %q", env)
	}
	// No PATH at all: a usual one.
	env, _ = Environ(EnvOptions{User: nobody})
	if envMap(t, env)["PATH"] != DefaultPath {
		t.Errorf("no PATH: %q", env)
	}
}

func TestEnvironExtraAndSecrets(t *testing.T) {
	host := []string{"TOKEN=sk-real", "TOKEN=sk-second", "REAL_GH=gh-real", "LC_SECRET=lc-real", "NO_PROXY=a,b", "FOO=foo",
		"PATH=/usr/bin", "PATH=/evil"}
	o := EnvOptions{Host: host, User: nobody,
		Own:       []string{"SSL_CERT_FILE=/b.pem", "GIT_SSL_CAINFO=/b.pem"},
		Extra:     []string{"NO_PROXY", "BAR=bar=baz", "FOO=one", "FOO", "GIT_SSL_CAINFO=/mine.pem", "UNSET_HERE", "HOME=/work"},
		Final:     []string{"TOKEN=PLACEHOLDER1", "GH_TOKEN=PLACEHOLDER2"},
		Forbidden: []string{"TOKEN", "REAL_GH", "LC_SECRET"}}
	env, err := Environ(o)
	if err != nil {
		t.Fatal(err)
	}
	got := envMap(t, env)
	for k, v := range map[string]string{"NO_PROXY": "a,b", "BAR": "bar=baz", "FOO": "foo", "GIT_SSL_CAINFO": "/mine.pem",
		"SSL_CERT_FILE": "/b.pem", "HOME": "/work", "TOKEN": "PLACEHOLDER1", "GH_TOKEN": "PLACEHOLDER2", "PATH": "/usr/bin"} {
		if got[k] != v {
			t.Errorf("%s=%q, want %q", k, got[k], v)
		}
	}
	for _, k := range []string{"REAL_GH", "LC_SECRET", "UNSET_HERE"} {
		if v, ok := got[k]; ok {
			t.Errorf("%s=%q reached the command", k, v)
		}
	}
	for _, kv := range env {
		for _, real := range []string{"sk-real", "sk-second", "gh-real", "lc-real"} {
			if strings.Contains(kv, real) {
				t.Errorf("%q holds a secret's value", kv)
			}
		}
	}

	// Asking for a source variable is refused, with or without a value.
	for _, e := range []string{"TOKEN", "REAL_GH=x", "LC_SECRET"} {
		o.Extra = []string{e}
		if _, err := Environ(o); err == nil || !strings.Contains(err.Error(), "secret") {
			t.Errorf("--env %s: %v, want a refusal", e, err)
		}
	}
	for _, e := range []string{"", "=x", "1A=x", "A-B=x", "A B", "A=x\x00y"} {
		o.Extra = []string{e}
		if _, err := Environ(o); err == nil {
			t.Errorf("--env %q accepted", e)
		}
	}
}

func TestLookupAccount(t *testing.T) {
	p := filepath.Join(t.TempDir(), "passwd")
	os.WriteFile(p, []byte("root:x:0:0:root:/root:/bin/bash\n+nis::::::\nbroken:x:1000\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"+
		"alice:x:1000:1000:Alice,,,:/home/alice:\n"), 0o644)
	for _, tc := range []struct {
		uid  int
		want Account
	}{
		{0, Account{"root", "/root", "/bin/bash"}},
		{65534, nobody},
		{1000, Account{"alice", "/home/alice", "/bin/sh"}},
		{4242, Account{"4242", "/", "/bin/sh"}},
	} {
		if got := lookupAccount(p, tc.uid); got != tc.want {
			t.Errorf("uid %d: got %+v, want %+v", tc.uid, got, tc.want)
		}
	}
}

func TestCommandCredentialsNeverRootByDefault(t *testing.T) {
	for _, tc := range []struct{ sudoUID, sudoGID string }{{"", ""}, {"0", "0"}} {
		t.Setenv("SUDO_UID", tc.sudoUID)
		t.Setenv("SUDO_GID", tc.sudoGID)
		if tc.sudoUID == "" {
			os.Unsetenv("SUDO_UID")
			os.Unsetenv("SUDO_GID")
		}
		uid, gid, groups, err := CommandCredentials("")
		if err != nil || uid == 0 || gid == 0 || len(groups) != 1 || groups[0] != gid {
			t.Errorf("SUDO_UID %q: %d:%d %v %v, want nobody:nogroup", tc.sudoUID, uid, gid, groups, err)
		}
	}
	t.Setenv("SUDO_UID", "1234")
	t.Setenv("SUDO_GID", "1235")
	if uid, gid, _, err := CommandCredentials(""); err != nil || uid != 1234 || gid != 1235 {
		t.Errorf("SUDO_UID 1234: %d:%d %v", uid, gid, err)
	}
	if uid, gid, _, err := CommandCredentials("root"); err != nil || uid != 0 || gid != 0 {
		t.Errorf("--user root: %d:%d %v", uid, gid, err)
	}
}
