package process

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/agent"
	"github.com/msbtap/msbtap/policy"
)

// startTestKeeper serves a keeper in this process (without hardening it)
// on one end of a socket pair and returns the agent's side.
func startTestKeeper(t *testing.T) (*keeper, chan struct{}) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { keeperServe(fds[1]); unix.Close(fds[1]); close(served) }()
	k := &keeper{fd: fds[0], done: served}
	t.Cleanup(func() {
		k.mu.Lock()
		if k.fd >= 0 {
			unix.Close(k.fd)
			k.fd = -1
		}
		k.mu.Unlock()
		<-served
	})
	return k, served
}

// TestKeeperProtocol: nothing before arm, one arm only, only the named
// requests; rotation moves FILE to FILE.1 and hands over a new, empty,
// private FILE; the end removes the pid file and the bundle's directory
// but not a file put in place of the control socket since.
func TestKeeperProtocol(t *testing.T) {
	dir := t.TempDir()
	logf := filepath.Join(dir, "audit.log")
	pidf := filepath.Join(dir, "pid")
	sock := filepath.Join(dir, "ctl.sock")
	bundle := filepath.Join(dir, "bundle")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	defer ln.Close()
	for _, f := range []string{logf, pidf} {
		if err := os.WriteFile(f, []byte("old\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(bundle, 0o755); err != nil {
		t.Fatal(err)
	}
	k, served := startTestKeeper(t)
	if _, err := k.Rotate("audit"); err == nil || !strings.Contains(err.Error(), "not armed") {
		t.Errorf("rotate before arm: %v", err)
	}
	if err := k.arm(keeperPaths{Audit: logf, PIDFile: pidf, Control: sock, Bundle: bundle}); err != nil {
		t.Fatal(err)
	}
	if err := k.arm(keeperPaths{Audit: "/etc/passwd"}); err == nil {
		t.Error("a second arm was taken")
	}
	for _, op := range []string{"rotate-pcap", "read-policy", "read-secrets", "exec"} {
		if _, err := k.call(keeperRequest{Op: op}); err == nil {
			t.Errorf("%s: taken, with no such path armed", op)
		}
	}
	f, err := k.Rotate("audit")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString("new\n"); err != nil {
		t.Error(err)
	}
	f.Close()
	if b, _ := os.ReadFile(logf + ".1"); string(b) != "old\n" {
		t.Errorf("FILE.1: %q", b)
	}
	if st, err := os.Stat(logf); err != nil || st.Mode().Perm() != 0o600 || st.Size() != 4 {
		t.Errorf("new FILE: %v %v", st, err)
	}
	// The control socket's path now holds another file: it stays.
	os.Remove(sock)
	if err := os.WriteFile(sock, []byte("someone else's"), 0o600); err != nil {
		t.Fatal(err)
	}
	k.finish()
	<-served
	for _, gone := range []string{pidf, bundle} {
		if _, err := os.Lstat(gone); !os.IsNotExist(err) {
			t.Errorf("%s: still there (%v)", gone, err)
		}
	}
	if _, err := os.Lstat(sock); err != nil {
		t.Errorf("the file put in place of the socket was removed: %v", err)
	}
}

// TestKeeperCleansUpWhenTheAgentDies: the agent's end closing without a
// word (the agent killed) is enough.
func TestKeeperCleansUpWhenTheAgentDies(t *testing.T) {
	pidf := filepath.Join(t.TempDir(), "pid")
	if err := os.WriteFile(pidf, []byte("1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	k, served := startTestKeeper(t)
	if err := k.arm(keeperPaths{PIDFile: pidf}); err != nil {
		t.Fatal(err)
	}
	k.mu.Lock()
	unix.Close(k.fd)
	k.fd = -1
	k.mu.Unlock()
	<-served
	if _, err := os.Lstat(pidf); !os.IsNotExist(err) {
		t.Errorf("pid file still there: %v", err)
	}
}

// TestKeeperWritesPolicies: write-learn and save-policy write only the
// paths armed (save-policy only with SavePolicy), only valid policies,
// whole.
func TestKeeperWritesPolicies(t *testing.T) {
	dir := t.TempDir()
	learn, pol := filepath.Join(dir, "learned.json"), filepath.Join(dir, "policy.json")
	os.WriteFile(pol, []byte(`{"default_action": "deny"}`), 0o644)
	k, _ := startTestKeeper(t)
	if err := k.arm(keeperPaths{Learn: learn, Policy: pol}); err != nil {
		t.Fatal(err)
	}
	good := []byte(`{"default_action":"deny","rules":[{"destination":{"domain":"pypi.org"},"protocols":["tcp"],"ports":[{"start":443,"end":443}],"action":"allow"}]}`)
	if err := k.WritePolicy("learn", good); err != nil {
		t.Fatal(err)
	}
	if f, err := policy.LoadFile(learn); err != nil || len(f.Rules) != 1 || f.Rules[0].Destination.Domain != "pypi.org" {
		t.Errorf("learned file: %+v %v", f, err)
	}
	if err := k.WritePolicy("learn", []byte(`{"default_action": "maybe"}`)); err == nil || !strings.Contains(err.Error(), "not a valid policy") {
		t.Errorf("an invalid policy: %v", err)
	}
	if f, err := policy.LoadFile(learn); err != nil || len(f.Rules) != 1 {
		t.Errorf("the learned file after a refused write: %+v %v", f, err)
	}
	if err := k.WritePolicy("policy", good); err == nil {
		t.Error("save-policy taken without SavePolicy armed")
	}
	if b, _ := os.ReadFile(pol); string(b) != `{"default_action": "deny"}` {
		t.Errorf("the policy file changed: %s", b)
	}
	// Without a descriptor the request is refused.
	if _, err := k.call(keeperRequest{Op: "write-learn"}); err == nil {
		t.Error("write-learn without a policy taken")
	}
}

// TestKeeperReportsErrors: a request that fails comes back with its
// error (the switch once kept the cases' errors in a variable of its own,
// and dropped them).
func TestKeeperReportsErrors(t *testing.T) {
	k, _ := startTestKeeper(t)
	if err := k.arm(keeperPaths{Policy: filepath.Join(t.TempDir(), "gone.json")}); err != nil {
		t.Fatal(err)
	}
	if _, err := k.ReadPolicy(); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Errorf("read-policy of a missing file: %v", err)
	}
}

// TestKeeperSecretsRereadChecked: the keeper's re-read of the secrets
// (SIGHUP, or a hijacked agent asking) makes the start's checks on the
// value files too: a from_file that became readable by others, a link to
// a root-only file swapped in for it, or a FIFO, is refused, not read as
// root and handed over.
func TestKeeperSecretsRereadChecked(t *testing.T) {
	dir := t.TempDir()
	val := filepath.Join(dir, "tok")
	os.WriteFile(val, []byte("value\n"), 0o600)
	file := filepath.Join(dir, "secrets.json")
	os.WriteFile(file, []byte(`{"secrets": [{"name": "T", "from_file": "`+val+`", "hosts": ["api.example.test"]}]}`), 0o600)
	r, err := keeperReadSecrets(file)
	if err != nil {
		t.Fatalf("a private value file: %v", err)
	}
	r.Close()
	other := filepath.Join(dir, "other")
	os.WriteFile(other, []byte("not for the sandbox\n"), 0o644)
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	for name, swap := range map[string]func(){
		"mode 0644":             func() { os.Chmod(val, 0o644) },
		"a link to a 0644 file": func() { os.Remove(val); os.Symlink(other, val) },
		"a FIFO":                func() { os.Remove(val); os.Symlink(fifo, val) },
	} {
		os.Remove(val)
		os.WriteFile(val, []byte("value\n"), 0o600)
		swap()
		if r, err := keeperReadSecrets(file); err == nil {
			r.Close()
			t.Errorf("%s: read and handed over", name)
		}
	}
}

// TestWritePolicyFileKeepsMode: --ask-save and --learn rewrite a policy
// file with the mode it had (a root-only 0600 policy does not become
// world-readable); a new file is 0644.
func TestWritePolicyFileKeepsMode(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "policy.json")
	os.WriteFile(p, []byte(`{"default_action": "deny"}`), 0o600)
	f, _ := policy.ParseFile([]byte(`{"default_action": "deny"}`))
	if err := agent.WritePolicyFile(p, f); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(p); st.Mode().Perm() != 0o600 {
		t.Errorf("rewritten as %v, want 0600", st.Mode().Perm())
	}
	n := filepath.Join(dir, "new.json")
	if err := agent.WritePolicyFile(n, f); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(n); st.Mode().Perm() != 0o644 {
		t.Errorf("a new file is %v, want 0644", st.Mode().Perm())
	}
}

// TestKeeperWritePolicyBounded: a policy handed to the keeper comes
// through a pipe and is read for a bounded time: a pipe whose far end
// never closes (a hijacked agent holding it) or a regular file is refused,
// and the keeper goes on.
func TestKeeperWritePolicyBounded(t *testing.T) {
	defer func(d time.Duration) { keeperReadTimeout = d }(keeperReadTimeout)
	keeperReadTimeout = 200 * time.Millisecond
	dir := t.TempDir()
	out := filepath.Join(dir, "learned.json")
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	w.Write([]byte(`{"default_action": "deny"`)) // and never more, never closed
	start := time.Now()
	if err := keeperWritePolicy(out, r); err == nil {
		t.Error("a pipe that never ends was taken")
	}
	r.Close()
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the keeper was held %s", d)
	}
	reg := filepath.Join(dir, "reg")
	os.WriteFile(reg, []byte(`{"default_action": "deny"}`), 0o600)
	f, _ := os.Open(reg)
	defer f.Close()
	if err := keeperWritePolicy(out, f); err == nil {
		t.Error("a regular file was taken")
	}
	r2, w2, _ := os.Pipe()
	go func() { w2.Write([]byte(`{"default_action": "deny"}`)); w2.Close() }()
	if err := keeperWritePolicy(out, r2); err != nil {
		t.Errorf("a policy through a pipe: %v", err)
	}
	r2.Close()
}
