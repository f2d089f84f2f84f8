package intercept

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"net/netip"
	"net/textproto"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/msbtap/msbtap/policy"
)

// upstreamWorld is a handler in front of an upstream the test writes:
// an HTTPS server for example.com (h2 and http/1.1), or any listener.
type upstreamWorld struct {
	*world
	srv *httptest.Server
}

// newUpstreamWorld starts handler as the upstream; tweak may change the
// server's TLS settings and the handler's options before either starts.
func newUpstreamWorld(t testing.TB, handler http.Handler, tweak func(*tls.Config, *Options)) *upstreamWorld {
	t.Helper()
	srv := httptest.NewUnstartedServer(handler)
	srv.EnableHTTP2 = true
	srv.Config.ErrorLog = discardLog()
	o := Options{Mode: All}
	if tweak != nil {
		srv.TLS = &tls.Config{}
		tweak(srv.TLS, &o)
	}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return &upstreamWorld{world: worldFor(t, srv.Listener.Addr().String(), srv.Certificate(), o), srv: srv}
}

// worldFor is a handler (mode and limits from o) whose upstream for
// example.com is addr, trusted by cert.
func worldFor(t testing.TB, addr string, cert *x509.Certificate, o Options) *world {
	t.Helper()
	roots := x509.NewCertPool()
	roots.AddCert(cert)
	f, err := policy.ParseFile([]byte(allowWeb))
	if err != nil {
		t.Fatal(err)
	}
	pins := policy.NewPins(0)
	e, err := policy.Compile(f, policy.Options{Pins: pins})
	if err != nil {
		t.Fatal(err)
	}
	ca, err := NewCA()
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	dst := netip.MustParseAddrPort(addr)
	pins.Add(dst.Addr(), "example.com", time.Minute)
	o.CA, o.Roots, o.Policy, o.Report = ca, roots, policy.NewHolder(e), rec.report
	return &world{h: NewHandler(o), ca: ca, rec: rec, upAddr: addr, pins: pins, dst: dst,
		decided: e.Check(policy.Flow{Proto: policy.TCP, Dst: dst})}
}

// dialTLS opens an intercepted connection speaking proto.
func (w *world) dialTLS(t testing.TB, proto string) *tls.Conn {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(w.ca.Cert())
	guest, _ := w.serve(t)
	c := tls.Client(guest, &tls.Config{ServerName: "example.com", RootCAs: pool, NextProtos: []string{proto}})
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := c.Handshake(); err != nil {
		t.Fatal(err)
	}
	return c
}

// fakeSecret plays the secrets store: the value is a secret of
// example.com, which the sandbox must see as the placeholder.
type fakeSecret struct{ value, placeholder string }

func (f fakeSecret) Wants(host string) bool    { return host == "example.com" }
func (f fakeSecret) Active() bool              { return true }
func (f fakeSecret) Request(*Request) *Refusal { return nil }
func (f fakeSecret) Scrubber(host string) Scrubber {
	if host != "example.com" {
		return nil
	}
	return f
}
func (f fakeSecret) SameLength() bool { return len(f.value) == len(f.placeholder) }
func (f fakeSecret) Header(h http.Header) {
	for _, vs := range h {
		for i, v := range vs {
			vs[i] = strings.ReplaceAll(v, f.value, f.placeholder)
		}
	}
}

