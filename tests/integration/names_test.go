package integration

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/msbtap/msbtap/internal/testkit/testenv"
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

// TestH2CByName: gRPC in clear text (HTTP/2 with prior knowledge) to a
// name the policy allows works, stream by stream: a Go gRPC-style client
// makes its calls on one connection, and a call whose :authority is
// another name is refused (403) while the others on the connection go on;
// curl --http2-prior-knowledge likewise. The old code refused every such
// flow ("cleartext HTTP/2: its host cannot be checked").
func TestH2CByName(t *testing.T) {
	testenv.RequireTools(t, "curl")
	w := testenv.NewWorld(t)
	alog := filepath.Join(t.TempDir(), "audit.log")
	pol := writePolicy(t, `{"default_action": "deny", "rules": [{"destination": {"domain": "`+testenv.TestDomain+`"}, "action": "allow"}]}`)
	w.StartAgent(t, "--policy", pol, "--audit-log", alog)
	addr := testenv.TestDomain + ":80" // looked up through the gateway: pinned

	out, err := w.Guest.Run(w.Testhost, "grpc", addr, testenv.TestDomain, testenv.TestDomain)
	if err != nil || strings.Count(out, testenv.TestDomain+` ok said "hello" to `+testenv.TestDomain) != 2 {
		t.Fatalf("gRPC over h2c to the allowed name: %v\n%s", err, out)
	}
	out, err = w.Guest.Run(w.Testhost, "grpc", addr, testenv.TestDomain, testenv.OtherDomain, testenv.TestDomain)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if err == nil || len(lines) != 3 || !strings.Contains(lines[0], " ok ") || !strings.Contains(lines[1], testenv.OtherDomain+" failed: HTTP 403") || !strings.Contains(lines[2], " ok ") {
		t.Errorf("another :authority on the connection: %v\n%s", err, out)
	}
	if out, err := curlIn(t, w, "--http2-prior-knowledge", "http://"+testenv.TestDomain+"/echo"); err != nil || !strings.Contains(out, `"proto":"HTTP/2.0"`) || !strings.Contains(out, `"host":"`+testenv.TestDomain+`"`) {
		t.Errorf("curl --http2-prior-knowledge: %v %s", err, out)
	}
	if out, err := curlIn(t, w, "--http2-prior-knowledge", "-w", "%{http_code}", "-o", "/dev/null", "-H", "Host: "+testenv.OtherDomain, "http://"+testenv.TestDomain+"/echo"); err != nil || out != "403" {
		t.Errorf("curl --http2-prior-knowledge for another Host: %v %q", err, out)
	}
	w.StopAgent(t)
	if !hasRecord(auditLines(t, alog), map[string]string{"action": "deny", "host": testenv.OtherDomain, "mode": "request"}) {
		t.Error("no audit record of the refused stream")
	}
}

// TestRequestFormsByName: through the agent, on the allowed name's
// address, requests written in forms the old code did not read reach no
// other host: a lower-case method, a blank line first, a Host with a port
// that is no port; an h2c upgrade offer is answered over HTTP/1.1.
func TestRequestFormsByName(t *testing.T) {
	testenv.RequireTools(t, "curl")
	w := testenv.NewWorld(t)
	pol := writePolicy(t, `{"default_action": "deny", "rules": [{"destination": {"domain": "`+testenv.TestDomain+`"}, "action": "allow"}]}`)
	w.StartAgent(t, "--policy", pol)
	if out, err := curlIn(t, w, "http://"+testenv.TestDomain+"/echo"); err != nil || !strings.Contains(out, `"host":"`+testenv.TestDomain+`"`) {
		t.Fatalf("the allowed name: %v %s", err, out) // and its address is pinned
	}
	send := func(raw string) string {
		out, _ := w.Guest.Run("sh", "-c", "printf '"+raw+"' | "+w.Testhost+" send "+testenv.WebHost4+":80 halfclose")
		return out
	}
	if out := send("get /echo HTTP/1.1\\r\\nHost: " + testenv.TestDomain + "\\r\\n\\r\\n"); !strings.Contains(out, `"method":"get"`) {
		t.Errorf("a lower-case method for the allowed name:\n%s", out)
	}
	for _, raw := range []string{
		"get /echo HTTP/1.1\\r\\nHost: " + testenv.OtherDomain + "\\r\\n\\r\\n",
		"FOO /echo HTTP/1.1\\r\\nHost: " + testenv.OtherDomain + "\\r\\n\\r\\n",
		"\\r\\nGET /echo HTTP/1.1\\r\\nHost: " + testenv.OtherDomain + "\\r\\n\\r\\n",
		"GET /echo HTTP/1.1\\r\\nHost: " + testenv.TestDomain + ".:80." + testenv.OtherDomain + "\\r\\n\\r\\n",
		"GET /echo HTTP/1.1\\r\\nHost: " + testenv.TestDomain + "\\r\\n\\r\\nGET /echo HTTP/1.1\\r\\nHost: " + testenv.TestDomain + ":80.evil\\r\\n\\r\\n",
	} {
		if out := send(raw); strings.Contains(out, `"host":"`+testenv.OtherDomain) || strings.Contains(out, `80.evil","method"`) {
			t.Errorf("%q reached another host:\n%s", raw, out)
		}
	}
	if out, err := curlIn(t, w, "--http2", "http://"+testenv.TestDomain+"/echo"); err != nil || !strings.Contains(out, `"proto":"HTTP/1.1"`) {
		t.Errorf("curl --http2 (an h2c upgrade offer): %v %s", err, out)
	}
}
