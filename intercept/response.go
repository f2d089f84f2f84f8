package intercept

import (
	"bufio"
	"compress/flate"
	"compress/gzip"
	"compress/zlib"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/net/http2"
)

// The response side: what an upstream sends back through interception
// is bounded (header bytes per response and across all responses held)
// and, from a secret's host, scrubbed of the secret's value.

// Scrubber changes what a host sends back to the sandbox: a secret's
// value becomes its placeholder. It must be safe for concurrent use.
type Scrubber interface {
	// Header rewrites h in place: final and 1xx headers, trailers, and
	// msbtap's own 502s.
	Header(h http.Header)
	// Body wraps what the sandbox reads of a response body (or of an
	// upgraded connection's server side); it streams.
	Body(r io.Reader) io.Reader
	// SameLength reports whether Body keeps the length of what it reads
	// (else a body's Content-Length goes).
	SameLength() bool
}

// ResponseScrubber, implemented by a Rewriter, scrubs the responses of
// some hosts.
type ResponseScrubber interface {
	// Scrubber returns the Scrubber for responses from host, or nil when
	// they pass as they are.
	Scrubber(host string) Scrubber
}

// Bounds of the response side.
const (
	// DefaultMaxResponseHeaderBytes caps one response's header bytes
	// (HTTP/1: as read, each 1xx on its own; HTTP/2: the decoded list).
	DefaultMaxResponseHeaderBytes = 64 << 10
	// DefaultResponseHeaderBudget caps the header bytes of all responses
	// held at once, from their first byte until their body ends.
	DefaultResponseHeaderBudget = 8 << 20
	// max1xx is how many informational responses (103 Early Hints, …)
	// one request may get before its final one.
	max1xx = 16
)

// Reasons a response is replaced by a 502, as counted.
const (
	refusedHeaderTooLarge = "header_too_large"
	refusedHeaderBudget   = "header_budget"
	refusedEncoding       = "encoding"
	refusedTooMany1xx     = "too_many_1xx"
)

var (
	errHeaderBudget = errors.New("response headers past msbtap's budget for all responses held")
	errTooMany1xx   = fmt.Errorf("more than %d informational (1xx) responses", max1xx)
)

// responseRefusal is a response msbtap will not pass on.
type responseRefusal struct{ reason, msg string }

func (e *responseRefusal) Error() string { return e.msg }

// headerBudget is the response header bytes held across a handler's
// flows.
type headerBudget struct {
	max  int64
	used atomic.Int64
}

// responseCounters count the responses replaced by a 502, by reason.
type responseCounters struct {
	tooLarge, budget, encoding, too1xx atomic.Uint64
}

func (c *responseCounters) add(reason string) {
	switch reason {
	case refusedHeaderTooLarge:
		c.tooLarge.Add(1)
	case refusedHeaderBudget:
		c.budget.Add(1)
	case refusedEncoding:
		c.encoding.Add(1)
	case refusedTooMany1xx:
		c.too1xx.Add(1)
	}
}

// ResponsesRefused are the responses replaced by a 502, by reason
// (header_too_large, header_budget, encoding, too_many_1xx).
func (h *Handler) ResponsesRefused() map[string]uint64 {
	c := &h.respRefused
	return map[string]uint64{refusedHeaderTooLarge: c.tooLarge.Load(), refusedHeaderBudget: c.budget.Load(),
		refusedEncoding: c.encoding.Load(), refusedTooMany1xx: c.too1xx.Load()}
}

func (h *Handler) maxHeaderBytes() int64 {
	if h.o.MaxResponseHeaderBytes > 0 {
		return h.o.MaxResponseHeaderBytes
	}
	return DefaultMaxResponseHeaderBytes
}

func (h *Handler) budget() *headerBudget {
	h.budgetOnce.Do(func() {
		h.hdrBudget.max = h.o.ResponseHeaderBudget
		if h.hdrBudget.max <= 0 {
			h.hdrBudget.max = DefaultResponseHeaderBudget
		}
	})
	return &h.hdrBudget
}

// exchange is one request's response side: what its headers hold of the
// budget, and the scrubber of its host.
type exchange struct {
	budget *headerBudget
	sc     Scrubber
	n1xx   atomic.Int32
	conn   atomic.Pointer[meteredConn] // the HTTP/1 connection whose reads are charged
	over   atomic.Bool                 // refused for the budget

	mu      sync.Mutex // mu protects charged and done
	charged int64
	done    bool
}

type exchangeKey struct{}

func exchangeFrom(ctx context.Context) *exchange {
	ex, _ := ctx.Value(exchangeKey{}).(*exchange)
	return ex
}

// charge takes n bytes of the budget; false (and nothing taken) past it.
func (ex *exchange) charge(n int64) bool {
	ex.mu.Lock()
	defer ex.mu.Unlock()
	if ex.done {
		return true
	}
	if ex.budget.used.Add(n) > ex.budget.max {
		ex.budget.used.Add(-n)
		ex.over.Store(true)
		return false
	}
	ex.charged += n
	return true
}