// Body reads the whole body first: the streaming is the secrets
// package's, tested there.
func (f fakeSecret) Body(r io.Reader) io.Reader {
	return readerFunc(func(b []byte) (int, error) {
		all, err := io.ReadAll(r)
		if err != nil {
			return 0, err
		}
		r = strings.NewReader(strings.ReplaceAll(string(all), f.value, f.placeholder))
		return r.Read(b)
	})
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(b []byte) (int, error) { return f(b) }

func discardLog() *log.Logger { return log.New(io.Discard, "", 0) }

func randomHex(t testing.TB, n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func gzipped(s string) []byte {
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	io.WriteString(zw, s)
	zw.Close()
	return b.Bytes()
}

// TestResponsesHideSecrets: every byte from a secret's host to the
// sandbox passes the scrubber: the body of an upstream that echoes the
// value, a gzip body (sent although msbtap asked for identity), a 103
// Early Hints, a trailer, a redirect's Location and body. The HTTP/1.1
// client reads the raw bytes of the connection.
func TestResponsesHideSecrets(t *testing.T) {
	sec := fakeSecret{value: "sk-" + randomHex(t, 12), placeholder: "PH" + randomHex(t, 16)}
	var gotAE sync.Map
	up := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotAE.Store(r.URL.Path, r.Header.Get("Accept-Encoding"))
		switch r.URL.Path {
		case "/echo":
			// Link stays in the final header too: Go's HTTP/2 server
			// encodes a 1xx's header map while the handler goes on.
			w.Header().Set("Link", "</style.css?k="+sec.value+">; rel=preload")
			w.Header().Set("Trailer", "X-Digest")
			w.Header().Set("X-Echo", sec.value)
			w.WriteHeader(http.StatusEarlyHints)
			fmt.Fprintf(w, "you sent %s, and again: %s", sec.value, sec.value)
			w.Header().Set("X-Digest", "of "+sec.value)
		case "/gzip":
			w.Header().Set("Content-Encoding", "gzip")
			w.Write(gzipped(strings.Repeat("padding ", 100) + sec.value))
		case "/redirect":
			w.Header().Set("Location", "https://example.com/next?token="+sec.value)
			w.WriteHeader(http.StatusFound)
			fmt.Fprintf(w, "<a href=\"/next?token=%s\">moved</a>", sec.value)
		case "/br":
			w.Header().Set("Content-Encoding", "br")
			io.WriteString(w, sec.value)
		}
	})
	w := newUpstreamWorld(t, up, func(_ *tls.Config, o *Options) { o.Rewriter = sec })
	for _, proto := range []string{"http/1.1", "h2"} {
		for _, path := range []string{"/echo", "/gzip", "/redirect"} {
			c := w.dialTLS(t, proto)
			var seen bytes.Buffer // every byte the client got, as it got it or decoded
			if proto == "http/1.1" {
				fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: example.com\r\nAccept-Encoding: gzip, br\r\nTE: trailers\r\nConnection: close\r\n\r\n", path)
				io.Copy(&seen, c)
			} else {
				cc, err := (&http2.Transport{DisableCompression: true}).NewClientConn(c)
				if err != nil {
					t.Fatal(err)
				}
				req, _ := http.NewRequest("GET", "https://example.com"+path, nil)
				req.Header.Set("Accept-Encoding", "gzip, br")
				req = req.WithContext(httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{
					Got1xxResponse: func(code int, h textproto.MIMEHeader) error {
						fmt.Fprintf(&seen, "%d %v\n", code, h)
						return nil
					}}))
				resp, err := cc.RoundTrip(req)
				if err != nil {
					t.Fatal(err)
				}
				resp.Write(&seen) // status, headers, body
				fmt.Fprintf(&seen, "\ntrailers %v\n", resp.Trailer)
			}
			c.Close()
			got := seen.String()
			if strings.Contains(got, sec.value) {
				t.Errorf("%s %s: the sandbox saw the value:\n%s", proto, path, got)
			}
			if want := map[string]int{"/echo": 5, "/gzip": 1, "/redirect": 2}[path]; strings.Count(got, sec.placeholder) < want {
				t.Errorf("%s %s: %d placeholders, want %d:\n%s", proto, path, strings.Count(got, sec.placeholder), want, got)
			}
			if ae, _ := gotAE.Load(path); ae != "identity" {
				t.Errorf("%s %s: upstream asked for Accept-Encoding %q, want identity", proto, path, ae)
			}
		}
	}
	// An encoding msbtap cannot decode: refused, counted.
	c := w.dialTLS(t, "http/1.1")
	fmt.Fprintf(c, "GET /br HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
	raw, _ := io.ReadAll(c)
	if !bytes.HasPrefix(raw, []byte("HTTP/1.1 502")) || bytes.Contains(raw, []byte(sec.value)) || !bytes.Contains(raw, []byte("cannot be checked for secrets")) {
		t.Errorf("a br body: %q", raw)
	}
	if n := w.h.ResponsesRefused()[refusedEncoding]; n != 1 {
		t.Errorf("encoding refusals counted: %d, want 1", n)
	}
}

