package policy

import (
	"bytes"
	"strings"
	"testing"
)

func TestShow(t *testing.T) {
	f, err := ParseFile([]byte(`{"default_action": "deny", "rules": [
		{"destination": {"domain_suffix": "pypi.org"}, "protocols": ["tcp"], "ports": [{"start": 443}, {"start": 8000, "end": 8999}], "action": "allow"},
		{"destination": {"domain": "api.github.com"}, "http": {"methods": ["GET"], "paths": ["/repos/*"]}, "action": "allow"},
		{"direction": "ingress", "source": {"cidr": "127.0.0.0/8"}, "ports": [{"start": 8080}], "action": "deny"},
		{"destination": {"group": "metadata"}, "action": "terminate"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	Show(&b, f)
	for _, want := range []string{
		"flows no rule matches: deny (default_action deny)",
		`only names an allowing domain rule lists resolve`,
		"  0. allow tcp to ports 443, 8000-8999 of pypi.org and every name under it",
		"  1. allow every protocol to the name api.github.com",
		"for HTTP requests GET to paths /repos/*",
		"  2. deny clients of published ports (host port 8080) from addresses in 127.0.0.0/8",
		"  3. terminate the sandbox on every protocol to group metadata: 169.254.169.254, 169.254.170.2",
		"TLS server name or HTTP Host must be allowed too",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("no %q in:\n%s", want, b.String())
		}
	}
}

func TestShowPresets(t *testing.T) {
	for name, want := range map[string][]string{
		"public-only": {"deny every protocol to group host", "deny every protocol to group metadata: 169.254.169.254",
			"allow every protocol to group public: every address in no other group, except the special-purpose ranges 0.0.0.0/8", `("resolve": "all")`},
		"non-local": {"allow every protocol to group private: 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10, fc00::/7, fec0::/10"},
		"none":      {"flows no rule matches: deny", "rules: none"},
		"allow-all": {"flows no rule matches: allow", "0. allow every protocol to group host", "allowed only by a rule\n  that names them"},
	} {
		f, _ := Preset(name)
		var b bytes.Buffer
		Show(&b, f)
		for _, w := range want {
			if !strings.Contains(b.String(), w) {
				t.Errorf("%s: no %q in:\n%s", name, w, b.String())
			}
		}
	}
}

// TestShowAskPresetsAndDNS: show says what a preset of names holds (with
// the ports an allow of it gets), what ask does, and what a dns rule is.
func TestShowAskPresetsAndDNS(t *testing.T) {
	f, err := ParseFile([]byte(`{"default_action": "ask", "rules": [
		{"destination": {"preset": "pypi"}, "action": "allow"},
		{"destination": {"preset": "github"}, "ports": [{"start": 22}], "action": "allow"},
		{"destination": {"domain": "look.example"}, "protocols": ["dns"], "action": "allow"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	Show(&b, f)
	for _, want := range []string{
		"flows no rule matches: ask (hold until answered",
		"the lookup of any other is asked about",
		"  0. allow tcp to port 443 of preset pypi: pypi.org, files.pythonhosted.org, upload.pypi.org",
		"  1. allow tcp to port 22 of preset github: github.com",
		"  2. allow dns lookups (no connection) to the name look.example",
		"ICMP and single HTTP requests an ask decides are refused",
		"TLS server name or HTTP Host must be allowed too",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("no %q in:\n%s", want, b.String())
		}
	}
}
