package upstream

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

func randomSecret(t *testing.T) string {
	t.Helper()
	b := make([]byte, 12)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func noEnv(string) (string, bool) { return "", false }

func TestConfigErrors(t *testing.T) {
	pw := randomSecret(t)
	dir := t.TempDir()
	open := filepath.Join(dir, "open")
	os.WriteFile(open, []byte("u:"+pw+"\n"), 0o644)
	twoLines := filepath.Join(dir, "two")
	os.WriteFile(twoLines, []byte("u:"+pw+"\nmore\n"), 0o600)
	noColon := filepath.Join(dir, "nocolon")
	os.WriteFile(noColon, []byte(pw+"\n"), 0o600)
	for _, tc := range []struct {
		name  string
		c     Config
		field string
		want  string
	}{
		{"password in the URL", Config{URL: "socks5://user:" + pw + "@127.0.0.1:1080"}, "upstream_proxy", "credentials in the URL"},
		{"unparsable URL with a password", Config{URL: "http://user:" + pw + "@[::1"}, "upstream_proxy", "want socks5"},
		{"scheme", Config{URL: "https://127.0.0.1:3128"}, "upstream_proxy", `scheme "https"`},
		{"no port", Config{URL: "socks5://127.0.0.1"}, "upstream_proxy", "HOST:PORT"},
		{"a path", Config{URL: "http://127.0.0.1:3128/x"}, "upstream_proxy", "HOST:PORT"},
		{"file and env", Config{URL: "http://127.0.0.1:3128", CredentialsFile: open, CredentialsEnv: "X"}, "upstream_proxy_credentials_env", "not both"},
		{"file readable by others", Config{URL: "http://127.0.0.1:3128", CredentialsFile: open}, "upstream_proxy_credentials_file", "chmod 600"},
		{"file of two lines", Config{URL: "http://127.0.0.1:3128", CredentialsFile: twoLines}, "upstream_proxy_credentials_file", "one line"},
		{"no colon", Config{URL: "http://127.0.0.1:3128", CredentialsFile: noColon}, "upstream_proxy_credentials_file", "USER:PASSWORD"},
		{"missing file", Config{URL: "http://127.0.0.1:3128", CredentialsFile: filepath.Join(dir, "none")}, "upstream_proxy_credentials_file", "no such file"},
		{"env unset", Config{URL: "http://127.0.0.1:3128", CredentialsEnv: "MSBTAP_TEST_UNSET"}, "upstream_proxy_credentials_env", "not set"},
		{"port 0", Config{URL: "socks5://127.0.0.1:0"}, "upstream_proxy", "want 1..65535"},
		{"bad bypass", Config{URL: "http://127.0.0.1:3128", Bypass: []string{"a*b"}}, "upstream_proxy_bypass", "CIDR"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := func(k string) (string, bool) {
				if k == "X" {
					return "u:" + pw, true
				}
				return "", false
			}
			_, err := New(tc.c, env)
			if err == nil || !strings.Contains(err.Error(), tc.field) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error naming %s with %q", err, tc.field, tc.want)
			}
			if strings.Contains(err.Error(), pw) {
				t.Errorf("the error shows the password: %v", err)
			}
		})
	}
}

func TestBypassed(t *testing.T) {
	d, err := New(Config{URL: "socks5://127.0.0.1:1080", Bypass: []string{"10.0.0.0/8", "192.0.2.7", "internal.example", "*.corp.example", ".lan.example"}}, noEnv)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		addr  string
		names []string
		want  bool
	}{
		{"10.1.2.3", nil, true},
		{"::ffff:10.1.2.3", nil, true},
		{"192.0.2.7", nil, true},
		{"192.0.2.8", nil, false},
		{"198.51.100.1", []string{"internal.example"}, true},
		{"198.51.100.1", []string{"x.internal.example"}, false},
		{"198.51.100.1", []string{"a.b.corp.example"}, true},
		{"198.51.100.1", []string{"corp.example"}, true},
		{"198.51.100.1", []string{"evilcorp.example"}, false},
		{"198.51.100.1", []string{"Host.LAN.example."}, true},
		{"198.51.100.1", []string{"other.example", "internal.example"}, true},
	} {
		if got := d.Bypassed(netip.MustParseAddr(tc.addr), tc.names); got != tc.want {
			t.Errorf("Bypassed(%s, %v) = %v, want %v", tc.addr, tc.names, got, tc.want)
		}
	}
	if s := d.String(); s != "socks5://127.0.0.1:1080" {
		t.Errorf("String() = %q", s)
	}
}

// echoAfter answers a proxied connection: it writes greeting, then echoes.
func echoAfter(c net.Conn, greeting string) {
	if greeting != "" {
		c.Write([]byte(greeting))
	}
	io.Copy(c, c)
}

// connectProxy is a test HTTP CONNECT proxy: it checks the credentials,
// answers with status, and then plays the destination itself.
type connectProxy struct {
	ln      net.Listener
	auth    string
	status  int
	greet   string // written in the same segment as the 200
	mu      sync.Mutex
	targets []string
}