// TestUpgradeHidesSecrets: an upgraded connection's server side is
// scrubbed too.
func TestUpgradeHidesSecrets(t *testing.T) {
	sec := fakeSecret{value: "sk-" + randomHex(t, 12), placeholder: "PH" + randomHex(t, 16)}
	up := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\nhello " + sec.value)
		brw.Flush()
	})
	w := newUpstreamWorld(t, up, func(cfg *tls.Config, o *Options) { o.Rewriter = sec; cfg.NextProtos = []string{"http/1.1"} })
	c := w.dialTLS(t, "http/1.1")
	fmt.Fprintf(c, "GET /ws HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\n")
	raw, _ := io.ReadAll(c)
	if bytes.Contains(raw, []byte(sec.value)) || !bytes.Contains(raw, []byte("hello "+sec.placeholder)) {
		t.Errorf("upgraded stream: %q", raw)
	}
}

// get sends one GET for path over c (HTTP/1.1, the connection then
// closed, or a stream of the HTTP/2 client conn cc).
func get(t testing.TB, c *tls.Conn, cc *http2.ClientConn, path string) *http.Response {
	t.Helper()
	req, _ := http.NewRequest("GET", "https://example.com"+path, nil)
	if cc != nil {
		resp, err := cc.RoundTrip(req)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		return resp
	}
	req.Header.Set("Connection", "close")
	req.Write(c)
	br := bufio.NewReader(c)
	for {
		resp, err := http.ReadResponse(br, req)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		if resp.StatusCode >= 200 || resp.StatusCode == http.StatusSwitchingProtocols {
			return resp
		}
	}
}

// TestResponseHeaderCap: a response whose headers pass the cap gets the
// sandbox a 502 that says so, counted; one under it passes.
func TestResponseHeaderCap(t *testing.T) {
	up := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := map[string]int{"/big": 100 << 10, "/fits": 32 << 10}[r.URL.Path]
		w.Header().Set("X-Pad", strings.Repeat("p", n))
		io.WriteString(w, "body")
	})
	w := newUpstreamWorld(t, up, nil)
	for i, proto := range []string{"http/1.1", "h2"} {
		for _, path := range []string{"/fits", "/big"} {
			c := w.dialTLS(t, proto)
			var cc *http2.ClientConn
			if proto == "h2" {
				var err error
				if cc, err = (&http2.Transport{}).NewClientConn(c); err != nil {
					t.Fatal(err)
				}
			}
			resp := get(t, c, cc, path)
			body, _ := io.ReadAll(resp.Body)
			c.Close()
			if path == "/fits" {
				if resp.StatusCode != 200 || string(body) != "body" {
					t.Errorf("%s %s: %d %q", proto, path, resp.StatusCode, body)
				}
				continue
			}
			if resp.StatusCode != http.StatusBadGateway || !strings.Contains(resp.Header.Get(ErrorHeader), "larger than msbtap's cap of 65536 bytes") {
				t.Errorf("%s %s: %d %q", proto, path, resp.StatusCode, resp.Header.Get(ErrorHeader))
			}
			if n := w.h.ResponsesRefused()[refusedHeaderTooLarge]; n != uint64(i+1) {
				t.Errorf("%s: header_too_large counted %d, want %d", proto, n, i+1)
			}
		}
	}
}

