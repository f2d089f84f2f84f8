package integration

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/msbtap/msbtap/internal/testkit/pattern"
	"github.com/msbtap/msbtap/internal/testkit/testenv"
)

// curlIn runs curl in the sandbox, resolving names through the gateway;
// resolve pins NAME to the web host without a lookup (curl --resolve).
func curlIn(t *testing.T, w *testenv.World, args ...string) (string, error) {
	t.Helper()
	return w.Guest.Run(append([]string{"curl", "-sS", "--max-time", "10"}, args...)...)
}

// resolveTo makes curl send name to the web host without asking DNS.
func resolveTo(name, port string) string { return name + ":" + port + ":" + testenv.WebHost4 }

// auditLines returns the audit log's records.
func auditLines(t *testing.T, path string) []map[string]any {
	t.Helper()
	b, _ := os.ReadFile(path)
	var out []map[string]any
	for _, l := range strings.Split(string(b), "\n") {
		var r map[string]any
		if json.Unmarshal([]byte(l), &r) == nil {
			out = append(out, r)
		}
	}
	return out
}

func hasRecord(recs []map[string]any, want map[string]string) bool {
	for _, r := range recs {
		ok := true
		for k, v := range want {
			if s, _ := r[k].(string); !strings.Contains(s, v) {
				ok = false
				break
			}
		}
		if ok {
			return true
		}
	}
	return false
}

// TestNameChecks: with a policy that allows one name, a connection to its
// address must ask for that name: another SNI, another Host, or none is
// refused and logged, without interception; a protocol where the server
// speaks first is decided by the DNS pin alone.
func TestNameChecks(t *testing.T) {
	testenv.RequireTools(t, "curl")
	w := testenv.NewWorld(t)
	alog := filepath.Join(t.TempDir(), "audit.log")
	pol := writePolicy(t, `{"default_action": "deny", "rules": [{"destination": {"domain": "`+testenv.TestDomain+`"}, "action": "allow"}]}`)
	w.StartAgent(t, "--policy", pol, "--audit-log", alog)
	web := "https://" + testenv.TestDomain

	out, err := curlIn(t, w, "--cacert", w.TestCA, web+"/echo")
	if err != nil || !strings.Contains(out, `"sni":"`+testenv.TestDomain+`"`) {
		t.Fatalf("the allowed name over HTTPS: %v %s", err, out)
	}
	if out, err := curlIn(t, w, "http://"+testenv.TestDomain+"/echo"); err != nil || !strings.Contains(out, `"host":"`+testenv.TestDomain+`"`) {
		t.Errorf("the allowed name over HTTP: %v %s", err, out)
	}
	// Its address is now pinned to the allowed name. Other names on it:
	for _, tc := range []struct {
		what string
		args []string
	}{
		{"another SNI", []string{"--cacert", w.TestCA, "--resolve", resolveTo(testenv.OtherDomain, "443"), "https://" + testenv.OtherDomain + "/echo"}},
		{"another SNI, the allowed Host", []string{"--cacert", w.TestCA, "--resolve", resolveTo(testenv.OtherDomain, "443"), "-H", "Host: " + testenv.TestDomain, "https://" + testenv.OtherDomain + "/echo"}},
		{"another Host", []string{"-H", "Host: " + testenv.OtherDomain, "http://" + testenv.TestDomain + "/echo"}},
	} {
		out, err := curlIn(t, w, tc.args...)
		if err == nil || strings.Contains(out, `"host"`) {
			t.Errorf("%s: got through: %s", tc.what, out)
		}
	}
	// A second request on the same connection asks for another host: the
	// first is answered, the second refused.
	two := "GET /echo HTTP/1.1\r\nHost: " + testenv.TestDomain + "\r\n\r\nGET /echo HTTP/1.1\r\nHost: " + testenv.OtherDomain + "\r\n\r\n"
	out, _ = w.Guest.Run("sh", "-c", "printf '"+two+"' | "+w.Testhost+" send "+testenv.WebHost4+":80")
	if !strings.Contains(out, `"host":"`+testenv.TestDomain+`"`) || strings.Contains(out, `"host":"`+testenv.OtherDomain+`"`) || !strings.Contains(out, "403 Forbidden") {
		t.Errorf("another host on a second request:\n%s", out)
	}
	// A client that shuts its write side after its request (`nc -N`) gets
	// the whole answer, though the server takes its time.
	slow := "GET /slow?ms=300 HTTP/1.1\r\nHost: " + testenv.TestDomain + "\r\n\r\n"
	out, _ = w.Guest.Run("sh", "-c", "printf '"+slow+"' | "+w.Testhost+" send "+testenv.WebHost4+":80 halfclose")
	if !strings.Contains(out, "200 OK") || !strings.Contains(out, "slow done") {
		t.Errorf("a request followed by a half-close:\n%s", out)
	}
	// No SNI at all.
	if out, err := w.Guest.Run(w.Testhost, "tlsdial", testenv.WebHost4+":443", ""); err == nil {
		t.Errorf("TLS without SNI got through: %s", out)
	}
	// Server speaks first: decided by the pin.
	if out, err := w.Guest.Run(w.Testhost, "banner", testenv.TestDomain+":22"); err != nil || !strings.Contains(out, "SSH-2.0-testhost / SSH-2.0-client") {
		t.Errorf("a server-first protocol on the allowed name: %v %s", err, out)
	}
	w.StopAgent(t)
	recs := auditLines(t, alog)
	for _, want := range []map[string]string{
		{"action": "deny", "sni": testenv.OtherDomain, "mode": "refused"},
		{"action": "deny", "host": testenv.OtherDomain, "mode": "refused"},
		{"action": "deny", "reason": "without a server name"},
		{"action": "allow", "sni": testenv.TestDomain, "mode": "spliced"},
	} {
		if !hasRecord(recs, want) {
			t.Errorf("no audit record like %v", want)
		}
	}
}

