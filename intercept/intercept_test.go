package intercept

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/net/http2"

	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/policy"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// pair returns both ends of a loopback TCP connection.
func pair(t testing.TB) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server, err = ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

type recorder struct {
	mu     sync.Mutex
	events []Event
}

func (r *recorder) report(e Event) {
	r.mu.Lock()
	r.events = append(r.events, e)
	r.mu.Unlock()
}

func (r *recorder) find(mode string) (Event, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range r.events {
		if e.Mode == mode {
			return e, true
		}
	}
	return Event{}, false
}

// world is an upstream HTTPS server for example.com and other.test, a policy
// that allows example.com by name, and a handler.
type world struct {
	h       *Handler
	ca      *CA
	rec     *recorder
	upAddr  string
	pins    *policy.Pins
	dst     netip.AddrPort
	decided policy.Decision
}

func newWorld(t testing.TB, mode Mode, policyJSON string) *world {
	return newWorldRoots(t, mode, policyJSON, true)
}

// newWorldRoots: trusted says whether msbtap trusts the upstream's CA.
func newWorldRoots(t testing.TB, mode Mode, policyJSON string, trusted bool) *world {
	t.Helper()
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" { // answers after the client has had time to half-close
			time.Sleep(200 * time.Millisecond)
		}
		if r.URL.Path == "/bytes" {
			n, _ := strconv.Atoi(r.URL.Query().Get("n"))
			w.Header().Set("Content-Length", strconv.Itoa(n))
			io.CopyN(w, zeros{}, int64(n))
			return
		}
		b, _ := io.ReadAll(r.Body)
		json.NewEncoder(w).Encode(map[string]any{"host": r.Host, "proto": r.Proto, "path": r.URL.Path, "body": len(b), "sni": r.TLS.ServerName})
	}))
	srv.EnableHTTP2 = true
	srv.StartTLS()
	t.Cleanup(srv.Close)
	roots := x509.NewCertPool()
	if trusted {
		roots.AddCert(srv.Certificate())
	}
	f, err := policy.ParseFile([]byte(policyJSON))
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
	// httptest's certificate is for example.com.
	dst := netip.MustParseAddrPort(srv.Listener.Addr().String())
	pins.Add(dst.Addr(), "example.com", time.Minute)
	h := NewHandler(Options{Mode: mode, CA: ca, Roots: roots, Policy: policy.NewHolder(e), Report: rec.report})
	return &world{h: h, ca: ca, rec: rec, upAddr: srv.Listener.Addr().String(), pins: pins, dst: dst,
		decided: e.Check(policy.Flow{Proto: policy.TCP, Dst: dst})}
}

type zeros struct{}

func (zeros) Read(b []byte) (int, error) { clear(b); return len(b), nil }

// serve runs the handler on a new flow and returns the sandbox's end, and
// a wait for the handler to end (also a cleanup).
func (w *world) serve(t testing.TB) (net.Conn, func() error) {
	t.Helper()
	guest, inside := pair(t)
	up, err := net.Dial("tcp", w.upAddr)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	var herr error
	go func() {
		defer close(done)
		herr = w.h.Handle(context.Background(), flow.Of(policy.Flow{ID: 1, Proto: policy.TCP, Dst: w.dst}, w.decided), inside, up)
	}()
	wait := func() error { <-done; return herr }
	t.Cleanup(func() { guest.Close(); wait() })
	return guest, wait
}

const allowWeb = `{"default_action": "deny", "rules": [{"destination": {"domain": "example.com"}, "action": "allow"}]}`

func TestRefusesAnotherServerName(t *testing.T) {
	w := newWorld(t, Auto, allowWeb)
	guest, _ := w.serve(t)
	c := tls.Client(guest, &tls.Config{ServerName: "other.test", InsecureSkipVerify: true})
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if err := c.Handshake(); err == nil {
		t.Fatal("a TLS connection for another name got through")
	}
	ev, ok := w.rec.find("refused")
	if !ok || ev.SNI != "other.test" || ev.Decision.Action != policy.Deny {
		t.Fatalf("refusal event: %+v %v", ev, ok)
	}
}