func newConnectProxy(t *testing.T, auth string, status int, greet string) *connectProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &connectProxy{ln: ln, auth: auth, status: status, greet: greet}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go p.serve(c)
		}
	}()
	return p
}

func (p *connectProxy) serve(c net.Conn) {
	defer c.Close()
	br := bufio.NewReader(c)
	req, err := http.ReadRequest(br)
	if err != nil || req.Method != http.MethodConnect {
		return
	}
	p.mu.Lock()
	p.targets = append(p.targets, req.Host)
	p.mu.Unlock()
	if p.auth != "" && req.Header.Get("Proxy-Authorization") != p.auth {
		c.Write([]byte("HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\nContent-Length: 0\r\n\r\n"))
		return
	}
	if p.status != 200 {
		c.Write([]byte("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"))
		return
	}
	c.Write([]byte("HTTP/1.1 200 Connection established\r\n\r\n" + p.greet))
	echoAfter(c, "")
}

func exchange(t *testing.T, c net.Conn, greet string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if greet != "" {
		b := make([]byte, len(greet))
		if _, err := io.ReadFull(c, b); err != nil || string(b) != greet {
			t.Fatalf("greeting %q, %v; want %q", b, err, greet)
		}
	}
	c.Write([]byte("ping"))
	b := make([]byte, 4)
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "ping" {
		t.Fatalf("echo %q, %v", b, err)
	}
	// The stream half-closes and resets like a direct connection.
	if _, ok := c.(interface{ CloseWrite() error }); !ok {
		t.Errorf("%T cannot half-close", c)
	}
	c.Close()
}

func reason(err error) string {
	var ue *Error
	if errors.As(err, &ue) {
		return ue.Reason
	}
	return ""
}

func TestHTTPConnect(t *testing.T) {
	pw := randomSecret(t)
	env := func(k string) (string, bool) { return "msb:" + pw, k == "PROXY_CRED" }
	dst := netip.MustParseAddrPort("198.51.100.10:80")
	ctx := context.Background()

	p := newConnectProxy(t, "Basic "+b64("msb:"+pw), 200, "SSH-2.0-banner\r\n")
	d, err := New(Config{URL: "http://" + p.ln.Addr().String(), CredentialsEnv: "PROXY_CRED"}, env)
	if err != nil {
		t.Fatal(err)
	}
	c, err := d.Dial(ctx, dst, "")
	if err != nil {
		t.Fatal(err)
	}
	exchange(t, c, "SSH-2.0-banner\r\n")
	c, err = d.Dial(ctx, dst, "www.example.test")
	if err != nil {
		t.Fatal(err)
	}
	exchange(t, c, "SSH-2.0-banner\r\n")
	p.mu.Lock()
	got := strings.Join(p.targets, " ")
	p.mu.Unlock()
	if got != "198.51.100.10:80 www.example.test:80" {
		t.Errorf("the proxy was asked for %q", got)
	}

	// Wrong credentials, a refusal, a proxy that is gone.
	bad, _ := New(Config{URL: "http://" + p.ln.Addr().String()}, noEnv)
	if _, err := bad.Dial(ctx, dst, ""); reason(err) != ReasonAuth {
		t.Errorf("no credentials: %v, want %s", err, ReasonAuth)
	}
	refusing := newConnectProxy(t, "", 403, "")
	r, _ := New(Config{URL: "http://" + refusing.ln.Addr().String()}, noEnv)
	if _, err := r.Dial(ctx, dst, ""); reason(err) != ReasonRefused || !strings.Contains(err.Error(), "403") {
		t.Errorf("refusing proxy: %v, want %s", err, ReasonRefused)
	}
	if n := r.Failures()[ReasonRefused]; n != 1 {
		t.Errorf("refusals counted %d, want 1", n)
	}
	gone := closedPort(t)
	g, _ := New(Config{URL: "http://" + gone}, noEnv)
	if _, err := g.Dial(ctx, dst, ""); reason(err) != ReasonUnreachable {
		t.Errorf("proxy gone: %v, want %s", err, ReasonUnreachable)
	}
	// A proxy given by name is resolved at start and dialed by address.
	_, portStr, _ := net.SplitHostPort(p.ln.Addr().String())
	byName, err := New(Config{URL: "http://localhost:" + portStr, CredentialsEnv: "PROXY_CRED"}, env)
	if err != nil {
		t.Fatal(err)
	}
	if c, err := byName.Dial(ctx, dst, ""); err != nil {
		t.Errorf("proxy by name: %v", err)
	} else {
		exchange(t, c, "SSH-2.0-banner\r\n")
	}
	// The sandbox may not use the proxy itself.
	self := netip.MustParseAddrPort(p.ln.Addr().String())
	if _, err := d.Dial(ctx, self, ""); reason(err) != ReasonSelf {
		t.Errorf("flow to the proxy: %v, want %s", err, ReasonSelf)
	}
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func closedPort(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := ln.Addr().String()
	ln.Close()
	return a
}

// socksProxy is a test SOCKS5 server (RFC 1928 and 1929), enough to check
// what the client asks for.
type socksProxy struct {
	ln         net.Listener
	user, pass string
	reply      byte // 0 success, else the failure code
	mu         sync.Mutex
	targets    []string
}

func newSocksProxy(t *testing.T, user, pass string, reply byte) *socksProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &socksProxy{ln: ln, user: user, pass: pass, reply: reply}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go p.serve(c)
		}
	}()
	return p
}

