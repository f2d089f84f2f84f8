package integration

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/msbtap/msbtap/internal/testenv"
)

// TestCommandGetsNoInheritedDescriptors: descriptors msbtap inherited
// from whoever started it (here a pipe's write end as fd 4 and a directory
// of the host's /tmp as fd 5; fd 3 is taken over by the init's spec) do not reach the command: through the
// directory it would list and open the host's /tmp around its private one,
// through the pipe write to its starter.
func TestCommandGetsNoInheritedDescriptors(t *testing.T) {
	w := testenv.NewWorld(t)
	dir := tempDirIn(t, "/tmp", 0o755)
	marker := "marker-" + randomHex(8)
	if err := os.WriteFile(filepath.Join(dir, marker), []byte("host\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	df, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer df.Close()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	script := `ls -A /proc/self/fd/5/ 2>/dev/null; cat /proc/self/fd/5/` + marker + ` 2>/dev/null
{ echo LEAKED-THROUGH-4 >&4; } 2>/dev/null
readlink /proc/$$/fd/4 /proc/$$/fd/5
echo END`
	cmd := w.Host.Command(w.Msbtap, "run", "--dns-upstream", testenv.DNSHost4, "--log-level", "warn", "--tls-intercept", "off",
		"--", "sh", "-c", script)
	cmd.Env = rootEnv()
	cmd.ExtraFiles = []*os.File{pw, pw, df}
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		pw.Close()
		t.Fatal(err)
	}
	pw.Close()
	got := make(chan string, 1)
	go func() {
		b, _ := io.ReadAll(pr) // EOF once every holder of the write end is gone
		got <- string(b)
	}()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("msbtap run: %v\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "END") {
		t.Fatalf("the command did not run to its end:\n%s", out.String())
	}
	for _, bad := range []string{marker, dir, "pipe:"} {
		if strings.Contains(out.String(), bad) {
			t.Errorf("the command reached an inherited descriptor (%q):\n%s", bad, out.String())
		}
	}
	select {
	case s := <-got:
		if s != "" {
			t.Errorf("the command wrote %q into msbtap's inherited fd 4", s)
		}
	case <-time.After(10 * time.Second):
		t.Error("fd 4's write end is still held after msbtap exited")
	}
}
