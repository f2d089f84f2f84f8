package main

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/msbtap/msbtap/process"
	"github.com/msbtap/msbtap/stack"
)

// TestMain fails the package's tests if any goroutine outlives them.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func runApp(args ...string) (stdout string, err error) {
	var out, errOut bytes.Buffer
	err = newApp(&out, &errOut).Run(append([]string{"msbtap"}, args...))
	return out.String(), err
}

func TestFlagErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"nothing to attach", []string{"run"}, "nothing to attach"},
		{"slot too big", []string{"run", "--netns", "x", "--slot", "65536"}, "--slot"},
		{"slot negative", []string{"run", "--netns", "x", "--slot", "-1"}, "--slot"},
		{"slot not a number", []string{"run", "--netns", "x", "--slot", "abc"}, "slot"},
		{"mtu too small", []string{"run", "--netns", "x", "--mtu", "500"}, "--mtu"},
		{"mtu zero", []string{"run", "--netns", "x", "--mtu", "0"}, "--mtu"},
		{"bad ipv4", []string{"run", "--netns", "x", "--guest-ipv4", "300.1.1.1"}, "--guest-ipv4"},
		{"bad ipv6", []string{"run", "--netns", "x", "--guest-ipv6", "nope"}, "--guest-ipv6"},
		{"bad mac", []string{"run", "--netns", "x", "--guest-mac", "02:00"}, "--guest-mac"},
		{"bad log format", []string{"run", "--netns", "x", "--log-format", "xml"}, "--log-format"},
		{"bad log level", []string{"run", "--netns", "x", "--log-level", "loud"}, "--log-level"},
		{"unknown flag", []string{"run", "--netns", "x", "--frobnicate"}, "frobnicate"},
		{"empty netns", []string{"run", "--netns", ""}, "--netns"},
		{"long tap name", []string{"run", "--netns", "x", "--tap", "abcdefghijklmnop"}, "--tap"},
		{"ready-fd stdout", []string{"run", "--netns", "x", "--ready-fd", "1"}, "--ready-fd"},
		{"bad dns upstream", []string{"run", "--netns", "x", "--dns-upstream", "resolver.example"}, "--dns-upstream"},
		{"max connections zero", []string{"run", "--netns", "x", "--max-connections", "0"}, "--max-connections"},
		{"unknown allow preset", []string{"run", "--netns", "x", "--allow", "pypi,nosuch"}, "--allow"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := runApp(tc.args...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error mentioning %q", err, tc.want)
			}
			var ee *exitError
			if !errors.As(err, &ee) || ee.code != 2 {
				t.Fatalf("got %#v, want exit status 2 for a usage error", err)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error is not one line: %q", err)
			}
		})
	}
}

func TestVersion(t *testing.T) {
	out, err := runApp("version")
	if err != nil || !strings.HasPrefix(out, "msbtap ") {
		t.Fatalf("got %q, %v", out, err)
	}
}

func TestConfigCommand(t *testing.T) {
	out, err := runApp("config", "--slot", "1")
	if err != nil || !strings.Contains(out, "MSB_NET_IPV4_ADDRESS=100.96.0.6/30\n") || !strings.Contains(out, "MSB_NET_MAC=02:6d:73:00:01:02\n") ||
		!strings.Contains(out, "MSB_NET_IPV6_GATEWAY=fd42:6d73:62:1::1\n") {
		t.Errorf("env: %v\n%s", err, out)
	}
	out, err = runApp("config", "--slot", "1", "--format", "cmdline")
	if want := "ip=100.96.0.6::100.96.0.5:255.255.255.252::eth0:off:100.96.0.5\n"; err != nil || out != want {
		t.Errorf("cmdline: got %q, want %q (%v)", out, want, err)
	}
	out, err = runApp("config", "--slot", "65535", "--format", "json", "--mtu", "9000")
	if err != nil || !strings.Contains(out, `"MSB_NET_MTU": "9000"`) || !strings.Contains(out, `"MSB_NET_IPV4_ADDRESS": "100.99.255.254/30"`) {
		t.Errorf("json: %v\n%s", err, out)
	}
	if _, err := runApp("config", "--format", "yaml"); err == nil || !strings.Contains(err.Error(), "--format") {
		t.Errorf("bad format: %v", err)
	}
}