func (p *socksProxy) serve(c net.Conn) {
	defer c.Close()
	h := make([]byte, 2)
	if _, err := io.ReadFull(c, h); err != nil || h[0] != 5 {
		return
	}
	methods := make([]byte, h[1])
	io.ReadFull(c, methods)
	want := byte(0)
	if p.user != "" {
		want = 2
	}
	if !strings.Contains(string(methods), string([]byte{want})) {
		c.Write([]byte{5, 0xff})
		return
	}
	c.Write([]byte{5, want})
	if want == 2 {
		b := make([]byte, 2)
		io.ReadFull(c, b)
		u := make([]byte, b[1])
		io.ReadFull(c, u)
		io.ReadFull(c, b[:1])
		pw := make([]byte, b[0])
		io.ReadFull(c, pw)
		if string(u) != p.user || string(pw) != p.pass {
			c.Write([]byte{1, 1})
			return
		}
		c.Write([]byte{1, 0})
	}
	r := make([]byte, 4)
	io.ReadFull(c, r)
	var host string
	switch r[3] {
	case 1:
		a := make([]byte, 4)
		io.ReadFull(c, a)
		host = netip.AddrFrom4([4]byte(a)).String()
	case 3:
		n := make([]byte, 1)
		io.ReadFull(c, n)
		a := make([]byte, n[0])
		io.ReadFull(c, a)
		host = string(a)
	case 4:
		a := make([]byte, 16)
		io.ReadFull(c, a)
		host = netip.AddrFrom16([16]byte(a)).String()
	}
	pb := make([]byte, 2)
	io.ReadFull(c, pb)
	p.mu.Lock()
	p.targets = append(p.targets, net.JoinHostPort(host, strconv.Itoa(int(binary.BigEndian.Uint16(pb)))))
	p.mu.Unlock()
	c.Write([]byte{5, p.reply, 0, 1, 127, 0, 0, 1, 0, 0})
	if p.reply == 0 {
		echoAfter(c, "")
	}
}

func TestSOCKS5(t *testing.T) {
	pw := randomSecret(t)
	dir := t.TempDir()
	cred := filepath.Join(dir, "cred")
	if err := os.WriteFile(cred, []byte("msb:"+pw+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	dst := netip.MustParseAddrPort("198.51.100.10:80")
	p := newSocksProxy(t, "msb", pw, 0)
	d, err := New(Config{URL: "socks5://" + p.ln.Addr().String(), CredentialsFile: cred}, noEnv)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(d.String(), "with credentials") || strings.Contains(d.String(), pw) {
		t.Errorf("String() = %q", d.String())
	}
	c, err := d.Dial(ctx, dst, "")
	if err != nil {
		t.Fatal(err)
	}
	exchange(t, c, "")
	c, err = d.Dial(ctx, dst, "www.example.test")
	if err != nil {
		t.Fatal(err)
	}
	exchange(t, c, "")
	p.mu.Lock()
	got := strings.Join(p.targets, " ")
	p.mu.Unlock()
	if got != "198.51.100.10:80 www.example.test:80" {
		t.Errorf("the proxy was asked for %q (want the address, then the name: remote resolution)", got)
	}

	wrong, _ := New(Config{URL: "socks5://" + p.ln.Addr().String(), CredentialsEnv: "C"}, func(string) (string, bool) { return "msb:wrong", true })
	if _, err := wrong.Dial(ctx, dst, ""); reason(err) != ReasonAuth {
		t.Errorf("wrong password: %v, want %s", err, ReasonAuth)
	}
	refusing := newSocksProxy(t, "", "", 5) // connection refused
	r, _ := New(Config{URL: "socks5://" + refusing.ln.Addr().String()}, noEnv)
	if _, err := r.Dial(ctx, dst, ""); reason(err) != ReasonRefused {
		t.Errorf("refusing proxy: %v, want %s", err, ReasonRefused)
	}
	g, _ := New(Config{URL: "socks5://" + closedPort(t)}, noEnv)
	if _, err := g.Dial(ctx, dst, ""); reason(err) != ReasonUnreachable {
		t.Errorf("proxy gone: %v, want %s", err, ReasonUnreachable)
	}
	if n := g.Failures()[ReasonUnreachable]; n != 1 {
		t.Errorf("unreachable counted %d, want 1", n)
	}
}
