package intercept

import (
	"bufio"
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"

	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/policy"
)

// plainWorld is a plain-HTTP upstream (which also speaks h2c, by upgrade
// and by prior knowledge) that records every request it gets, an address
// pinned to example.com, and a handler.
type plainWorld struct {
	world
	mu   sync.Mutex
	seen []string // "METHOD host path" as the upstream parsed them
	hdrs []http.Header
}

func newPlainWorld(t testing.TB, mode Mode, policyJSON string) *plainWorld {
	t.Helper()
	w := &plainWorld{}
	srv := httptest.NewServer(h2c.NewHandler(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		w.mu.Lock()
		w.seen = append(w.seen, r.Method+" "+r.Host+" "+r.URL.Path)
		w.hdrs = append(w.hdrs, r.Header.Clone())
		w.mu.Unlock()
		io.Copy(io.Discard, r.Body)
		json.NewEncoder(rw).Encode(map[string]any{"host": r.Host, "proto": r.Proto, "method": r.Method, "path": r.URL.Path})
	}), &http2.Server{}))
	t.Cleanup(srv.Close)
	f, err := policy.ParseFile([]byte(policyJSON))
	if err != nil {
		t.Fatal(err)
	}
	pins := policy.NewPins(0)
	e, err := policy.Compile(f, policy.Options{Pins: pins})
	if err != nil {
		t.Fatal(err)
	}
	w.rec = &recorder{}
	w.dst = netip.MustParseAddrPort(srv.Listener.Addr().String())
	pins.Add(w.dst.Addr(), "example.com", time.Minute)
	w.h = NewHandler(Options{Mode: mode, Policy: policy.NewHolder(e), Report: w.rec.report})
	w.upAddr, w.pins = srv.Listener.Addr().String(), pins
	w.decided = e.Check(policy.Flow{Proto: policy.TCP, Dst: w.dst})
	return w
}

// upstreamSaw returns the requests the upstream got.
func (w *plainWorld) upstreamSaw() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]string(nil), w.seen...)
}

// send writes raw on a new flow and returns what came back until the
// flow ended (or 3 s passed), and whether it ended in a reset.
func (w *plainWorld) send(t *testing.T, raw string) (string, bool) {
	t.Helper()
	guest, wait := w.serve(t)
	guest.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.WriteString(guest, raw); err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond) // the first bytes are read as one
	guest.(*net.TCPConn).CloseWrite() // the answers are still sent
	b, err := io.ReadAll(guest)
	guest.Close()
	wait()
	return string(b), err != nil && strings.Contains(err.Error(), "reset")
}

// statuses returns the status codes of the HTTP/1 responses in b.
func statuses(b string) []int {
	var codes []int
	br := bufio.NewReader(strings.NewReader(b))
	for {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return codes
		}
		io.Copy(io.Discard, resp.Body)
		codes = append(codes, resp.StatusCode)
	}
}

const getPublicOnly = `{"default_action": "deny", "rules": [
	{"destination": {"domain": "example.com"}, "http": {"methods": ["GET"], "paths": ["/public"]}, "action": "allow"}]}`

// TestRequestsInAnyForm: on a flow allowed by name, a request whose method
// is not one of the usual ten upper-case ones is still a request: its
// host is checked (a lower-case "get" for evil.test is refused), and HTTP
// rules see its method as written (FOO is not GET). The old code took
// them for another protocol and spliced them unchecked, later requests
// too.
func TestRequestsInAnyForm(t *testing.T) {
	w := newPlainWorld(t, Auto, allowWeb)
	if out, reset := w.send(t, "get / HTTP/1.1\r\nHost: evil.test\r\n\r\n"); !reset || out != "" {
		t.Errorf("get for evil.test: reset %v, answer %q", reset, out)
	}
	if ev, ok := w.rec.find("refused"); !ok || !strings.Contains(ev.Reason, "evil.test") {
		t.Errorf("no refusal naming evil.test: %+v", ev)
	}
	// An extension method for the allowed host goes through, as written.
	out, _ := w.send(t, "PROPFIND /dav HTTP/1.1\r\nHost: example.com\r\n\r\n")
	if got := statuses(out); len(got) != 1 || got[0] != 200 || !strings.Contains(out, `"method":"PROPFIND"`) {
		t.Errorf("PROPFIND for example.com: %v %q", got, out)
	}

	w = newPlainWorld(t, Auto, getPublicOnly)
	// The first request decides whether the flow starts at all: refused.
	out, reset := w.send(t, "FOO /public HTTP/1.1\r\nHost: example.com\r\n\r\nDELETE /private HTTP/1.1\r\nHost: example.com\r\n\r\n")
	if !reset || out != "" {
		t.Errorf("FOO /public then DELETE /private on a GET-only rule: reset %v, answer %q", reset, out)
	}
	out, _ = w.send(t, "GET /public HTTP/1.1\r\nHost: example.com\r\n\r\nget /public HTTP/1.1\r\nHost: example.com\r\n\r\n")
	if got := statuses(out); len(got) != 2 || got[0] != 200 || got[1] != http.StatusForbidden {
		t.Errorf("GET then get /public: %v %q (methods are case-sensitive)", got, out)
	}
	if saw := w.upstreamSaw(); len(saw) != 1 || saw[0] != "GET example.com /public" {
		t.Errorf("the upstream saw %q, want only GET /public", saw)
	}
}

