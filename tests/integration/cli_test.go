package integration

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/msbtap/msbtap/internal/testkit/testenv"
)

func TestRunNetnsConfiguresGuest(t *testing.T) {
	w := testenv.NewWorld(t)
	w.StartAgent(t, "--mtu", "9000", "--slot", "5")
	out := w.Guest.MustRun(t, "ip", "-o", "addr", "show", "dev", "eth0")
	for _, want := range []string{"100.96.0.22/30", "fd42:6d73:62:5::2/64"} {
		if !strings.Contains(out, want) {
			t.Errorf("eth0 addresses lack %s:\n%s", want, out)
		}
	}
	if out := w.Guest.MustRun(t, "ip", "link", "show", "eth0"); !strings.Contains(out, "mtu 9000") || !strings.Contains(out, "02:6d:73:00:05:02") {
		t.Errorf("eth0 link: want mtu 9000 and MAC 02:6d:73:00:05:02:\n%s", out)
	}
	if out := w.Guest.MustRun(t, "ip", "route"); !strings.Contains(out, "default via 100.96.0.21") {
		t.Errorf("no IPv4 default route via the gateway:\n%s", out)
	}
	if out := w.Guest.MustRun(t, "ip", "-6", "route"); !strings.Contains(out, "default via fd42:6d73:62:5::1") {
		t.Errorf("no IPv6 default route via the gateway:\n%s", out)
	}
}

func TestRunCommandExitStatus(t *testing.T) {
	testenv.RequireRoot(t)
	msbtap, _ := testenv.Binaries(t)
	for _, tc := range []struct {
		script string
		want   int
	}{
		{"exit 0", 0},
		{"exit 7", 7},
		{"ip -o addr show eth0 | grep -q 100.96.0.2/30", 0},
		{"kill -TERM $$", 128 + 15},
	} {
		cmd := exec.Command(msbtap, "run", "--", "sh", "-c", tc.script)
		out, err := cmd.CombinedOutput()
		got := 0
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			got = ee.ExitCode()
		} else if err != nil {
			t.Fatalf("%q: %v", tc.script, err)
		}
		if got != tc.want {
			t.Errorf("%q: exit status %d, want %d\n%s", tc.script, got, tc.want, out)
		}
	}
}

// TestSIGTERMLeavesNothing: msbtap running a command in a fresh namespace
// stops the command's whole process group and exits; nothing of it remains.
func TestSIGTERMLeavesNothing(t *testing.T) {
	testenv.RequireRoot(t)
	msbtap, _ := testenv.Binaries(t)
	n := 100000 + rand.IntN(800000)
	marker := fmt.Sprintf("^sleep %d$", n) // the sleep itself, not msbtap's command line
	cmd := exec.Command(msbtap, "run", "--", "sh", "-c", fmt.Sprintf("sleep %d & sleep %d", n, n+1))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })
	waitFor(t, 10*time.Second, "the command to start", func() bool {
		return exec.Command("pgrep", "-f", marker).Run() == nil
	})
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("msbtap exit after SIGTERM: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("msbtap did not exit within 10 s of SIGTERM")
	}
	waitFor(t, 5*time.Second, "the sandbox's processes to go", func() bool {
		return exec.Command("pgrep", "-f", marker).Run() != nil &&
			exec.Command("pgrep", "-f", fmt.Sprintf("^sleep %d$", n+1)).Run() != nil
	})
}

// TestNetnsSIGTERMRemovesTAP: after SIGTERM the TAP is gone from the
// namespace, and msbtap can attach again.
func TestNetnsSIGTERMRemovesTAP(t *testing.T) {
	w := testenv.NewWorld(t)
	w.StartAgent(t)
	w.StopAgent(t)
	waitFor(t, 5*time.Second, "eth0 to disappear", func() bool {
		_, err := w.Guest.Run("ip", "link", "show", "eth0")
		return err != nil
	})
	w.StartAgent(t)
}

// TestExitsWhenNetnsDeleted: msbtap notices its namespace going away.
func TestExitsWhenNetnsDeleted(t *testing.T) {
	testenv.RequireRoot(t)
	msbtap, _ := testenv.Binaries(t)
	ns := testenv.NewNS(t, "del")
	cmd := exec.Command(msbtap, "run", "--netns", ns.Name)
	out, done := startCmd(t, cmd)
	waitFor(t, 10*time.Second, "msbtap to attach", func() bool { return strings.Contains(out.String(), "ready") })
	if b, err := exec.Command("ip", "netns", "del", ns.Name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns del: %v %s", err, b)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("msbtap exit: %v\n%s", err, out.String())
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("msbtap still running 5 s after its namespace was deleted\n%s", out.String())
	}
}

