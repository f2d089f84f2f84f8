package integration

import (
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/msbtap/msbtap/internal/testkit/testenv"
)

// TestCtlTop drives `msbtap ctl top` in a real terminal (tmux, on a
// server of the test's own): a running download shows with its rule and a
// rate, a denied flow shows among the denials in red, x on the selected
// flow resets it (the sandbox sees the reset), q quits.
func TestCtlTop(t *testing.T) {
	testenv.RequireTools(t, "curl", "tmux")
	w := testenv.NewWorld(t)
	sock := controlSocket(t)
	w.StartAgent(t, "--control", sock)

	server := "msbtap-top-" + randHex(t, 4)
	tmux := func(args ...string) (string, error) {
		out, err := exec.Command("tmux", append([]string{"-L", server}, args...)...).CombinedOutput()
		return string(out), err
	}
	t.Cleanup(func() { tmux("kill-server") })
	if out, err := tmux("new-session", "-d", "-s", "top", "-x", "220", "-y", "40",
		w.Msbtap+" ctl --control "+sock+" top; sleep 30"); err != nil {
		t.Fatalf("tmux new-session: %v %s", err, out)
	}
	capture := func(escapes bool) string {
		args := []string{"capture-pane", "-p", "-t", "top"}
		if escapes {
			args = append(args, "-e")
		}
		out, _ := tmux(args...)
		return out
	}
	waitScreen := func(what string, cond func(string) bool) string {
		t.Helper()
		var s string
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			if s = capture(false); cond(s) {
				return s
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Fatalf("%s: not on the screen:\n%s", what, s)
		return s
	}
	line := func(screen, sub string) string {
		for _, l := range strings.Split(screen, "\n") {
			if strings.Contains(l, sub) {
				return l
			}
		}
		return ""
	}

	out, done := startDownload(t, w, "http://"+testenv.WebHost4, 200<<20)
	dst := testenv.WebHost4 + ":80"
	screen := waitScreen("the download with its rule and rate", func(s string) bool {
		l := line(s, dst)
		return strings.Contains(l, "allow") && strings.Contains(l, "rules[2]: allow egress to group public") && strings.Contains(l, "MiB")
	})
	if !strings.Contains(screen, "msbtap top") || !strings.Contains(screen, "1 flows") {
		t.Errorf("no title:\n%s", screen)
	}

	// A denied flow (the private host, under public-only): listed in red.
	if ok, out := reach(t, w, "tcp", testenv.PrivHost4+":80"); ok {
		t.Fatalf("the private host was reachable: %s", out)
	}
	waitScreen("the denial", func(s string) bool {
		return strings.Contains(line(s, testenv.PrivHost4+":80"), "deny")
	})
	colored := line(capture(true), testenv.PrivHost4+":80")
	if !regexp.MustCompile(`\x1b\[([0-9;]*;)?(31|91)(;[0-9;]*)?m`).MatchString(colored) { // red or bright red
		t.Errorf("the denial is not in red: %q", colored)
	}

	// x closes the selected (only) flow: the download sees a reset.
	tmux("send-keys", "-t", "top", "x")
	select {
	case err := <-done:
		if err == nil || !strings.Contains(out.String(), "reset") {
			t.Errorf("the download after x: %v %q, want a reset", err, out.String())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the download went on after x")
	}
	waitScreen("the flow gone", func(s string) bool {
		return strings.Contains(s, "closed flow") && strings.Contains(s, "0 flows")
	})

	tmux("send-keys", "-t", "top", "q")
	waitScreen("top ended", func(s string) bool { return !strings.Contains(s, "msbtap top") })
}