// TestTLSInterception: with --tls-intercept all, curl trusting only
// msbtap's CA gets the page over HTTP/1.1 and HTTP/2, from a certificate
// msbtap's CA issued; an untrusted upstream gives 502 with the reason; a
// Host that is not the SNI gives 421; a bypassed name is spliced (curl
// trusting only the test CA succeeds).
func TestTLSInterception(t *testing.T) {
	testenv.RequireTools(t, "curl")
	w := testenv.NewWorld(t)
	ca := filepath.Join(t.TempDir(), "msbtap-ca.pem")
	pol := writePolicy(t, `{"default_action": "deny", "rules": [
		{"destination": {"domain": "`+testenv.TestDomain+`"}, "action": "allow"},
		{"destination": {"domain": "`+testenv.OtherDomain+`"}, "action": "allow"}]}`)
	w.StartAgent(t, "--policy", pol, "--tls-intercept", "all", "--tls-ca-out", ca, "--tls-upstream-ca", w.TestCA,
		"--tls-bypass", testenv.OtherDomain)
	web := "https://" + testenv.TestDomain

	for _, v := range []struct{ flag, proto string }{{"--http1.1", "HTTP/1.1"}, {"--http2", "HTTP/2.0"}} {
		out, err := curlIn(t, w, "--cacert", ca, v.flag, web+"/echo")
		var e struct{ Proto, SNI, Host string }
		if err != nil || json.Unmarshal([]byte(out), &e) != nil || e.Proto != v.proto || e.SNI != testenv.TestDomain || e.Host != testenv.TestDomain {
			t.Errorf("%s through interception: %v %s", v.flag, err, out)
		}
	}
	out, _ := w.Guest.Run(w.Testhost, "tlsdial", hostPort(testenv.WebHost4, "443"), testenv.TestDomain, "h2,http/1.1")
	if !strings.Contains(out, "issuer=msbtap sandbox CA") || !strings.Contains(out, "subject="+testenv.TestDomain) || !strings.Contains(out, "alpn=h2") {
		t.Errorf("the certificate the sandbox sees: %s", out)
	}
	// Trusting only the test CA fails: the sandbox sees msbtap's.
	if out, err := curlIn(t, w, "--cacert", w.TestCA, web+"/"); err == nil {
		t.Errorf("curl trusting only the test CA got through interception: %s", out)
	}
	// An upstream whose certificate nobody trusts.
	out, err := curlIn(t, w, "--cacert", ca, "-i", "https://"+testenv.TestDomain+":8443/")
	if err != nil || !strings.Contains(out, "502") || !strings.Contains(strings.ToLower(out), "x-msbtap-error: upstream tls") {
		t.Errorf("an untrusted upstream: %v %s", err, out)
	}
	// Host ≠ SNI.
	out, err = curlIn(t, w, "--cacert", ca, "-i", "-H", "Host: "+testenv.OtherDomain, web+"/echo")
	if err != nil || !strings.Contains(out, "421") || strings.Contains(out, `"host"`) {
		t.Errorf("Host other than the SNI: %v %s", err, out)
	}
	// The bypassed name is spliced: the test CA's certificate reaches the
	// sandbox.
	out, err = curlIn(t, w, "--cacert", w.TestCA, "https://"+testenv.OtherDomain+"/echo")
	if err != nil || !strings.Contains(out, `"sni":"`+testenv.OtherDomain+`"`) {
		t.Errorf("a bypassed name: %v %s", err, out)
	}
}