func TestConfigFileAndFlagsWin(t *testing.T) {
	var got process.Config
	startAgent = func(c process.Config) error { got = c; return nil }
	defer func() { startAgent = runAgent }()
	cfg := filepath.Join(t.TempDir(), "msbtap.json")
	os.WriteFile(cfg, []byte(`{
		"netns": "sbx", "slot": 2, "mtu": 9000, "dns_upstream": ["198.51.100.53"],
		"publish": ["8080:80"], "deny_mode": "drop", "dns_block_suffix": ["ads.test"],
		"policy": {"default_action": "deny", "rules": [{"destination": {"domain": "x.test"}, "action": "allow"}]}
	}`), 0o644)
	if _, err := runApp("run", "--config", cfg, "--mtu", "1500"); err != nil {
		t.Fatal(err)
	}
	if got.Netns != "/run/netns/sbx" || got.Plan.Slot != 2 || got.Plan.MTU != 1500 {
		t.Errorf("netns %q slot %d mtu %d: want /run/netns/sbx, 2 and 1500 (the flag wins)", got.Netns, got.Plan.Slot, got.Plan.MTU)
	}
	if len(got.DNSUpstreams) != 1 || got.DNSUpstreams[0] != "198.51.100.53:53" || len(got.Publish) != 1 || got.DenyMode != stack.DenyDrop ||
		len(got.DNSBlockSuffix) != 1 || got.Policy == nil || got.Policy.DefaultAction != "deny" || len(got.Policy.Rules) != 1 {
		t.Errorf("config not applied: %+v", got)
	}
	os.WriteFile(cfg, []byte(`{"netns": "sbx", "slto": 2}`), 0o644)
	if _, err := runApp("run", "--config", cfg); err == nil || !strings.Contains(err.Error(), `unknown key "slto"`) {
		t.Errorf("unknown key: %v", err)
	}
	os.WriteFile(cfg, []byte(`{"netns": "sbx", "policy": {"default_action": "deny", "rules": [{"destination": "any"}]}}`), 0o644)
	if _, err := runApp("run", "--config", cfg); err == nil || !strings.Contains(err.Error(), "rules[0].action") {
		t.Errorf("bad inline policy: %v", err)
	}
	os.WriteFile(cfg, []byte(`{"netns": "sbx", "slot": "two"}`), 0o644)
	if _, err := runApp("run", "--config", cfg); err == nil || err.Error() != "--config "+cfg+": slot: want int" {
		t.Errorf("a value of the wrong type: %v", err)
	}
	// -p adds to the config file's publish.
	os.WriteFile(cfg, []byte(`{"netns": "sbx", "publish": ["8080:80"]}`), 0o644)
	if _, err := runApp("run", "--config", cfg, "-p", "8081:81"); err != nil || len(got.Publish) != 2 {
		t.Errorf("-p with the config's publish: %v, %+v", err, got.Publish)
	}
	// A bad value from the config file is named by its key, not a flag.
	os.WriteFile(cfg, []byte(`{"netns": "sbx", "guest_ipv4": "300.1.1.1"}`), 0o644)
	if _, err := runApp("run", "--config", cfg); err == nil || !strings.Contains(err.Error(), `guest_ipv4 (in --config `+cfg+`) "300.1.1.1": not an IPv4 address`) {
		t.Errorf("bad config value: %v", err)
	}
}
func TestPolicyCheckReportsEveryError(t *testing.T) {
	f := filepath.Join(t.TempDir(), "p.json")
	os.WriteFile(f, []byte(`{"default_action": "deny", "rules": [
		{"destination": {"group": "lan"}, "action": "allow"},
		{"destination": "any", "protocols": ["sctp"], "action": "deny"},
		{"destination": "any", "action": "alow"}]}`), 0o644)
	var out, errOut bytes.Buffer
	err := newApp(&out, &errOut).Run([]string{"msbtap", "policy", "check", f})
	var ee *exitError
	if !errors.As(err, &ee) || ee.code != 1 {
		t.Fatalf("got %v, want exit status 1", err)
	}
	for _, want := range []string{
		f + `: policy: rules[0].destination: group: unknown group "lan"`,
		f + `: policy: rules[1].protocols[0]: "sctp"`,
		f + `: policy: rules[2].action: "alow"`,
		f + ": 3 error(s)",
	} {
		if !strings.Contains(errOut.String(), want+"") {
			t.Errorf("output lacks %q:\n%s", want, errOut.String())
		}
	}
}

// TestManPageCurrent: docs/msbtap.1 is what the flag definitions generate
// (run `make man` after changing a flag).
func TestManPageCurrent(t *testing.T) {
	out, err := runApp("man")
	if err != nil {
		t.Fatal(err)
	}
	have, err := os.ReadFile("../../docs/msbtap.1")
	if err != nil {
		t.Fatal(err)
	}
	if string(have) != out {
		t.Error("docs/msbtap.1 is stale: run `make man` and commit it")
	}
	for _, want := range []string{"--publish", "--policy", ".SS check", "completion"} {
		if !strings.Contains(out, want) {
			t.Errorf("man page lacks %q", want)
		}
	}
}

func TestCompletionScripts(t *testing.T) {
	for _, sh := range []string{"bash", "zsh", "fish"} {
		out, err := runApp("completion", sh)
		if err != nil || !strings.Contains(out, "msbtap") {
			t.Errorf("%s: %v\n%s", sh, err, out)
		}
	}
	if _, err := runApp("completion", "tcsh"); err == nil {
		t.Error("tcsh: no error")
	}
}