// TestMalformedRequestsRefused: what a lenient server would take for a
// request but net/http does not parse (a blank line before the request
// line, HTTP/0.9) is refused on a flow that is read, not spliced.
func TestMalformedRequestsRefused(t *testing.T) {
	w := newPlainWorld(t, Auto, allowWeb)
	for _, raw := range []string{
		"\r\nGET / HTTP/1.1\r\nHost: evil.test\r\n\r\n",
		"\nGET / HTTP/1.1\r\nHost: evil.test\r\n\r\n",
		"GET /\r\n",
		"GET / http/1.1\r\nHost: evil.test\r\n\r\n",
	} {
		w.rec = &recorder{}
		w.h.o.Report = w.rec.report
		out, reset := w.send(t, raw)
		if _, ok := w.rec.find("refused"); !ok || !reset || out != "" {
			t.Errorf("%q: refused %v, reset %v, answer %q", raw, ok, reset, out)
		}
	}
	if saw := w.upstreamSaw(); len(saw) != 0 {
		t.Errorf("the upstream saw %q", saw)
	}
}

// TestOtherProtocolsByPin: a protocol that is neither TLS nor HTTP (an SSH
// banner) is still decided by the pin alone on a flow allowed by name, but
// refused where HTTP rules decide the flow.
func TestOtherProtocolsByPin(t *testing.T) {
	banner := "SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"
	w := newPlainWorld(t, Auto, allowWeb)
	guest, wait := w.serve(t)
	guest.SetDeadline(time.Now().Add(3 * time.Second))
	io.WriteString(guest, banner)
	// Spliced: the upstream HTTP server answers the banner with a 400.
	if resp, err := http.ReadResponse(bufio.NewReader(guest), nil); err != nil || resp.StatusCode != http.StatusBadRequest {
		t.Errorf("an SSH banner on a flow allowed by name was not spliced: %v %v", resp, err)
	}
	guest.Close()
	wait()
	w = newPlainWorld(t, Auto, getPublicOnly)
	if out, reset := w.send(t, banner); !reset || out != "" {
		t.Errorf("an SSH banner where HTTP rules decide: reset %v, answer %q", reset, out)
	}
}

// TestHostPortStrict: a Host whose port is not decimal 1-65535 is refused,
// the first request's (the flow) and a later one's (400); the upstream
// gets byte for byte the host that was checked. The old code checked
// "example.com:80.evil" as example.com and forwarded it as written.
func TestHostPortStrict(t *testing.T) {
	w := newPlainWorld(t, Auto, allowWeb)
	if out, reset := w.send(t, "GET / HTTP/1.1\r\nHost: example.com.:80.evil\r\n\r\n"); !reset || out != "" {
		t.Errorf("first request: reset %v, answer %q", reset, out)
	}
	out, _ := w.send(t, "GET /a HTTP/1.1\r\nHost: EXAMPLE.com.\r\n\r\n"+
		"GET /b HTTP/1.1\r\nHost: example.com:80.evil\r\n\r\n"+
		"GET /c HTTP/1.1\r\nHost: example.com:99999\r\n\r\n")
	if got := statuses(out); len(got) != 2 || got[0] != 200 || got[1] != http.StatusBadRequest {
		t.Errorf("later requests: %v %q", got, out)
	}
	if saw := w.upstreamSaw(); len(saw) != 1 || saw[0] != "GET example.com /a" {
		t.Errorf("the upstream saw %q, want only GET example.com /a", saw)
	}
}

