package intercept

import (
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
			w.Header().Set("Link", "</style.css?k="+sec.value+">; rel=preload")
			w.WriteHeader(http.StatusEarlyHints)
			w.Header().Del("Link")
			w.Header().Set("Trailer", "X-Digest")
			w.Header().Set("X-Echo", sec.value)
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
