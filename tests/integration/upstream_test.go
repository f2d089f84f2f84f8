package integration

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/msbtap/msbtap/internal/testkit/testenv"
)

// proxyAddr4 is where the test proxies listen, in the test internet.
const proxyAddr4 = testenv.Inet4

func randHex(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// startProxy runs a real proxy from Debian in the test internet and waits
// until it listens on port; its log is what it printed (microsocks) or
// logFile (tinyproxy).
func startProxy(t *testing.T, w *testenv.World, port string, args ...string) (cmd *exec.Cmd, out *testenv.Buffer) {
	t.Helper()
	cmd = w.Inet.Command(args...)
	out = &testenv.Buffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", args[0], err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
	})
	waitFor(t, 5*time.Second, args[0]+" listening", func() bool {
		o, _ := w.Inet.Run("ss", "-Hltn", "sport = :"+port)
		return strings.Contains(o, ":"+port)
	})
	return cmd, out
}

// TestUpstreamProxy: with --upstream-proxy, the sandbox's allowed TCP flows
// leave through a real SOCKS5 server (microsocks) or HTTP CONNECT proxy
// (tinyproxy), with credentials from a file; the host itself cannot reach
// the web server directly, so a flow that works went through the proxy. A
// flow allowed by name reaches the proxy as the name (the proxy resolves
// it), a bypassed destination is reached directly, a denied flow never
// reaches the proxy, a refusal and a dead proxy give the sandbox a prompt
// reset with a logged, counted reason, and the credentials are in no log.
func TestUpstreamProxy(t *testing.T) {
	testenv.RequireTools(t, "curl", "ss", "microsocks", "tinyproxy")
	for _, kind := range []string{"socks5", "http"} {
		t.Run(kind, func(t *testing.T) { testUpstreamProxy(t, kind) })
	}
}