// TestResponseHeaderBudget: responses held at once (headers in, body
// pending; or headers still coming, as an upstream that stalls midway
// sends them) share a budget; past it the next response is a 502,
// counted, and what a response held comes back when it ends.
func TestResponseHeaderBudget(t *testing.T) {
	release := make(chan struct{})
	up := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Pad", strings.Repeat("p", 30<<10))
		w.WriteHeader(200)
		http.NewResponseController(w).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
		}
		io.WriteString(w, "done")
	})
	limits := func(_ *tls.Config, o *Options) { o.ResponseHeaderBudget = 48 << 10 }
	w := newUpstreamWorld(t, up, limits)

	// HTTP/2: two streams on one connection.
	c := w.dialTLS(t, "h2")
	cc, err := (&http2.Transport{}).NewClientConn(c)
	if err != nil {
		t.Fatal(err)
	}
	first := get(t, c, cc, "/hold")
	second := get(t, c, cc, "/hold")
	if first.StatusCode != 200 || second.StatusCode != http.StatusBadGateway || !strings.Contains(second.Header.Get(ErrorHeader), "budget") {
		t.Fatalf("held responses: %d, then %d %q", first.StatusCode, second.StatusCode, second.Header.Get(ErrorHeader))
	}
	close(release)
	if b, _ := io.ReadAll(first.Body); string(b) != "done" {
		t.Errorf("the held response's body: %q", b)
	}
	if third := get(t, c, cc, "/hold"); third.StatusCode != 200 {
		t.Errorf("after the first ended: %d %q", third.StatusCode, third.Header.Get(ErrorHeader))
	}
	c.Close()
	if n := w.h.ResponsesRefused()[refusedHeaderBudget]; n != 1 {
		t.Errorf("header_budget counted %d, want 1", n)
	}

	// HTTP/1.1: an upstream that sends 30 KiB of a header and stalls,
	// on two connections.
	ca, _ := NewCA()
	leaf, _ := ca.Leaf("example.com")
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{*leaf}, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var stopOnce sync.Once
	unstall := func() { stopOnce.Do(func() { close(stop) }) }
	var wg sync.WaitGroup
	t.Cleanup(func() { unstall(); ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer conn.Close()
				bufio.NewReader(conn).ReadString('\n')
				io.WriteString(conn, "HTTP/1.1 200 OK\r\nX-Pad: "+strings.Repeat("p", 30<<10))
				<-stop
			}()
		}
	}()
	o := Options{Mode: All, ResponseHeaderBudget: 48 << 10}
	w1 := worldFor(t, ln.Addr().String(), ca.Cert(), o)
	stalled := w1.dialTLS(t, "http/1.1")
	io.WriteString(stalled, "GET /stall HTTP/1.1\r\nHost: example.com\r\n\r\n")
	deadline := time.Now().Add(5 * time.Second)
	for w1.h.budget().used.Load() < 30<<10 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if used := w1.h.budget().used.Load(); used < 30<<10 {
		t.Fatalf("a stalled response holds %d bytes of the budget, want its 30 KiB", used)
	}
	c2 := w1.dialTLS(t, "http/1.1")
	resp := get(t, c2, nil, "/stall")
	c2.Close()
	if resp.StatusCode != http.StatusBadGateway || !strings.Contains(resp.Header.Get(ErrorHeader), "budget") {
		t.Errorf("past the budget: %d %q", resp.StatusCode, resp.Header.Get(ErrorHeader))
	}
	if n := w1.h.ResponsesRefused()[refusedHeaderBudget]; n != 1 {
		t.Errorf("header_budget counted %d, want 1", n)
	}
	// The upstream gives up: the stalled response ends, its bytes come
	// back.
	unstall()
	stalled.Close()
	for w1.h.budget().used.Load() != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if used := w1.h.budget().used.Load(); used != 0 {
		t.Errorf("%d bytes of the budget still held after every response ended", used)
	}
}

// TestExpectContinueOnce: a request with Expect: 100-continue gets one
// 100 Continue, not msbtap's and then the upstream's.
func TestExpectContinueOnce(t *testing.T) {
	up := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "got %d bytes", len(b))
	})
	w := newUpstreamWorld(t, up, func(cfg *tls.Config, _ *Options) { cfg.NextProtos = []string{"http/1.1"} })
	c := w.dialTLS(t, "http/1.1")
	io.WriteString(c, "POST /upload HTTP/1.1\r\nHost: example.com\r\nExpect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\n")
	br := bufio.NewReader(c)
	if line, err := br.ReadString('\n'); err != nil || !strings.HasPrefix(line, "HTTP/1.1 100 Continue") {
		t.Fatalf("first line: %q %v", line, err)
	}
	io.WriteString(c, "hello")
	rest, _ := io.ReadAll(br)
	if n := bytes.Count(rest, []byte("100 Continue")); n != 0 || !bytes.Contains(rest, []byte("HTTP/1.1 200 OK")) || !bytes.HasSuffix(rest, []byte("got 5 bytes")) {
		t.Errorf("after the first 100 Continue (%d more):\n%s", n, rest)
	}
}

