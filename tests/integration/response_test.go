package integration

import (
	"bytes"
	"compress/gzip"
	"crypto/rand"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/msbtap/msbtap/internal/testkit/testenv"
)

// TestSecretsNeverComeBack: a secret's host that sends the value back (in
// a body, a gzip body, a 103 Early Hints, a trailer, a redirect) gets it
// to the sandbox only as the placeholder: curl's trace, every byte it
// received (decrypted, before and after decoding), holds no value, over
// HTTP/1.1 and HTTP/2.
func TestSecretsNeverComeBack(t *testing.T) {
	testenv.RequireTools(t, "curl")
	w := testenv.NewWorld(t)
	dir := t.TempDir()
	value := randomValue(t)
	valueFile := filepath.Join(dir, "value")
	os.WriteFile(valueFile, []byte(value), 0o600)
	ca, envOut := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "env")
	w.StartAgent(t, "--policy", "allow-all", "--tls-ca-out", ca, "--tls-upstream-ca", w.TestCA,
		"--secrets", secretsFile(t, valueFile, "log"), "--secrets-env-out", envOut)
	ph := readPlaceholder(t, envOut)
	for _, v := range []string{"--http1.1", "--http2"} {
		for _, kind := range []string{"body", "gzip", "103", "trailer", "redirect"} {
			// --raw: HTTP/1.1 chunks and trailers as they came; for the
			// gzip body, --compressed instead: curl asks for gzip and
			// decodes what it gets (the trace shows it as it came).
			raw := "--raw"
			if kind == "gzip" {
				raw = "--compressed"
			}
			out, err := curlIn(t, w, "--cacert", ca, v, "-i", raw, "--trace-ascii", "-",
				"-H", "X-Key: "+ph, "https://"+testenv.TestDomain+"/reflect/"+kind)
			if err != nil {
				t.Errorf("%s %s: %v\n%s", v, kind, err, out)
				continue
			}
			if strings.Contains(out, value) {
				t.Errorf("%s %s: the sandbox received the value:\n%s", v, kind, out)
			}
			if !strings.Contains(strings.ToLower(out), "x-key-sha256: "+sha(value)) {
				t.Errorf("%s %s: the server did not get the value:\n%s", v, kind, out)
			}
			// Where the placeholder must show (curl does not print an
			// HTTP/2 trailer).
			want := map[string]string{"body": "you sent " + ph, "gzip": "gzip: you sent " + ph, "103": "/style.css?key=" + ph,
				"trailer": "X-Echo-Trailer: " + ph, "redirect": "/next?key=" + ph + "\">moved"}[kind]
			if !(kind == "trailer" && v == "--http2") && !strings.Contains(out, want) {
				t.Errorf("%s %s: %q not in what the sandbox got:\n%s", v, kind, want, out)
			}
		}
	}
}

// TestInterceptedBodiesUnchanged: through interception, a .gz served
// with Content-Encoding: gzip reaches curl (which asks for no encoding)
// byte for byte as the server sent it, over HTTP/2 and HTTP/1.1, and a
// gzip upload reaches the server as curl sent it.
func TestInterceptedBodiesUnchanged(t *testing.T) {
	testenv.RequireTools(t, "curl")
	w := testenv.NewWorld(t)
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	ca := filepath.Join(dir, "ca.pem")
	w.StartAgent(t, "--policy", "allow-all", "--tls-intercept", "all", "--tls-ca-out", ca, "--tls-upstream-ca", w.TestCA)
	upload := filepath.Join(dir, "upload.gz")
	raw := make([]byte, 300<<10)
	rand.Read(raw)
	var z bytes.Buffer
	zw := gzip.NewWriter(&z)
	zw.Write(raw)
	zw.Close()
	os.WriteFile(upload, z.Bytes(), 0o644)
	hashRE := regexp.MustCompile(`(?i)x-body-sha256: ([0-9a-f]{64})`)
	for _, v := range []string{"--http2", "--http1.1"} {
		got := filepath.Join(dir, "got"+v+".gz")
		hdrs, err := curlIn(t, w, "--cacert", ca, v, "-D", "-", "-o", got, "https://"+testenv.TestDomain+"/gz?n=500000")
		if err != nil {
			t.Fatalf("%s download: %v\n%s", v, err, hdrs)
		}
		b, _ := os.ReadFile(got)
		m := hashRE.FindStringSubmatch(hdrs)
		if m == nil || sha(string(b)) != m[1] || !regexp.MustCompile(`(?i)content-encoding: gzip`).MatchString(hdrs) {
			t.Errorf("%s download: %d bytes, hash %s; the server sent:\n%s", v, len(b), sha(string(b)), hdrs)
		}
		out, err := curlIn(t, w, "--cacert", ca, v, "-H", "Content-Encoding: gzip", "-H", "Content-Type: application/gzip",
			"--data-binary", "@"+upload, "https://"+testenv.TestDomain+"/sha256")
		if want := strings.Fields(out); err != nil || len(want) != 2 || want[1] != sha(z.String()) {
			t.Errorf("%s upload: %v %q, want %d bytes hashing to %s", v, err, out, z.Len(), sha(z.String()))
		}
	}
}