func testUpstreamProxy(t *testing.T, kind string) {
	w := testenv.NewWorld(t)
	user, pass := "u"+randHex(t, 4), randHex(t, 16)
	dir := t.TempDir()

	// The proxy resolves names itself: in its namespace, from this hosts
	// file (ip netns exec bind-mounts /etc/netns/NAME/hosts).
	etc := filepath.Join("/etc/netns", w.Inet.Name)
	if err := os.MkdirAll(etc, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(etc) })
	if err := os.WriteFile(filepath.Join(etc, "hosts"), []byte("127.0.0.1 localhost\n"+testenv.WebHost4+" "+testenv.TestDomain+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	var proxyURL, port string
	var proxyCmd *exec.Cmd
	var proxyOut *testenv.Buffer
	var proxyLog func() string
	switch kind {
	case "socks5":
		port = "1080"
		proxyCmd, proxyOut = startProxy(t, w, port, "microsocks", "-i", proxyAddr4, "-p", port, "-u", user, "-P", pass)
		proxyLog = proxyOut.String
	case "http":
		port = "3128"
		logFile := filepath.Join(dir, "tinyproxy.log")
		conf := filepath.Join(dir, "tinyproxy.conf")
		cfg := fmt.Sprintf("Port %s\nListen %s\nTimeout 30\nMaxClients 50\nLogFile %q\nLogLevel Info\nBasicAuth %s %s\n", port, proxyAddr4, logFile, user, pass)
		if err := os.WriteFile(conf, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		proxyCmd, proxyOut = startProxy(t, w, port, "tinyproxy", "-d", "-c", conf)
		proxyLog = func() string { b, _ := os.ReadFile(logFile); return string(b) + proxyOut.String() }
	}
	proxyURL = kind + "://" + proxyAddr4 + ":" + port

	// The host's own route to the web server is gone: only the proxy
	// reaches it.
	w.Host.MustRun(t, "ip", "route", "add", "prohibit", testenv.WebHost4+"/32")

	cred := filepath.Join(dir, "proxy-credentials")
	if err := os.WriteFile(cred, []byte(user+":"+pass+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	pol := filepath.Join(dir, "policy.json")
	if err := os.WriteFile(pol, []byte(`{"default_action": "deny", "rules": [
		{"destination": {"domain": "`+testenv.TestDomain+`"}, "protocols": ["tcp"], "ports": [{"start": 80}, {"start": 443}], "action": "allow"},
		{"destination": {"cidr": "`+testenv.WebHost4+`/32"}, "protocols": ["tcp"], "ports": [{"start": 80, "end": 81}], "action": "allow"},
		{"destination": {"cidr": "`+testenv.PrivHost4+`/32"}, "protocols": ["tcp"], "action": "allow"}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	audit := filepath.Join(dir, "audit.log")
	sock := controlSocket(t)
	w.StartAgent(t, "--policy", pol, "--audit-log", audit, "--control", sock,
		"--upstream-proxy", proxyURL, "--upstream-proxy-credentials-file", cred,
		"--upstream-proxy-bypass", testenv.PrivHost4)

	curl := func(url string) (string, error) {
		out, err := w.Guest.Run("curl", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", url)
		return strings.TrimSpace(out), err
	}
	// By address (before the sandbox looked the name up, so no pin names
	// the address).
	if out, err := curl("http://" + testenv.WebHost4 + "/"); err != nil || out != "200" {
		t.Fatalf("curl by address through the proxy: %v %s", err, out)
	}
	if !strings.Contains(proxyLog(), testenv.WebHost4+":80") {
		t.Errorf("the proxy was not asked for %s:80; its log:\n%s", testenv.WebHost4, proxyLog())
	}
	// By name: the proxy is asked for the name and resolves it.
	if out, err := curl("http://" + testenv.TestDomain + "/"); err != nil || out != "200" {
		t.Fatalf("curl by name through the proxy: %v %s", err, out)
	}
	if !strings.Contains(proxyLog(), testenv.TestDomain+":80") {
		t.Errorf("the proxy was not asked for %s:80 (remote resolution); its log:\n%s", testenv.TestDomain, proxyLog())
	}
	// TLS by name, spliced after the SNI check, through the proxy; an SNI
	// the policy does not allow is refused on its first bytes, proxy or not.
	if out, err := w.Guest.Run("curl", "-sS", "-m", "10", "--cacert", w.TestCA, "-o", "/dev/null", "-w", "%{http_code}",
		"https://"+testenv.TestDomain+"/"); err != nil || strings.TrimSpace(out) != "200" {
		t.Fatalf("curl https by name through the proxy: %v %s", err, out)
	}
	if !strings.Contains(proxyLog(), testenv.TestDomain+":443") {
		t.Errorf("the proxy was not asked for %s:443; its log:\n%s", testenv.TestDomain, proxyLog())
	}
	if out, err := w.Guest.Run("curl", "-sS", "-m", "10", "--cacert", w.TestCA, "--resolve", testenv.OtherDomain+":443:"+testenv.WebHost4,
		"https://"+testenv.OtherDomain+"/"); err == nil {
		t.Errorf("an SNI the policy does not allow got through the proxy: %s", out)
	}
	if strings.Contains(proxyLog(), testenv.OtherDomain) {
		t.Errorf("the proxy heard of %s; its log:\n%s", testenv.OtherDomain, proxyLog())
	}
	// Bypassed: reached directly, never through the proxy.
	if out, err := curl("http://" + testenv.PrivHost4 + "/"); err != nil || out != "200" {
		t.Fatalf("curl to the bypassed host: %v %s", err, out)
	}
	// Denied by the policy: refused by msbtap, and the proxy never hears of it.
	if out, err := curl("http://" + testenv.WebHost4 + ":7005/"); err == nil {
		t.Errorf("a denied flow got through: %s", out)
	}
	time.Sleep(200 * time.Millisecond)
	for _, s := range []string{testenv.PrivHost4, ":7005"} {
		if strings.Contains(proxyLog(), s) {
			t.Errorf("the proxy heard of %s (bypassed or denied); its log:\n%s", s, proxyLog())
		}
	}
	// By address, by name, TLS by name, and the refused SNI's (opened
	// before its first bytes were seen, nothing of it sent); curl may try
	// a name's IPv6 and IPv4 addresses both.
	if got := stat(t, w, sock, "msbtap_upstream_proxy_flows_total", "route", "proxy"); got < 4 || got > 6 {
		t.Errorf("flows through the proxy: %v, want 4 (or up to 6)", got)
	}
	if got := stat(t, w, sock, "msbtap_upstream_proxy_flows_total", "route", "direct"); got != 1 {
		t.Errorf("flows reached directly: %v, want 1", got)
	}

	// The proxy refuses (nothing listens on :81): a prompt reset, counted.
	start := time.Now()
	if out, err := curl("http://" + testenv.WebHost4 + ":81/"); err == nil || time.Since(start) > 5*time.Second {
		t.Errorf("a flow the proxy refused: %v %s after %s, want a prompt failure", err, out, time.Since(start))
	}
	if got := stat(t, w, sock, "msbtap_upstream_proxy_failures_total", "reason", "refused"); got != 1 {
		t.Errorf("refusals counted: %v, want 1", got)
	}

	// The proxy dies: a download it carries ends at once, short (the
	// proxy's end closed; the sandbox's curl sees the missing bytes), and
	// the next flow gets a prompt reset, logged and counted.
	dlOut, dlDone := startDownload(t, w, "http://"+testenv.WebHost4, 200<<20)
	waitFor(t, 10*time.Second, "the download under way", func() bool {
		f, ok := flowTo(t, w, sock, testenv.WebHost4+":80")
		return ok && f.BytesDown > 0
	})
	proxyCmd.Process.Kill()
	select {
	case err := <-dlDone:
		if err == nil {
			t.Errorf("the download through the dead proxy ended as if whole: %s", dlOut.String())
		}
	case <-time.After(5 * time.Second):
		t.Error("the download through the dead proxy hangs")
	}
	waitFor(t, 5*time.Second, "the proxy gone", func() bool {
		o, _ := w.Inet.Run("ss", "-Hltn", "sport = :"+port)
		return !strings.Contains(o, ":"+port)
	})
	start = time.Now()
	out, err := curl("http://" + testenv.TestDomain + "/")
	if err == nil || !strings.Contains(out, "connect") || time.Since(start) > 5*time.Second {
		t.Errorf("with the proxy dead: %v %q after %s, want a prompt reset", err, out, time.Since(start))
	}
	// curl tries the name's IPv6 and IPv4 addresses: one or two flows.
	if got := stat(t, w, sock, "msbtap_upstream_proxy_failures_total", "reason", "unreachable"); got < 1 || got > 2 {
		t.Errorf("unreachable proxy counted: %v, want 1 or 2", got)
	}
	if !strings.Contains(w.AgentLog.String(), "reason=upstream_proxy_unreachable") {
		t.Errorf("no logged reason for the dead proxy; agent log:\n%s", w.AgentLog.String())
	}

	w.StopAgent(t)
	auditLog, _ := os.ReadFile(audit)
	encoded := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	for what, s := range map[string]string{"agent log": w.AgentLog.String(), "audit log": string(auditLog)} {
		if strings.Contains(s, pass) || strings.Contains(s, encoded) {
			t.Errorf("the proxy's password is in the %s", what)
		}
	}
	if !strings.Contains(string(auditLog), `"dst":"`+testenv.WebHost4+`:7005"`) {
		t.Errorf("the denied flow is not in the audit log:\n%s", auditLog)
	}
}
