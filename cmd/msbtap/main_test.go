package main

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

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
	var got runOptions
	startAgent = func(o runOptions) error { got = o; return nil }
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
	if got.netns != "/run/netns/sbx" || got.plan.Slot != 2 || got.plan.MTU != 1500 {
		t.Errorf("netns %q slot %d mtu %d: want /run/netns/sbx, 2 and 1500 (the flag wins)", got.netns, got.plan.Slot, got.plan.MTU)
	}
	if len(got.dnsUpstreams) != 1 || got.dnsUpstreams[0] != "198.51.100.53:53" || len(got.publish) != 1 || got.denyMode != 1 ||
		len(got.dnsBlockSuffix) != 1 || got.policy == nil || got.policy.DefaultAction != "deny" || len(got.policy.Rules) != 1 {
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
}
