package archtest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sort"
	"strings"
	"testing"
)

const module = "github.com/msbtap/msbtap"

// layers are the module's packages from the bottom up: a package may import
// one of its own layer or of a layer below, never one above. tests/* are
// left out (they drive the binaries from outside); internal/testkit sits on
// top, so that no package that ships can import a test tool.
var layers = [][]string{
	// helpers with no package of ours below them
	{"internal/fielderr", "internal/units", "internal/sockopt", "internal/safefile", "internal/portspec"},
	// formats, namespaces, the process's privileges, the waker
	{"wake", "wire", "netns", "harden", "plan", "tap/taptest"},
	// the rings and the policy
	{"rings", "policy"},
	// one flow, from its first packet to its last byte
	{"flow"},
	// the device, the fast path, the relays and what sits beside the policy
	{"tap", "tcpfast", "proxy", "inspect", "ask", "audit", "capture", "upstream", "sandbox"},
	// services built on the relays and the device
	{"dnsproxy", "publish", "intercept", "doctor"},
	// the gateway; secrets (an intercept rewriter)
	{"stack", "secrets"},
	// the control socket
	{"control"},
	// one sandbox's network
	{"agent"},
	// the agent as a process: privileges, keeper, signals, the command
	{"process"},
	// settings for the agent; the CNI plugin
	{"settings", "cni"},
	// the commands
	{"cmd/msbtap", "cmd/msbtap-cni"},
	// test tools, and this test
	{"internal/archtest", "internal/testkit/benchpeers", "internal/testkit/hardentest", "internal/testkit/pattern",
		"internal/testkit/testenv", "internal/testkit/testhost"},
}

// pkg is what the test reads of go list -json's output.
type pkg struct {
	ImportPath string
	Imports    []string
}

// listPackages returns every package of the module but tests/*, by path
// inside the module, with the module's packages it imports (not counting
// its tests' imports).
func listPackages(t *testing.T) map[string][]string {
	t.Helper()
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no go command here: ", err)
	}
	cmd := exec.Command("go", "list", "-json", module+"/...")
	// Everything the module needs is in the module cache already: never
	// ask a proxy.
	cmd.Env = append(os.Environ(), "GOPROXY=off", "GOFLAGS=-mod=readonly")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, stderr.Bytes())
	}
	pkgs := map[string][]string{}
	dec := json.NewDecoder(bytes.NewReader(out))
	for {
		var p pkg
		if err := dec.Decode(&p); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("go list's output: %v", err)
		}
		name, ok := inModule(p.ImportPath)
		if !ok || name == "tests" || strings.HasPrefix(name, "tests/") {
			continue
		}
		var imports []string
		for _, imp := range p.Imports {
			if n, ok := inModule(imp); ok {
				imports = append(imports, n)
			}
		}
		pkgs[name] = imports
	}
	return pkgs
}

// inModule returns path inside the module ("." for its root), or false
// for a package of another module or the standard library.
func inModule(path string) (string, bool) {
	if path == module {
		return ".", true
	}
	rest, ok := strings.CutPrefix(path, module+"/")
	return rest, ok
}

// rankOf numbers the layers' packages from 0 at the bottom.
func rankOf(layers [][]string) (map[string]int, []string) {
	rank := map[string]int{}
	var problems []string
	for i, layer := range layers {
		for _, p := range layer {
			if _, dup := rank[p]; dup {
				problems = append(problems, "the table lists "+p+" twice")
			}
			rank[p] = i
		}
	}
	return rank, problems
}

// check returns what is wrong with pkgs (package → the module's packages
// it imports) against rank: a package without a layer, an import of a
// package of a higher layer, a listed package that does not exist.
func check(rank map[string]int, pkgs map[string][]string) []string {
	var problems []string
	names := make([]string, 0, len(pkgs))
	for n := range pkgs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		r, ok := rank[n]
		if !ok {
			problems = append(problems, fmt.Sprintf("package %s has no layer: add it to the table in internal/archtest", n))
			continue
		}
		for _, imp := range pkgs[n] {
			if ri, ok := rank[imp]; ok && ri > r {
				problems = append(problems, fmt.Sprintf("%s (layer %d) imports %s (layer %d): imports run one way, down", n, r, imp, ri))
			}
		}
	}
	var stale []string
	for p := range rank {
		if _, ok := pkgs[p]; !ok {
			stale = append(stale, p)
		}
	}
	sort.Strings(stale)
	for _, p := range stale {
		problems = append(problems, fmt.Sprintf("the table lists %s, which is no package of the module: take it out", p))
	}
	return problems
}

// TestImportsRunOneWay: no package imports one of a layer above its own;
// every package has a layer, and every package of the table exists.
func TestImportsRunOneWay(t *testing.T) {
	rank, problems := rankOf(layers)
	problems = append(problems, check(rank, listPackages(t))...)
	for _, p := range problems {
		t.Error(p)
	}
}

// TestCheckFindsEachProblem: the check fails an upward import naming both
// packages, a package the table does not place and a package it lists that
// is gone; imports within a layer and downward pass.
func TestCheckFindsEachProblem(t *testing.T) {
	rank, problems := rankOf([][]string{{"wire", "netns"}, {"stack"}, {"agent", "gone"}, {"wire"}})
	if len(problems) != 1 || !strings.Contains(problems[0], "wire twice") {
		t.Errorf("a package listed twice: %q", problems)
	}
	rank, _ = rankOf([][]string{{"wire", "netns"}, {"stack"}, {"agent", "gone"}})
	got := check(rank, map[string][]string{
		"wire":  {"netns", "stack"},
		"netns": nil,
		"stack": {"wire"},
		"agent": {"stack", "wire"},
		"flow":  nil,
	})
	want := []string{
		"package flow has no layer",
		"wire (layer 0) imports stack (layer 1)",
		"the table lists gone",
	}
	if len(got) != len(want) {
		t.Fatalf("got %q, want %d problems", got, len(want))
	}
	for i := range want {
		if !strings.HasPrefix(got[i], want[i]) {
			t.Errorf("problem %d: got %q, want %q…", i, got[i], want[i])
		}
	}
}