// TestH2CUpgradeDeclined: an Upgrade: h2c offer on a flow the agent reads
// is taken out, so the request is served over HTTP/1.1 and no HTTP/2
// stream (whose :authority nobody would check) follows; a WebSocket
// upgrade goes upstream as it was. The old code let the upstream answer
// 101 and then copied bytes.
func TestH2CUpgradeDeclined(t *testing.T) {
	w := newPlainWorld(t, Auto, allowWeb)
	out, _ := w.send(t, "GET /up HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade, HTTP2-Settings\r\n"+
		"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
	if got := statuses(out); len(got) != 1 || got[0] != 200 || !strings.Contains(out, `"proto":"HTTP/1.1"`) {
		t.Errorf("an h2c upgrade: %v %q, want a 200 over HTTP/1.1", got, out)
	}
	out, _ = w.send(t, "GET /ws HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.hdrs) != 2 {
		t.Fatalf("the upstream saw %q", w.seen)
	}
	if up := w.hdrs[0]; up.Get("Upgrade") != "" || up.Get("Http2-Settings") != "" {
		t.Errorf("the h2c offer reached the upstream: %v", up)
	}
	if ws := w.hdrs[1]; ws.Get("Upgrade") != "websocket" {
		t.Errorf("a WebSocket upgrade lost its Upgrade header: %v (%q)", ws, out)
	}
}

const denyEvil = `{"default_action": "allow", "rules": [
	{"destination": {"domain": "evil.test"}, "action": "deny"},
	{"destination": {"domain_suffix": "bad.test"}, "action": "deny"}]}`

// TestDomainDenyWithoutPin: under domain deny rules, a flow the addresses
// allow (here by default, to an address pinned to another name, or to
// none) is refused for a Host or SNI that names a denied domain; the
// others go through. The old code read only flows a domain rule allowed.
func TestDomainDenyWithoutPin(t *testing.T) {
	w := newPlainWorld(t, Auto, denyEvil)
	w.dst = netip.AddrPortFrom(w.dst.Addr(), 80)
	if !w.h.Wants(flow.Of(policy.Flow{Proto: policy.TCP, Dst: w.dst}, w.decided)) {
		t.Fatal("a flow to port 80 is not read under domain deny rules")
	}
	for _, host := range []string{"evil.test", "EVIL.test.", "x.bad.test", "evil.test:80"} {
		if out, reset := w.send(t, "GET / HTTP/1.1\r\nHost: "+host+"\r\n\r\n"); !reset || out != "" {
			t.Errorf("Host %s: reset %v, answer %q", host, reset, out)
		}
	}
	// A later request for a denied name on a flow that started allowed.
	out, _ := w.send(t, "GET /a HTTP/1.1\r\nHost: example.com\r\n\r\nGET /b HTTP/1.1\r\nHost: evil.test\r\n\r\n")
	if got := statuses(out); len(got) != 2 || got[0] != 200 || got[1] != http.StatusForbidden {
		t.Errorf("example.com then evil.test: %v %q", got, out)
	}
	if saw := w.upstreamSaw(); len(saw) != 1 || saw[0] != "GET example.com /a" {
		t.Errorf("the upstream saw %q", saw)
	}

	tw := newWorld(t, Auto, denyEvil)
	tw.dst = netip.AddrPortFrom(tw.dst.Addr(), 443)
	for _, tc := range []struct {
		sni string
		ok  bool
	}{{"evil.test", false}, {"a.bad.test", false}, {"example.com", true}} {
		tw.rec = &recorder{}
		tw.h.o.Report = tw.rec.report
		guest, _ := tw.serve(t)
		c := tls.Client(guest, &tls.Config{ServerName: tc.sni, InsecureSkipVerify: true})
		c.SetDeadline(time.Now().Add(5 * time.Second))
		err := c.Handshake()
		if (err == nil) != tc.ok {
			t.Errorf("SNI %s: handshake %v, want ok %v", tc.sni, err, tc.ok)
		}
		if ev, refused := tw.rec.find("refused"); refused == tc.ok || (!tc.ok && ev.SNI != tc.sni) {
			t.Errorf("SNI %s: refused %v %+v", tc.sni, refused, ev)
		}
		c.Close()
	}
}

// TestH2CPriorKnowledge: cleartext HTTP/2 with prior knowledge (gRPC
// without TLS) on a flow allowed by name is served stream by stream:
// each stream's :authority is checked, a refused one gets 403 and the
// connection goes on. The old code refused the whole flow.
func TestH2CPriorKnowledge(t *testing.T) {
	w := newPlainWorld(t, Auto, allowWeb)
	guest, _ := w.serve(t)
	guest.SetDeadline(time.Now().Add(5 * time.Second))
	cc, err := (&http2.Transport{AllowHTTP: true}).NewClientConn(guest)
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	for _, tc := range []struct {
		host string
		code int
	}{{"example.com", 200}, {"evil.test", http.StatusForbidden}, {"example.com:80.evil", http.StatusBadRequest}, {"Example.COM", 200}} {
		req, _ := http.NewRequest("POST", "http://example.com/rpc", strings.NewReader("ping"))
		req.Host = tc.host
		resp, err := cc.RoundTrip(req)
		if err != nil {
			t.Fatalf("%s: %v", tc.host, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.code || (tc.code == 200 && !strings.Contains(string(body), `"proto":"HTTP/2.0"`)) {
			t.Errorf("%s: %d %s, want %d", tc.host, resp.StatusCode, body, tc.code)
		}
	}
	if saw := w.upstreamSaw(); len(saw) != 2 || saw[0] != "POST example.com /rpc" || saw[1] != "POST example.com /rpc" {
		t.Errorf("the upstream saw %q", saw)
	}
}