func TestStartupErrors(t *testing.T) {
	testenv.RequireRoot(t)
	msbtap, _ := testenv.Binaries(t)
	ns := testenv.NewNS(t, "err")
	ns.MustRun(t, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
	// A pid file or audit log that is a symbolic link is never followed.
	dir := t.TempDir()
	victim := filepath.Join(dir, "victim")
	os.WriteFile(victim, []byte("precious\n"), 0o644)
	link := filepath.Join(dir, "link")
	os.Symlink(victim, link)
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"missing namespace", []string{"run", "--netns", "msbtap-absent-ns"}, "does not exist"},
		{"existing tap", []string{"run", "--netns", ns.Name}, "already exists"},
		{"not a namespace", []string{"run", "--netns", "/etc/hostname"}, "not a network namespace"},
		{"closed ready fd", []string{"run", "--netns", ns.Name, "--tap", "tap1", "--ready-fd", "9"}, "--ready-fd"},
		{"pid file symlink", []string{"run", "--netns", ns.Name, "--tap", "tap1", "--pid-file", link}, "--pid-file: " + link + ": is a symbolic link"},
		{"audit log symlink", []string{"run", "--netns", ns.Name, "--tap", "tap1", "--audit-log", link}, "--audit-log: " + link + ": is a symbolic link"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := exec.Command(msbtap, tc.args...).CombinedOutput()
			if err == nil {
				t.Fatalf("exit 0, want failure; output:\n%s", out)
			}
			lines := strings.Split(strings.TrimSpace(string(out)), "\n")
			if len(lines) != 1 || !strings.Contains(lines[0], tc.want) {
				t.Fatalf("want one line mentioning %q, got:\n%s", tc.want, out)
			}
		})
	}
	if b, _ := os.ReadFile(victim); string(b) != "precious\n" {
		t.Errorf("a symbolic link was followed: the target now holds %q", b)
	}
	// Nothing half-made: no new link in the namespace.
	if out := ns.MustRun(t, "ip", "-o", "link"); strings.Contains(out, "tap1") {
		t.Errorf("a failed start left tap1 behind:\n%s", out)
	}
	// Without CAP_NET_ADMIN.
	out, err := exec.Command("setpriv", "--inh-caps=-all", "--bounding-set=-all", msbtap, "run", "--netns", ns.Name, "--tap", "tap2").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "CAP_NET_ADMIN") {
		t.Errorf("without capabilities: got %v\n%s", err, out)
	}
}

func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// startCmd starts cmd with its output collected; done yields its exit.
// Cleanup kills it if it still runs.
func startCmd(t *testing.T, cmd *exec.Cmd) (out *testenv.Buffer, done <-chan error) {
	t.Helper()
	out = &testenv.Buffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", cmd.Args[0], err)
	}
	ch := make(chan error, 1)
	go func() { ch <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })
	return out, ch
}

// TestBashCompletion: the script msbtap prints completes subcommands and
// flags by asking msbtap itself.
func TestBashCompletion(t *testing.T) {
	testenv.RequireTools(t, "bash")
	msbtap, _ := testenv.Binaries(t)
	script := filepath.Join(t.TempDir(), "msbtap.bash")
	out, err := exec.Command(msbtap, "completion", "bash").Output()
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(script, out, 0o644)
	complete := func(words ...string) string {
		t.Helper()
		sh := fmt.Sprintf(`source %s; COMP_WORDS=(%s); COMP_CWORD=%d; _msbtap; echo "${COMPREPLY[@]}"`,
			script, strings.Join(words, " "), len(words)-1)
		cmd := exec.Command("bash", "-c", sh)
		cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(msbtap)+":"+os.Getenv("PATH"))
		b, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("bash: %v\n%s", err, b)
		}
		return strings.TrimSpace(string(b))
	}
	if got := complete("msbtap", "pol"); got != "policy" {
		t.Errorf("msbtap pol<TAB>: %q, want policy", got)
	}
	if got := complete("msbtap", "run", "--pub"); got != "--publish" {
		t.Errorf("msbtap run --pub<TAB>: %q, want --publish", got)
	}
}