func TestSplicesTheAllowedName(t *testing.T) {
	w := newWorld(t, Auto, allowWeb)
	guest, _ := w.serve(t)
	// The upstream's own certificate reaches the client: spliced.
	c := tls.Client(guest, &tls.Config{ServerName: "example.com", InsecureSkipVerify: true})
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if err := c.Handshake(); err != nil {
		t.Fatal(err)
	}
	if iss := c.ConnectionState().PeerCertificates[0].Issuer.CommonName; strings.Contains(iss, "msbtap") {
		t.Fatalf("spliced flow shows msbtap's certificate (issuer %q)", iss)
	}
	if _, ok := w.rec.find("spliced"); !ok {
		t.Fatal("no spliced event")
	}
}

func TestInterceptsAndChecksHost(t *testing.T) {
	for _, trusted := range []bool{true, false} {
		w := newWorldRoots(t, All, allowWeb, trusted)
		pool := x509.NewCertPool()
		pool.AddCert(w.ca.Cert())
		for _, proto := range []string{"h2", "http/1.1"} {
			guest, _ := w.serve(t)
			c := tls.Client(guest, &tls.Config{ServerName: "example.com", RootCAs: pool, NextProtos: []string{proto}})
			c.SetDeadline(time.Now().Add(5 * time.Second))
			if err := c.Handshake(); err != nil {
				t.Fatalf("%s: handshake with msbtap's certificate: %v", proto, err)
			}
			// The upstream's choice is mirrored: httptest's server names
			// only h2, so an http/1.1 offer gets no ALPN at all.
			if got := c.ConnectionState().NegotiatedProtocol; got != proto && !(proto == "http/1.1" && got == "") {
				t.Errorf("ALPN %q, want %q", got, proto)
			}
			resp := roundTrip(t, c, proto, "example.com", "example.com")
			body, _ := io.ReadAll(resp.Body)
			switch {
			case !trusted:
				if resp.StatusCode != http.StatusBadGateway || !strings.Contains(resp.Header.Get(ErrorHeader), "certificate") {
					t.Errorf("%s, untrusted upstream: %d %q, want 502 naming the certificate", proto, resp.StatusCode, resp.Header.Get(ErrorHeader))
				}
			case resp.StatusCode != 200 || !strings.Contains(string(body), `"host":"example.com"`):
				t.Errorf("%s: %d %s", proto, resp.StatusCode, body)
			case proto == "h2" && !strings.Contains(string(body), `"proto":"HTTP/2.0"`):
				t.Errorf("h2 upstream not used: %s", body)
			}
			if trusted {
				// A Host other than the SNI: 421.
				resp := roundTrip(t, c, proto, "example.com", "other.test")
				if resp.StatusCode != http.StatusMisdirectedRequest || resp.Header.Get(ReasonHeader) == "" {
					t.Errorf("%s: Host ≠ SNI gave %d", proto, resp.StatusCode)
				}
				// A port that is no port: refused, not read as example.com.
				if proto == "h2" {
					resp := roundTrip(t, c, proto, "example.com", "example.com:80.evil")
					if resp.StatusCode != http.StatusBadRequest || !strings.Contains(resp.Header.Get(ReasonHeader), "port") {
						t.Errorf("%s: Host example.com:80.evil gave %d %q", proto, resp.StatusCode, resp.Header.Get(ReasonHeader))
					}
				}
			}
			c.Close()
		}
	}
}

// sendHalfClosed opens an intercepted HTTP/1.1 connection, sends req and
// shuts the client's write side (TLS close_notify, then TCP FIN).
func sendHalfClosed(t *testing.T, req string) *tls.Conn {
	t.Helper()
	w := newWorld(t, All, allowWeb)
	pool := x509.NewCertPool()
	pool.AddCert(w.ca.Cert())
	guest, _ := w.serve(t)
	c := tls.Client(guest, &tls.Config{ServerName: "example.com", RootCAs: pool, NextProtos: []string{"http/1.1"}})
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if err := c.Handshake(); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	guest.(*net.TCPConn).CloseWrite()
	return c
}