// TestExpectContinueThroughInterception: curl's Expect: 100-continue
// upload gets one 100 Continue, over HTTP/1.1 and HTTP/2, and its body
// arrives whole.
func TestExpectContinueThroughInterception(t *testing.T) {
	testenv.RequireTools(t, "curl")
	w := testenv.NewWorld(t)
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	ca := filepath.Join(dir, "ca.pem")
	w.StartAgent(t, "--policy", "allow-all", "--tls-intercept", "all", "--tls-ca-out", ca, "--tls-upstream-ca", w.TestCA)
	body := make([]byte, 2<<20)
	rand.Read(body)
	upload := filepath.Join(dir, "upload")
	os.WriteFile(upload, body, 0o644)
	for _, v := range []string{"--http1.1", "--http2"} {
		out, err := curlIn(t, w, "--cacert", ca, v, "-v", "-H", "Expect: 100-continue", "--data-binary", "@"+upload,
			"https://"+testenv.TestDomain+"/sha256")
		continues := regexp.MustCompile(`(?m)^< HTTP/[0-9.]+ 100`).FindAllString(out, -1)
		if err != nil || len(continues) != 1 || !strings.Contains(out, sha(string(body))) {
			t.Errorf("%s: %v, %d 100 Continue (want 1):\n%s", v, err, len(continues), grepLines(out, "< "))
		}
	}
}

// TestResponseHeaderCapThroughAgent: an upstream whose response headers
// pass 64 KiB gets the sandbox a 502 that says so, counted in the
// metrics; one under the cap passes.
func TestResponseHeaderCapThroughAgent(t *testing.T) {
	testenv.RequireTools(t, "curl")
	w := testenv.NewWorld(t)
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	ca := filepath.Join(dir, "ca.pem")
	metrics := "127.0.0.1:" + freePort(t)
	w.StartAgent(t, "--policy", "allow-all", "--tls-intercept", "all", "--tls-ca-out", ca, "--tls-upstream-ca", w.TestCA, "--metrics-addr", metrics)
	for _, v := range []string{"--http1.1", "--http2"} {
		out, err := curlIn(t, w, "--cacert", ca, v, "-sS", "-D", "-", "-o", "/dev/null", "https://"+testenv.TestDomain+"/bigheader?n=30000")
		if err != nil || !regexp.MustCompile(`^HTTP/[0-9.]+ 200`).MatchString(out) {
			t.Errorf("%s, 30 KB of headers: %v\n%.300s", v, err, out)
		}
		out, err = curlIn(t, w, "--cacert", ca, v, "-sS", "-D", "-", "-o", "/dev/null", "https://"+testenv.TestDomain+"/bigheader?n=100000")
		if err != nil || !regexp.MustCompile(`^HTTP/[0-9.]+ 502`).MatchString(out) || !strings.Contains(out, "larger than msbtap's cap of 65536 bytes") {
			t.Errorf("%s, 100 KB of headers: %v\n%.300s", v, err, out)
		}
	}
	m, err := w.Host.Run("curl", "-sS", "http://"+metrics+"/metrics")
	if err != nil || !strings.Contains(m, `msbtap_http_responses_refused_total{reason="header_too_large"} 2`) {
		t.Errorf("metrics: %v\n%s", err, grepLines(m, "responses_refused"))
	}
}