func TestPolicyExplainShowsResolve(t *testing.T) {
	for _, tc := range []struct{ policy, want string }{
		{"none", `names no domain rule lists: NXDOMAIN ("resolve": "listed"`},
		{"public-only", `names no domain rule lists: resolve ("resolve": "all")`},
		{"allow-all", "names no domain rule lists: resolve (default_action allow)"},
	} {
		out, err := runApp("policy", "explain", "--policy", tc.policy, "--dst", "198.51.100.7:443")
		if err != nil || !strings.Contains(out, tc.want) {
			t.Errorf("%s: %v\n%s", tc.policy, err, out)
		}
	}
}

func TestPolicyExplainPreset(t *testing.T) {
	out, err := runApp("policy", "explain", "--preset", "debian")
	if err != nil || !strings.Contains(out, "domain deb.debian.org") || !strings.Contains(out, "tcp 80, 443") || !strings.Contains(out, "source: ") {
		t.Errorf("--preset debian: %v\n%s", err, out)
	}
	out, err = runApp("policy", "explain", "--preset", "list")
	if err != nil || !strings.Contains(out, "huggingface") || !strings.Contains(out, "rubygems") {
		t.Errorf("--preset list: %v\n%s", err, out)
	}
	if _, err := runApp("policy", "explain", "--preset", "nosuch"); err == nil || !strings.Contains(err.Error(), "pypi") {
		t.Errorf("unknown preset: %v", err)
	}
	// A preset in a rule, explained for a flow to one of its names.
	out, err = runApp("policy", "explain", "--policy", writeFile(t, `{"default_action": "deny", "rules": [{"destination": {"preset": "pypi"}, "action": "allow"}]}`),
		"--dst", "198.51.100.7:443", "--domain", "pypi.org")
	if err != nil || !strings.HasPrefix(out, "allow\nby rules[0]: allow egress to preset pypi") {
		t.Errorf("explain a preset rule: %v\n%s", err, out)
	}
}

func writeFile(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "f.json")
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestPolicySuggest: a decision log becomes a policy that policy check
// accepts, on standard output or atomically in a file.
func TestPolicySuggest(t *testing.T) {
	logf := writeFile(t, `{"time":"t","direction":"egress","proto":"dns","transport":"udp","src":"100.96.0.2:5000","domain":"files.pythonhosted.org","rule":-1,"rule_text":"d","action":"deny"}
{"time":"t","direction":"egress","proto":"tcp","src":"100.96.0.2:40000","dst":"198.51.100.7:443","domain":"files.pythonhosted.org","rule":-1,"rule_text":"d","action":"deny"}
`)
	out, err := runApp("policy", "suggest", "--suffix-depth", "2", logf)
	if err != nil || !strings.Contains(out, `"domain_suffix": "pythonhosted.org"`) || strings.Contains(out, `"dns"`) {
		t.Fatalf("suggest: %v\n%s", err, out)
	}
	dst := filepath.Join(t.TempDir(), "suggested.json")
	if _, err := runApp("policy", "suggest", "-o", dst, logf); err != nil {
		t.Fatal(err)
	}
	if out, err := runApp("policy", "check", dst); err != nil || !strings.Contains(out, "ok (1 rules, default_action deny)") {
		t.Errorf("policy check of the suggestion: %v %s", err, out)
	}
	for _, args := range [][]string{{"policy", "suggest"}, {"policy", "suggest", "--suffix-depth", "1", logf}} {
		if _, err := runApp(args...); err == nil {
			t.Errorf("%v: no usage error", args)
		}
	}
}

// TestCommandFlags: --env and --bind reach the agent whole (a comma is part
// of a value, as in --secret NAME@HOST,HOST), from the command line and
// from --config; --env is refused without a command.
func TestCommandFlags(t *testing.T) {
	var got process.Config
	startAgent = func(c process.Config) error { got = c; return nil }
	defer func() { startAgent = runAgent }()
	if _, err := runApp("run", "--env", "NO_PROXY=a.test,b.test", "--env", "TERM", "--bind-ro", "/etc",
		"--secret", "TOKEN@a.test,b.test", "--", "true"); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got.CommandEnv, []string{"NO_PROXY=a.test,b.test", "TERM"}) || len(got.CommandBinds) != 1 || !got.CommandBinds[0].ReadOnly ||
		len(got.Secrets.Flags) != 1 || !slices.Equal(got.Secrets.Flags[0].Hosts, []string{"a.test", "b.test"}) {
		t.Errorf("env %q, binds %+v, secrets %+v", got.CommandEnv, got.CommandBinds, got.Secrets.Flags)
	}
	cfg := filepath.Join(t.TempDir(), "msbtap.json")
	os.WriteFile(cfg, []byte(`{"env": ["A=1"], "bind": ["/etc"], "bind_ro": ["/usr"]}`), 0o644)
	if _, err := runApp("run", "--config", cfg, "--", "true"); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got.CommandEnv, []string{"A=1"}) || len(got.CommandBinds) != 2 {
		t.Errorf("from --config: env %q, binds %+v", got.CommandEnv, got.CommandBinds)
	}
	if _, err := runApp("run", "--netns", "x", "--env", "A=1"); err == nil || !strings.Contains(err.Error(), "--env") {
		t.Errorf("--env without a command: %v", err)
	}
}