// TestHalfCloseAfterRequest: a client that sends its request and then
// shuts its write side still gets the whole answer. Go's HTTP/1 server
// took the end of its stream for a client gone and cancelled the request
// in flight: the client got a 200 with an empty body.
func TestHalfCloseAfterRequest(t *testing.T) {
	c := sendHalfClosed(t, "GET /slow HTTP/1.1\r\nHost: example.com\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("no answer after the half-close: %v", err)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 || !strings.Contains(string(body), `"path":"/slow"`) {
		t.Fatalf("answer %d %q, %v", resp.StatusCode, body, err)
	}
}

// TestHalfCloseInsideBody: a client that half-closes before its request's
// body is complete is not kept waiting: the request fails and the
// connection ends at once.
func TestHalfCloseInsideBody(t *testing.T) {
	c := sendHalfClosed(t, "POST /x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 100\r\n\r\nabc")
	start := time.Now()
	_, err := io.ReadAll(c)
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("the connection stayed open %v after a half-close inside the body (%v)", took, err)
	}
}

// roundTrips keeps one HTTP/2 client connection per TLS connection.
var (
	h2mu    sync.Mutex
	h2conns = map[*tls.Conn]*http2.ClientConn{}
)

func roundTrip(t *testing.T, c *tls.Conn, proto, sni, host string) *http.Response {
	t.Helper()
	req, _ := http.NewRequest("GET", "https://"+sni+"/x", nil)
	req.Host = host
	var resp *http.Response
	var err error
	if proto == "h2" {
		h2mu.Lock()
		cc := h2conns[c]
		if cc == nil {
			cc, err = (&http2.Transport{}).NewClientConn(c)
			h2conns[c] = cc
		}
		h2mu.Unlock()
		if err == nil {
			resp, err = cc.RoundTrip(req)
		}
	} else {
		br := bufio.NewReader(c)
		if err = req.Write(c); err == nil {
			resp, err = http.ReadResponse(br, req)
			if err == nil {
				b, _ := io.ReadAll(resp.Body)
				resp.Body = io.NopCloser(strings.NewReader(string(b)))
			}
		}
	}
	if err != nil {
		t.Fatalf("%s request: %v", proto, err)
	}
	return resp
}

func TestLeafCache(t *testing.T) {
	ca, err := NewCA()
	if err != nil {
		t.Fatal(err)
	}
	ca.max = 3
	a, _ := ca.Leaf("a.test")
	if b, _ := ca.Leaf("a.test"); b != a {
		t.Fatal("a second Leaf for one name issued again")
	}
	for i := 0; i < 5; i++ {
		ca.Leaf(fmt.Sprintf("n%d.test", i))
	}
	if ca.order.Len() != 3 || len(ca.leaves) != 3 {
		t.Fatalf("cache holds %d/%d, bound 3", ca.order.Len(), len(ca.leaves))
	}
	if a.Leaf.NotBefore.After(time.Now().Add(-30*time.Minute)) || a.Leaf.DNSNames[0] != "a.test" || len(a.Leaf.DNSNames) != 1 {
		t.Fatalf("leaf: not before %v, names %v", a.Leaf.NotBefore, a.Leaf.DNSNames)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert())
	if _, err := a.Leaf.Verify(x509.VerifyOptions{DNSName: "a.test", Roots: pool}); err != nil {
		t.Fatal(err)
	}
}

func TestBypassPatterns(t *testing.T) {
	for _, tc := range []struct {
		name string
		want bool
	}{{"pinned.test", true}, {"a.bank.test", true}, {"bank.test", false}, {"other.test", false},
		{"PINNED.test.", true}, {"a.xn--bcher-kva.test", true}, {"xn--bcher-kva.test", false}} {
		if got := MatchesAny([]string{"pinned.test", "*.bank.test", "*.Bücher.test"}, tc.name); got != tc.want {
			t.Errorf("%s: %v", tc.name, got)
		}
	}
}
