package harden

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// runHardened builds internal/hardentest without cgo, as msbtap is built,
// and runs it as root: it hardens itself and tries what a hijacked agent
// would.
func runHardened(t *testing.T, env ...string) map[string]string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root (capabilities and seccomp as the agent has them); run `make test` as root")
	}
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..")
	bin := filepath.Join(t.TempDir(), "hardentest")
	build := exec.Command("go", "build", "-o", bin, "./internal/hardentest")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("the hardened process died: %v\n%s", err, out) // refused, never killed
	}
	res := map[string]string{}
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if res["apply"] != "" {
		t.Fatalf("Apply: %s", res["apply"])
	}
	return res
}

// TestForbiddenCallsAreRefused: after Apply, namespace, mount, ptrace and
// exec calls fail with EPERM and the process lives on; sockets work; only
// the kept capability remains, on every set, with no_new_privs.
func TestForbiddenCallsAreRefused(t *testing.T) {
	res := runHardened(t)
	for _, call := range []string{"unshare", "setns", "mount", "execve", "ptrace"} {
		if !strings.Contains(res[call], "operation not permitted") {
			t.Errorf("%s: %q, want it refused with EPERM", call, res[call])
		}
	}
	if res["tcp"] != "ok" {
		t.Errorf("a TCP connection on loopback: %s", res["tcp"])
	}
	netRaw := fmt.Sprintf("%016x", uint64(1)<<13)
	for k, want := range map[string]string{"NoNewPrivs": "1", "Seccomp": "2", "CapEff": netRaw, "CapPrm": netRaw,
		"CapBnd": netRaw, "CapInh": "0000000000000000", "CapAmb": "0000000000000000"} {
		if res[k] != want {
			t.Errorf("%s: %s, want %s", k, res[k], want)
		}
	}
}

// TestSeccompOff: without the filter the same calls are refused by missing
// capabilities instead, and no filter is loaded.
func TestSeccompOff(t *testing.T) {
	res := runHardened(t, "SECCOMP=off")
	if res["Seccomp"] != "0" || res["NoNewPrivs"] != "1" {
		t.Errorf("Seccomp %s NoNewPrivs %s, want 0 and 1", res["Seccomp"], res["NoNewPrivs"])
	}
	if res["unshare"] == "ok" || res["mount"] == "ok" {
		t.Errorf("unshare %q, mount %q: refused by capabilities", res["unshare"], res["mount"])
	}
}