// detach stops charging the connection's reads: the headers are in.
func (ex *exchange) detach() {
	if c := ex.conn.Swap(nil); c != nil {
		c.ex.CompareAndSwap(ex, nil)
	}
}

// release gives back what the exchange holds: its response has ended.
func (ex *exchange) release() {
	ex.detach()
	ex.mu.Lock()
	defer ex.mu.Unlock()
	ex.done = true
	ex.budget.used.Add(-ex.charged)
	ex.charged = 0
}

// meteredConn is an upstream HTTP/1 connection whose reads, while a
// request waits for its response headers, are charged to that request.
type meteredConn struct {
	net.Conn
	ex atomic.Pointer[exchange]
}

func (c *meteredConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if ex := c.ex.Load(); ex != nil && n > 0 && !ex.charge(int64(n)) {
		c.Conn.Close()
		return 0, errHeaderBudget
	}
	return n, err
}

// limitedTransport ends each request's header phase: an HTTP/2
// response, whose bytes cannot be told apart on the connection, is
// charged its decoded size.
type limitedTransport struct{ rt http.RoundTripper }

func (t limitedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.rt.RoundTrip(req)
	ex := exchangeFrom(req.Context())
	if ex == nil {
		return resp, err
	}
	ex.detach()
	if err != nil {
		return nil, err
	}
	ex.mu.Lock()
	charged := ex.charged
	ex.mu.Unlock()
	if charged == 0 && !ex.charge(headerSize(resp.Header)) {
		resp.Body.Close()
		return nil, errHeaderBudget
	}
	return resp, nil
}

// headerSize counts a header as HTTP/2 does (name, value and 32 per
// field).
func headerSize(h http.Header) int64 {
	var n int64
	for k, vs := range h {
		for _, v := range vs {
			n += int64(len(k) + len(v) + 32)
		}
	}
	return n
}

// serveUpstream proxies r upstream and the answer back, under the
// response side's bounds and, for a secret's host, its scrubber.
func (rh *requestHandler) serveUpstream(w http.ResponseWriter, r *http.Request) {
	ex := &exchange{budget: rh.h.budget()}
	if rs, ok := rh.h.o.Rewriter.(ResponseScrubber); ok && rs != nil {
		ex.sc = rs.Scrubber(hostOnly(r.Host))
	}
	defer ex.release()
	sw := &scrubWriter{ResponseWriter: w, sc: ex.sc}
	trace := &httptrace.ClientTrace{
		GotConn: func(ci httptrace.GotConnInfo) {
			if mc, ok := ci.Conn.(*meteredConn); ok {
				ex.conn.Store(mc)
				mc.ex.Store(ex)
			}
		},
		Got1xxResponse: func(int, textproto.MIMEHeader) error {
			if ex.n1xx.Add(1) > max1xx {
				return errTooMany1xx
			}
			return nil
		},
	}
	ctx := context.WithValue(httptrace.WithClientTrace(r.Context(), trace), exchangeKey{}, ex)
	rh.proxy().ServeHTTP(sw, r.WithContext(ctx))
	if ex.sc != nil {
		ex.sc.Header(w.Header()) // the trailers, written once the handler returns
	}
}

// prepareRequest is the response side's part of the outgoing request:
// a secret's host is asked for an unencoded body, which needs no
// decoding to be scrubbed.
func prepareRequest(pr *http.Request) {
	if ex := exchangeFrom(pr.Context()); ex != nil && ex.sc != nil {
		pr.Header.Set("Accept-Encoding", "identity")
	}
}

// modifyResponse scrubs a secret's host's response: headers now, the
// body as it streams (decoded first if the host encoded it anyway).
func modifyResponse(resp *http.Response) error {
	ex := exchangeFrom(resp.Request.Context())
	if ex == nil || ex.sc == nil {
		return nil
	}
	sc := ex.sc
	sc.Header(resp.Header)
	if resp.StatusCode == http.StatusSwitchingProtocols {
		if rwc, ok := resp.Body.(io.ReadWriteCloser); ok {
			resp.Body = upgraded{Reader: sc.Body(rwc), Writer: rwc, Closer: rwc}
		}
		return nil
	}
	noBody := resp.Request.Method == http.MethodHead || resp.StatusCode == http.StatusNoContent || resp.StatusCode == http.StatusNotModified
	if noBody {
		return nil
	}
	body := io.Reader(resp.Body)
	lengthChanges := !sc.SameLength()
	switch enc := strings.ToLower(strings.TrimSpace(resp.Header.Get("Content-Encoding"))); enc {
	case "", "identity":
	case "gzip", "x-gzip", "deflate":
		body = &decoder{r: resp.Body, enc: enc}
		resp.Header.Del("Content-Encoding")
		lengthChanges = true
	default:
		return &responseRefusal{reason: refusedEncoding,
			msg: fmt.Sprintf("the response's Content-Encoding %q cannot be checked for secrets", enc)}
	}
	if lengthChanges {
		resp.Header.Del("Content-Length")
		resp.ContentLength = -1
	}
	resp.Body = scrubbedBody{Reader: sc.Body(body), Closer: resp.Body}
	return nil
}

