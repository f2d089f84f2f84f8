package integration

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/msbtap/msbtap/internal/testenv"
)

// TestDomainDenyHolds: under "default allow, deny a domain", the denied
// name is refused whatever address the flow goes to: by the bare address
// with its Host, with its SNI, and on an address it shares with a name
// the sandbox looked up; other names go through. The old code read only
// flows a domain rule allowed, so all three reached the denied name.
func TestDomainDenyHolds(t *testing.T) {
	testenv.RequireTools(t, "curl")
	w := testenv.NewWorld(t)
	alog := filepath.Join(t.TempDir(), "audit.log")
	pol := writePolicy(t, `{"default_action": "allow", "rules": [{"destination": {"domain": "`+testenv.OtherDomain+`"}, "action": "deny"}]}`)
	w.StartAgent(t, "--policy", pol, "--audit-log", alog)

	if out, err := curlIn(t, w, "-H", "Host: "+testenv.TestDomain, "http://"+testenv.WebHost4+"/echo"); err != nil || !strings.Contains(out, `"host":"`+testenv.TestDomain+`"`) {
		t.Errorf("an allowed Host on the bare address: %v %s", err, out)
	}
	if out, err := curlIn(t, w, "--cacert", w.TestCA, "--resolve", resolveTo(testenv.TestDomain, "443"), "https://"+testenv.TestDomain+"/echo"); err != nil || !strings.Contains(out, `"sni":"`+testenv.TestDomain+`"`) {
		t.Errorf("an allowed SNI on the bare address: %v %s", err, out)
	}
	// Looked up: the address is now pinned to the allowed name.
	if out, err := curlIn(t, w, "http://"+testenv.TestDomain+"/echo"); err != nil || !strings.Contains(out, `"host":"`+testenv.TestDomain+`"`) {
		t.Errorf("the allowed name by DNS: %v %s", err, out)
	}
	for _, tc := range []struct {
		what string
		args []string
	}{
		{"the denied Host on the address", []string{"-H", "Host: " + testenv.OtherDomain, "http://" + testenv.WebHost4 + "/echo"}},
		{"the denied Host on the allowed name's address", []string{"-H", "Host: " + testenv.OtherDomain, "http://" + testenv.TestDomain + "/echo"}},
		{"the denied SNI on the address", []string{"--cacert", w.TestCA, "--resolve", resolveTo(testenv.OtherDomain, "443"), "https://" + testenv.OtherDomain + "/echo"}},
	} {
		if out, err := curlIn(t, w, tc.args...); err == nil || strings.Contains(out, `"host"`) {
			t.Errorf("%s: got through: %s", tc.what, out)
		}
	}
	// A later request for the denied name on a connection that began
	// with an allowed one.
	two := "GET /echo HTTP/1.1\r\nHost: " + testenv.TestDomain + "\r\n\r\nGET /echo HTTP/1.1\r\nHost: " + testenv.OtherDomain + "\r\n\r\n"
	out, _ := w.Guest.Run("sh", "-c", "printf '"+two+"' | "+w.Testhost+" send "+testenv.WebHost4+":80")
	if !strings.Contains(out, `"host":"`+testenv.TestDomain+`"`) || strings.Contains(out, `"host":"`+testenv.OtherDomain+`"`) || !strings.Contains(out, "403 Forbidden") {
		t.Errorf("the denied host on a second request:\n%s", out)
	}
	// Ports no domain rule names are not read: a server-first protocol.
	if out, err := w.Guest.Run(w.Testhost, "banner", testenv.WebHost4+":22"); err != nil || !strings.Contains(out, "SSH-2.0-testhost") {
		t.Errorf("port 22: %v %s", err, out)
	}
	w.StopAgent(t)
	recs := auditLines(t, alog)
	for _, want := range []map[string]string{
		{"action": "deny", "sni": testenv.OtherDomain, "mode": "refused"},
		{"action": "deny", "host": testenv.OtherDomain, "mode": "refused"},
	} {
		if !hasRecord(recs, want) {
			t.Errorf("no audit record like %v", want)
		}
	}
}
