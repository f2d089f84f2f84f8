package integration

import (
	"errors"
	"os/exec"
	"strings"
	"testing"

	"github.com/msbtap/msbtap/internal/testkit/testenv"
)

// TestDoctor runs msbtap doctor for real, in a namespace of the test's own
// whose sysctls it sets: the per-namespace checks must report what the
// namespace says, the host checks must run, and the exit status must
// follow the verdicts.
func TestDoctor(t *testing.T) {
	testenv.RequireRoot(t)
	msbtap, _ := testenv.Binaries(t)
	ns := testenv.NewNS(t, "doc")
	run := func(args ...string) (string, int) {
		t.Helper()
		out, err := ns.Run(append([]string{msbtap, "doctor"}, args...)...)
		code := 0
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return out, code
	}
	verdict := func(out, name string) string {
		t.Helper()
		for _, l := range strings.Split(out, "\n") {
			f := strings.Fields(l)
			if len(f) > 1 && f[0] != "fix:" && strings.HasPrefix(strings.TrimSpace(l[len(f[0]):]), name) {
				return f[0]
			}
		}
		t.Fatalf("no %q line in:\n%s", name, out)
		return ""
	}

	ns.MustRun(t, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=2", "net.ipv4.ip_local_port_range=32768 60999")
	out, code := run()
	if n := strings.Count(out, "\n"); n < 11 {
		t.Fatalf("want 10 checks and a summary, got:\n%s", out)
	}
	for name, want := range map[string]string{"tun": "ok", "tc u32 (VM mode)": "ok", "seccomp": "ok", "pid namespaces": "ok",
		"tcp_tw_reuse": "warn", "ephemeral ports": "warn"} {
		if got := verdict(out, name); got != want {
			t.Errorf("%s: %s, want %s:\n%s", name, got, want, out)
		}
	}
	if !strings.Contains(out, "fix: sysctl -w net.ipv4.tcp_tw_reuse=1") || !strings.Contains(out, "about 235 new connections a second") {
		t.Errorf("no TIME_WAIT explanation and fix:\n%s", out)
	}
	if fails := strings.Contains(out, "\nfail "); (code != 0) != fails {
		t.Errorf("exit status %d with fail lines %v:\n%s", code, fails, out)
	}

	ns.MustRun(t, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65535")
	out, _ = run()
	for _, name := range []string{"tcp_tw_reuse", "ephemeral ports"} {
		if got := verdict(out, name); got != "ok" {
			t.Errorf("after the fix, %s: %s, want ok:\n%s", name, got, out)
		}
	}

	// A descriptor limit below --max-connections is a failure, and the
	// exit status says so.
	out, code = run("--max-connections", "100000")
	if got := verdict(out, "open files"); got != "fail" || code != 1 {
		t.Errorf("--max-connections 100000: open files %s, exit %d; want fail, 1:\n%s", got, code, out)
	}
}