// TestClientCertificateUpstream: an upstream that wants a client
// certificate gets the sandbox a 502 that says so and how to get round
// it, whatever the TLS version and protocol.
func TestClientCertificateUpstream(t *testing.T) {
	for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		w := newUpstreamWorld(t, http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}), func(cfg *tls.Config, _ *Options) {
			cfg.ClientAuth = tls.RequireAnyClientCert
			cfg.MaxVersion = v
		})
		w.srv.Config.ErrorLog = discardLog()
		for _, proto := range []string{"http/1.1", "h2"} {
			for i := 0; i < 3; i++ { // the failure shows at different points
				c := w.dialTLS(t, proto)
				resp := roundTrip(t, c, proto, "example.com", "example.com")
				c.Close()
				if got := resp.Header.Get(ErrorHeader); resp.StatusCode != http.StatusBadGateway ||
					!strings.Contains(got, "the server asks for a client certificate (use --tls-bypass example.com)") {
					t.Errorf("TLS %x %s: %d %q", v, proto, resp.StatusCode, got)
				}
			}
		}
	}
	// A server that asks for one but does without is served.
	w := newUpstreamWorld(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") }),
		func(cfg *tls.Config, _ *Options) { cfg.ClientAuth = tls.RequestClientCert })
	for _, proto := range []string{"http/1.1", "h2"} {
		c := w.dialTLS(t, proto)
		resp := roundTrip(t, c, proto, "example.com", "example.com")
		body, _ := io.ReadAll(resp.Body)
		c.Close()
		if resp.StatusCode != 200 || string(body) != "ok" {
			t.Errorf("%s, a client certificate asked for, not required: %d %q %q", proto, resp.StatusCode, body, resp.Header.Get(ErrorHeader))
		}
	}
}

// TestBodiesAsTheServerSentThem: with no Accept-Encoding from the
// client, a gzip body (served as Content-Encoding: gzip whatever was
// asked) reaches it as the server sent it, over HTTP/1.1 and HTTP/2.
func TestBodiesAsTheServerSentThem(t *testing.T) {
	data := gzipped(strings.Repeat(randomHex(t, 64), 200))
	var askedAE sync.Map
	up := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		askedAE.Store(r.Proto, r.Header.Get("Accept-Encoding"))
		if r.Method == "POST" {
			b, _ := io.ReadAll(r.Body)
			fmt.Fprintf(w, "%d %x", len(b), b[:16])
			return
		}
		w.Header().Set("Content-Encoding", "gzip")
		w.Write(data)
	})
	w := newUpstreamWorld(t, up, nil)
	for _, proto := range []string{"http/1.1", "h2"} {
		c := w.dialTLS(t, proto)
		var cc *http2.ClientConn
		if proto == "h2" {
			var err error
			if cc, err = (&http2.Transport{DisableCompression: true}).NewClientConn(c); err != nil {
				t.Fatal(err)
			}
		}
		resp := get(t, c, cc, "/file.gz")
		body, _ := io.ReadAll(resp.Body)
		if !bytes.Equal(body, data) || resp.Header.Get("Content-Encoding") != "gzip" {
			t.Errorf("%s: %d bytes with Content-Encoding %q, want the server's %d gzip bytes", proto, len(body), resp.Header.Get("Content-Encoding"), len(data))
		}
		c.Close()
	}
	askedAE.Range(func(k, v any) bool {
		if v != "" {
			t.Errorf("%s: the upstream was asked for Accept-Encoding %q on the client's behalf", k, v)
		}
		return true
	})
}

// TestTooMany1xx: an upstream that sends informational responses
// without end gets the sandbox a 502 after max1xx of them, counted.
func TestTooMany1xx(t *testing.T) {
	up := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// The header is not changed between the 1xx: Go's HTTP/2 server
		// encodes a 1xx's header map while the handler goes on.
		n := map[string]int{"/few": max1xx, "/many": 1000}[r.URL.Path]
		w.Header().Set("Link", "</style.css>; rel=preload")
		for i := 0; i < n; i++ {
			w.WriteHeader(http.StatusEarlyHints)
		}
		io.WriteString(w, "final")
	})
	w := newUpstreamWorld(t, up, nil)
	for i, proto := range []string{"http/1.1", "h2"} {
		for _, path := range []string{"/few", "/many"} {
			c := w.dialTLS(t, proto)
			var cc *http2.ClientConn
			if proto == "h2" {
				var err error
				if cc, err = (&http2.Transport{}).NewClientConn(c); err != nil {
					t.Fatal(err)
				}
			}
			resp := get(t, c, cc, path)
			body, _ := io.ReadAll(resp.Body)
			c.Close()
			switch {
			case path == "/few" && (resp.StatusCode != 200 || string(body) != "final"):
				t.Errorf("%s: %d 1xx then a final answer: %d %q", proto, max1xx, resp.StatusCode, body)
			case path == "/many" && resp.StatusCode != http.StatusBadGateway:
				t.Errorf("%s: endless 1xx: %d %q", proto, resp.StatusCode, body)
			}
		}
		if n := w.h.ResponsesRefused()[refusedTooMany1xx]; n != uint64(i+1) {
			t.Errorf("%s: too_many_1xx counted %d, want %d", proto, n, i+1)
		}
	}
}
