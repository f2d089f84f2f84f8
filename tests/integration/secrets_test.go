package integration

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/msbtap/msbtap/internal/testkit/testenv"
)

// randomValue is a secret value made for this run.
func randomValue(t *testing.T) string {
	b := make([]byte, 24)
	rand.Read(b)
	return "sk-test-" + hex.EncodeToString(b)
}

func freePort(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
}

// secretsFile writes a secrets file (mode 0600) for TOKEN, read from
// valueFile, for the test domain.
func secretsFile(t *testing.T, valueFile, onViolation string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "secrets.json")
	js := `{"secrets": [{"name": "TOKEN", "from_file": "` + valueFile + `", "hosts": ["` + testenv.TestDomain + `"],
		"inject": ["header", "basic_auth", "query", "body"], "on_violation": "` + onViolation + `"}]}`
	if err := os.WriteFile(p, []byte(js), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func readPlaceholder(t *testing.T, envFile string) string {
	t.Helper()
	b, err := os.ReadFile(envFile)
	if err != nil {
		t.Fatal(err)
	}
	_, ph, ok := strings.Cut(strings.TrimSpace(string(b)), "TOKEN=")
	if !ok || len(ph) < 16 {
		t.Fatalf("env file: %q", b)
	}
	return ph
}

type echoed struct {
	Proto      string              `json:"proto"`
	Query      string              `json:"query"`
	Headers    map[string][]string `json:"headers"`
	BodyLen    int                 `json:"body_len"`
	BodySHA256 string              `json:"body_sha256"`
	BasicPass  string              `json:"basic_pass"`
	TE         []string            `json:"transfer_encoding"`
	// What the server got, as hashes: msbtap scrubs the values themselves
	// from the answer.
	HeadersSHA   map[string][]string `json:"headers_sha256"`
	QuerySHA     string              `json:"query_sha256"`
	BasicPassSHA string              `json:"basic_pass_sha256"`
}

func sha(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

// TestSecretsInjected: the allowed host receives the real value in a
// header, basic auth, the query and the body (HTTP/1.1 and HTTP/2, fixed
// length and chunked, a placeholder split across writes); another host
// gets 403 and its server never sees the request; plain HTTP to the
// allowed host is refused; SIGHUP brings a new value; and no log, audit
// line or metric holds the value.
func TestSecretsInjected(t *testing.T) {
	testenv.RequireTools(t, "curl", "dig")
	w := testenv.NewWorld(t)
	dir := t.TempDir()
	value, value2 := randomValue(t), randomValue(t)
	valueFile := filepath.Join(dir, "value")
	os.WriteFile(valueFile, []byte(value+"\n"), 0o600)
	ca, envOut, alog := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "env"), filepath.Join(dir, "audit.log")
	metrics := "127.0.0.1:" + freePort(t)
	sock := controlSocket(t)
	w.StartAgent(t, "--control", sock, "--policy", "allow-all", "--tls-intercept", "all", "--tls-ca-out", ca, "--tls-upstream-ca", w.TestCA,
		"--secrets", secretsFile(t, valueFile, "log"), "--secrets-env-out", envOut, "--audit-log", alog, "--metrics-addr", metrics)
	ph := readPlaceholder(t, envOut)
	if len(ph) != len(value) || strings.Contains(ph, value) {
		t.Fatalf("placeholder %q for a value of %d bytes", ph, len(value))
	}
	web := "https://" + testenv.TestDomain + "/echo"

	echo := func(args ...string) echoed {
		t.Helper()
		out, err := curlIn(t, w, append([]string{"--cacert", ca}, args...)...)
		var e echoed
		if err != nil || json.Unmarshal([]byte(out), &e) != nil {
			t.Fatalf("curl %v: %v %s", args, err, out)
		}
		return e
	}
	for _, v := range []string{"--http1.1", "--http2"} {
		// The server gets the value; its echo comes back with the
		// placeholder.
		e := echo(v, "-H", "Authorization: Bearer "+ph, web+"?key="+ph+"&x=1")
		if got := e.HeadersSHA["Authorization"]; len(got) != 1 || got[0] != sha("Bearer "+value) || e.Headers["Authorization"][0] != "Bearer "+ph {
			t.Errorf("%s header: the server got %v, the sandbox saw %v", v, got, e.Headers["Authorization"])
		}
		if e.QuerySHA != sha("key="+value+"&x=1") || e.Query != "key="+ph+"&x=1" {
			t.Errorf("%s query: %q", v, e.Query)
		}
		if e = echo(v, "-u", "me:"+ph, web); e.BasicPassSHA != sha(value) || e.BasicPass != ph {
			t.Errorf("%s basic auth: %q", v, e.BasicPass)
		}
		// The echoed Authorization header, base64 in a JSON body.
		if a := e.Headers["Authorization"]; len(a) == 1 {
			if dec, _ := base64.StdEncoding.DecodeString(strings.TrimPrefix(a[0], "Basic ")); strings.Contains(string(dec), value[8:len(value)-1]) {
				t.Errorf("%s: the echoed basic auth decodes to the value: %q", v, dec)
			}
		} else {
			t.Errorf("%s: the echo has no Authorization header: %v", v, e.Headers)
		}
		body := "before " + ph + " after"
		if e = echo(v, "--data-binary", body, web); e.BodySHA256 != sha("before "+value+" after") {
			t.Errorf("%s fixed-length body: %d bytes, hash %s", v, e.BodyLen, e.BodySHA256)
		}
		// Chunked (HTTP/1.1) or streamed (HTTP/2), the placeholder split
		// across two writes a moment apart.
		script := "(printf 'start " + ph[:10] + "'; sleep 0.3; printf '" + ph[10:] + " end') | curl -sS --max-time 10 --cacert " + ca + " " + v +
			" -H 'Transfer-Encoding: chunked' --data-binary @- " + web
		out, err := w.Guest.Run("sh", "-c", script)
		if json.Unmarshal([]byte(out), &e) != nil || err != nil || e.BodySHA256 != sha("start "+value+" end") {
			t.Errorf("%s split body: %v %s", v, err, out)
		}
	}

	// Another host: refused before it is sent.
	other := "https://" + testenv.OtherDomain + "/echo-never"
	out, _ := curlIn(t, w, "--cacert", ca, "-i", "-H", "X-Key: "+ph, other)
	if !strings.Contains(out, "403") || !strings.Contains(out, "secret TOKEN may not go to "+testenv.OtherDomain) {
		t.Errorf("another host: %s", out)
	}
	// Plain HTTP to the allowed host.
	out, _ = curlIn(t, w, "-i", "-H", "X-Key: "+ph, "http://"+testenv.TestDomain+"/echo-never")
	if !strings.Contains(out, "403") {
		t.Errorf("plain HTTP: %s", out)
	}
	// A DNS name that carries it.
	if out, _ := w.Guest.Run("dig", "+tries=1", strings.ToLower(ph[:20])+"."+strings.ToLower(ph[20:])+".example.test"); !strings.Contains(out, "status: REFUSED") {
		t.Errorf("a DNS name with the placeholder:\n%s", out)
	}
	if b, _ := os.ReadFile(w.RequestLog); strings.Contains(string(b), "/echo-never") {
		t.Errorf("a refused request reached the server:\n%s", b)
	}

	// Rotation: a new value in the file, SIGHUP, the same placeholder.
	os.WriteFile(valueFile, []byte(value2), 0o600)
	w.Agent.Process.Signal(syscall.SIGHUP)
	waitFor(t, 5*time.Second, "the secrets reload", func() bool { return strings.Contains(w.AgentLog.String(), "secrets reloaded") })
	if e := echo("-H", "X-Key: "+ph, web); len(e.HeadersSHA["X-Key"]) != 1 || e.HeadersSHA["X-Key"][0] != sha(value2) {
		t.Errorf("after SIGHUP: %v", e.Headers["X-Key"])
	}

	// The control socket changes the value, then takes the secret away.
	value3 := randomValue(t)
	set := exec.Command(w.Msbtap, "ctl", "--control", sock, "secrets", "set", "TOKEN")
	set.Stdin = strings.NewReader(value3 + "\n")
	if out, err := set.CombinedOutput(); err != nil {
		t.Fatalf("ctl secrets set: %v %s", err, out)
	}
	if e := echo("-H", "X-Key: "+ph, web); len(e.HeadersSHA["X-Key"]) != 1 || e.HeadersSHA["X-Key"][0] != sha(value3) {
		t.Errorf("after ctl secrets set: %v", e.Headers["X-Key"])
	}
	mustCtl(t, w, sock, "secrets", "rm", "TOKEN")
	if e := echo("-H", "X-Key: "+ph, web); len(e.Headers["X-Key"]) != 1 || e.Headers["X-Key"][0] != ph {
		t.Errorf("after ctl secrets rm: %v", e.Headers["X-Key"])
	}
	if out, err := ctl(t, w, sock, "secrets", "set", "NOPE"); err == nil || !strings.Contains(out, "no secret") {
		t.Errorf("setting an undeclared secret: %v %s", err, out)
	}

	mo, err := w.Host.Run("curl", "-sS", "http://"+metrics+"/metrics")
	m := []byte(mo)
	if err != nil || !strings.Contains(string(m), `msbtap_secret_substitutions_total{secret="TOKEN"}`) ||
		!strings.Contains(string(m), `msbtap_secret_violations_total{secret="TOKEN"} 3`) {
		t.Errorf("metrics: %v\n%s", err, grepLines(string(m), "secret"))
	}
	w.StopAgent(t)
	audit, _ := os.ReadFile(alog)
	if !hasRecord(auditLines(t, alog), map[string]string{"secret": "TOKEN", "reason": "injected", "host": testenv.TestDomain}) ||
		!hasRecord(auditLines(t, alog), map[string]string{"secret": "TOKEN", "action": "deny", "host": testenv.OtherDomain}) {
		t.Errorf("audit lines of the secret missing:\n%s", grepLines(string(audit), "TOKEN"))
	}
	for what, b := range map[string]string{"agent log": w.AgentLog.String(), "audit log": string(audit), "metrics": string(m)} {
		for _, v := range []string{value, value2, value3} {
			if strings.Contains(b, v) {
				t.Errorf("the %s holds the secret's value", what)
			}
		}
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestSecretTerminate: a placeholder sent to another host with
// on_violation terminate stops the sandbox; msbtap exits 3 and the hook
// gets MSBTAP_VIOLATION_SECRET. The command sees the placeholder, never the
// value, and trusts msbtap's CA through the environment msbtap gives it.
func TestSecretTerminate(t *testing.T) {
	testenv.RequireTools(t, "curl")
	w := testenv.NewWorld(t)
	dir := t.TempDir()
	value := randomValue(t)
	valueFile := filepath.Join(dir, "value")
	os.WriteFile(valueFile, []byte(value), 0o600)
	hook := filepath.Join(dir, "hook.env")
	script := `test "$TOKEN" != "` + value + `" || echo VALUE-IN-SANDBOX
		curl -sS --max-time 5 --resolve ` + resolveTo(testenv.TestDomain, "443") + ` -H "X-Key: $TOKEN" https://` + testenv.TestDomain + `/echo
		curl -sS --max-time 5 --resolve ` + resolveTo(testenv.OtherDomain, "443") + ` -H "X-Key: $TOKEN" https://` + testenv.OtherDomain + `/echo
		sleep 20`
	cmd := w.Host.Command(w.Msbtap, "run", "--dns-upstream", testenv.DNSHost4, "--policy", "allow-all", "--tls-intercept", "all",
		"--tls-upstream-ca", w.TestCA, "--secrets", secretsFile(t, valueFile, "terminate"),
		"--on-terminate", "env > "+hook, "--", "sh", "-c", script)
	out, done := startCmd(t, cmd)
	var err error
	select {
	case err = <-done:
	case <-time.After(30 * time.Second):
		t.Fatalf("msbtap did not stop:\n%s", out)
	}
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 3 {
		t.Errorf("msbtap exit: %v, want status 3\n%s", err, out)
	}
	got := out.String()
	if strings.Contains(got, "VALUE-IN-SANDBOX") || !strings.Contains(got, `"X-Key":["`+sha(value)+`"]`) {
		t.Errorf("the allowed host did not get the value, or the sandbox saw it:\n%s", got)
	}
	if n := strings.Count(got, value); n != 0 { // the echo comes back scrubbed
		t.Errorf("the value shows %d times in msbtap's output (the sandbox's command's among it)", n)
	}
	env, _ := os.ReadFile(hook)
	if !strings.Contains(string(env), "MSBTAP_VIOLATION_SECRET=TOKEN") || strings.Contains(string(env), value) {
		t.Errorf("hook environment:\n%s", env)
	}
}
