package integration

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/msbtap/msbtap/internal/testkit/testenv"
)

// TestDemo runs `make demo`'s script: it must pass, tell its six steps in
// order within a minute, show the placeholder in the sandbox and the real
// value at the server, point at the bench chart when there is one, and
// leave no namespace behind.
func TestDemo(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTools(t, "curl", "ip")
	msbtap, testhost := testenv.Binaries(t)
	chart := filepath.Join(t.TempDir(), "bench-peers.png")
	if err := os.WriteFile(chart, []byte("\x89PNG\r\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(root, "scripts", "demo.sh"))
	cmd.Env = append(os.Environ(), "MSBTAP="+msbtap, "TESTHOST="+testhost, "BENCH_CHART="+chart)
	start := time.Now()
	out, err := cmd.CombinedOutput()
	took := time.Since(start)
	s := string(out)
	if err != nil {
		t.Fatalf("demo failed: %v\n%s", err, s)
	}
	if took > time.Minute {
		t.Errorf("the demo took %s, want under a minute", took)
	}
	last := -1
	for _, want := range []string{
		"== 1. A curl by name that works", "hello from testhost www.example.test",
		"== 2. One the policy refuses", `"rule_text":"rules[1]: deny egress to domain blocked.example.test"`,
		"== 3. A secret", "DEMO_TOKEN in the sandbox: ", "[server] received: GET api.example.test / Authorization: Bearer sk-demo-",
		"== 4. An HTTP rule", "GET  -> 200", "POST -> 403", `"method":"POST"`,
		"== 5. A live view of the open flows", "198.51.100.10:80  www.example.test",
		"== 6. How fast", chart,
		"Done in",
	} {
		i := strings.Index(s[last+1:], want)
		if i < 0 {
			t.Fatalf("no %q after the previous step in:\n%s", want, s)
		}
		last += 1 + i
	}
	// The sandbox saw a placeholder, never the value the server got.
	ph := regexp.MustCompile(`DEMO_TOKEN in the sandbox: (\S+)`).FindStringSubmatch(s)
	real := regexp.MustCompile(`Bearer (sk-demo-[0-9a-f]+)`).FindStringSubmatch(s)
	if ph == nil || real == nil || strings.HasPrefix(ph[1], "sk-demo-") || ph[1] == real[1] {
		t.Errorf("placeholder %v, value %v", ph, real)
	}
	if got := strings.Count(s, "\x1b[32m-> "); got < 6 {
		t.Errorf("%d steps say what they prove, want 6", got)
	}
	nss, _ := exec.Command("ip", "netns", "list").Output()
	if strings.Contains(string(nss), "-"+strconv.Itoa(cmd.Process.Pid)) { // the script names them after its pid
		t.Errorf("the demo left namespaces behind:\n%s", nss)
	}
}