// TestInterceptedTransfersWhole: large uploads and downloads through
// interception arrive whole, HTTP/1.1 and HTTP/2.
func TestInterceptedTransfersWhole(t *testing.T) {
	testenv.RequireTools(t, "curl", "sha256sum")
	w := testenv.NewWorld(t)
	ca := filepath.Join(t.TempDir(), "msbtap-ca.pem")
	w.StartAgent(t, "--policy", "allow-all", "--tls-intercept", "all", "--tls-ca-out", ca, "--tls-upstream-ca", w.TestCA)
	const size = 32 << 20
	h := sha256.New()
	io.Copy(h, pattern.Reader(size))
	want := hex.EncodeToString(h.Sum(nil))
	up := filepath.Join(t.TempDir(), "upload")
	f, _ := os.Create(up)
	io.Copy(f, pattern.Reader(size))
	f.Close()
	for _, v := range []string{"--http1.1", "--http2"} {
		out, err := w.Guest.Run("sh", "-c", "curl -sS --max-time 60 --cacert "+ca+" "+v+" https://"+testenv.TestDomain+"/bytes?n="+strconv.Itoa(size)+" | sha256sum")
		if err != nil || !strings.HasPrefix(out, want) {
			t.Errorf("%s download: %v %s, want %s", v, err, out, want)
		}
		out, err = curlIn(t, w, "--max-time", "60", "--cacert", ca, v, "--data-binary", "@"+up, "https://"+testenv.TestDomain+"/sha256")
		if err != nil || strings.TrimSpace(out) != strconv.Itoa(size)+" "+want {
			t.Errorf("%s upload: %v %s", v, err, out)
		}
	}
}

// TestHTTPRules: on an intercepted host, an allowed GET passes; a denied
// method or path gets 403 with the reason and an audit line.
func TestHTTPRules(t *testing.T) {
	testenv.RequireTools(t, "curl")
	w := testenv.NewWorld(t)
	ca := filepath.Join(t.TempDir(), "msbtap-ca.pem")
	alog := filepath.Join(t.TempDir(), "audit.log")
	pol := writePolicy(t, `{"default_action": "deny", "rules": [
		{"destination": {"domain": "`+testenv.TestDomain+`"}, "http": {"methods": ["GET"], "paths": ["/echo*"]}, "action": "allow"}]}`)
	w.StartAgent(t, "--policy", pol, "--tls-ca-out", ca, "--tls-upstream-ca", w.TestCA, "--audit-log", alog) // --tls-intercept auto
	web := "https://" + testenv.TestDomain
	if out, err := curlIn(t, w, "--cacert", ca, web+"/echo?x=1"); err != nil || !strings.Contains(out, `"method":"GET"`) {
		t.Errorf("allowed GET: %v %s", err, out)
	}
	for _, args := range [][]string{{"-X", "POST", "-d", "x", web + "/echo"}, {web + "/bytes?n=10"}} {
		out, err := curlIn(t, w, append([]string{"--cacert", ca, "-i"}, args...)...)
		if err != nil || !strings.Contains(out, "403") || !strings.Contains(strings.ToLower(out), "x-msbtap-reason:") || strings.Contains(out, `"method"`) {
			t.Errorf("%v: %v %s", args, err, out)
		}
	}
	w.StopAgent(t)
	recs := auditLines(t, alog)
	for _, want := range []map[string]string{
		{"action": "deny", "method": "POST", "path": "/echo", "host": testenv.TestDomain},
		{"action": "deny", "method": "GET", "path": "/bytes"},
		{"action": "allow", "mode": "intercepted", "sni": testenv.TestDomain},
	} {
		if !hasRecord(recs, want) {
			t.Errorf("no audit record like %v", want)
		}
	}
}

// TestQUICRefused: UDP to port 443 of a name-checked host gets ICMP port
// unreachable at once, so clients fall back to TCP.
func TestQUICRefused(t *testing.T) {
	testenv.RequireTools(t, "dig")
	w := testenv.NewWorld(t)
	pol := writePolicy(t, `{"default_action": "deny", "rules": [{"destination": {"domain": "`+testenv.TestDomain+`"}, "action": "allow"}]}`)
	w.StartAgent(t, "--policy", pol)
	w.Guest.MustRun(t, "dig", "+short", testenv.TestDomain)
	start := time.Now()
	out, err := w.Guest.Run(w.Testhost, "udp", testenv.WebHost4+":443", "quic")
	if err == nil || !strings.Contains(out, "connection refused") || time.Since(start) > 2*time.Second {
		t.Errorf("UDP to 443: %v %q after %s, want a prompt port unreachable", err, out, time.Since(start))
	}
	// DNS over TLS is refused too.
	if ok, out := reach(t, w, "tcp", testenv.WebHost4+":853"); ok {
		t.Errorf("DNS over TLS got through: %s", out)
	}
}