type scrubbedBody struct {
	io.Reader
	io.Closer
}

// upgraded is an upgraded connection's server side, its reads scrubbed.
type upgraded struct {
	io.Reader
	io.Writer
	io.Closer
}

// decoder decodes a gzip or deflate body, lazily: the headers go on
// before the first body byte is there.
type decoder struct {
	r   io.Reader
	enc string
	d   io.Reader
	err error
}

func (d *decoder) Read(b []byte) (int, error) {
	if d.d == nil && d.err == nil {
		d.d, d.err = d.open()
	}
	if d.err != nil {
		return 0, d.err
	}
	return d.d.Read(b)
}

func (d *decoder) open() (io.Reader, error) {
	if d.enc != "deflate" {
		zr, err := gzip.NewReader(d.r)
		if err != nil {
			return nil, fmt.Errorf("decode the gzip body: %w", err)
		}
		return zr, nil
	}
	// "deflate" is zlib (RFC 9110), but some servers send raw deflate.
	br := bufio.NewReader(d.r)
	if hdr, err := br.Peek(2); err == nil && (uint16(hdr[0])<<8|uint16(hdr[1]))%31 == 0 && hdr[0]&0x0f == 8 {
		zr, err := zlib.NewReader(br)
		if err != nil {
			return nil, fmt.Errorf("decode the deflate body: %w", err)
		}
		return zr, nil
	}
	return flate.NewReader(br), nil
}

// scrubWriter is the sandbox's side of one response: headers are
// scrubbed as they are written (1xx, final, msbtap's 502), and the
// upstream's 100 Continue is not passed on: the sandbox got one already,
// from msbtap's own server, when the request's body was first read.
type scrubWriter struct {
	http.ResponseWriter
	sc Scrubber
}

func (w *scrubWriter) WriteHeader(code int) {
	if code == http.StatusContinue {
		return
	}
	if w.sc != nil {
		w.sc.Header(w.Header())
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *scrubWriter) Write(b []byte) (int, error) { return w.ResponseWriter.Write(b) }

// Unwrap lets http.ResponseController flush and hijack.
func (w *scrubWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// badGateway answers a request whose upstream failed or whose response
// msbtap refused, saying why.
func (rh *requestHandler) badGateway(w http.ResponseWriter, r *http.Request, err error) {
	msg := "upstream: " + err.Error()
	reason := ""
	var rr *responseRefusal
	ex := exchangeFrom(r.Context())
	switch {
	case errors.As(err, &rr):
		reason, msg = rr.reason, "upstream: "+rr.msg
	case errors.Is(err, errHeaderBudget) || (ex != nil && ex.over.Load()):
		reason, msg = refusedHeaderBudget, "upstream: "+errHeaderBudget.Error()
	case strings.Contains(err.Error(), "response headers exceeded") || strings.Contains(err.Error(), "header list larger than"):
		reason = refusedHeaderTooLarge
		msg = fmt.Sprintf("upstream: response headers larger than msbtap's cap of %d bytes", rh.h.maxHeaderBytes())
	case rh.upstreamH2() && strings.Contains(err.Error(), "COMPRESSION_ERROR"):
		// HTTP/2's decoder stops at a field longer than the cap.
		reason = refusedHeaderTooLarge
		msg = fmt.Sprintf("upstream: response headers larger than msbtap's cap of %d bytes, or not valid HPACK", rh.h.maxHeaderBytes())
	case errors.Is(err, errTooMany1xx) || (ex != nil && ex.n1xx.Load() > max1xx):
		reason, msg = refusedTooMany1xx, "upstream: "+errTooMany1xx.Error()
	case rh.certAsked != nil && rh.certAsked.Load():
		msg = rh.clientCertMessage() + ": " + err.Error()
	}
	if reason != "" {
		rh.h.respRefused.add(reason)
	}
	// The error's text may quote what the upstream sent.
	msg = strings.Map(func(c rune) rune {
		if c < 0x20 || c == 0x7f {
			return ' '
		}
		return c
	}, msg)
	w.Header().Set(ErrorHeader, msg)
	w.WriteHeader(http.StatusBadGateway)
}

func (rh *requestHandler) upstreamH2() bool {
	_, ok := rh.rt.(*http2.ClientConn)
	return ok
}

func (rh *requestHandler) clientCertMessage() string {
	return "upstream TLS: the server asks for a client certificate (use --tls-bypass " + rh.host + ")"
}
