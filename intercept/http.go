package intercept

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"

	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/inspect"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/proxy"
)

// HTTPRequest is the request a Rewriter changes.
type HTTPRequest = http.Request

// Headers msbtap sets on the answers it makes itself.
const (
	// ReasonHeader says why msbtap refused a request (403, 421).
	ReasonHeader = "X-Msbtap-Reason"
	// ErrorHeader says why msbtap could not reach the upstream (502).
	ErrorHeader = "X-Msbtap-Error"
)

// upstreamTimeout bounds the upstream TLS handshake.
const upstreamTimeout = 10 * time.Second

// serveTLS stands in for the server: it completes TLS with the upstream
// first (the sandbox's ALPN offer forwarded, the upstream's choice then
// offered back), then with the sandbox under a certificate of the CA, and
// proxies request by request.
func (h *Handler) serveTLS(ctx context.Context, fl conn, peeked []byte, hello inspect.Hello, d policy.Decision) error {
	sni := hello.Names[0]
	guest := proxy.WrapConn(fl.guest, peeked, &fl.f.Up, &fl.f.Down)
	defer guest.Close()
	defer fl.host.Close()
	offer := slices.DeleteFunc(slices.Clone(hello.ALPN), func(p string) bool { return p != "h2" && p != "http/1.1" })
	// A server that asks for a client certificate gets none (msbtap has
	// none to give); that it asked explains the failure that follows.
	certAsked := new(atomic.Bool)
	upCfg := &tls.Config{ServerName: sni, RootCAs: h.o.Roots, NextProtos: offer, MinVersion: tls.VersionTLS12,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			certAsked.Store(true)
			return &tls.Certificate{}, nil
		}}
	hctx, cancel := context.WithTimeout(ctx, upstreamTimeout)
	defer cancel()
	upTLS := tls.Client(fl.host, upCfg)
	upErr := upTLS.HandshakeContext(hctx)
	proto := ""
	if upErr == nil {
		proto = upTLS.ConnectionState().NegotiatedProtocol
	} else if len(offer) > 0 {
		proto = "http/1.1" // to tell the sandbox why, over whatever it speaks
		if !slices.Contains(offer, proto) {
			proto = offer[0]
		}
	}
	leaf, err := h.o.CA.Leaf(sni)
	if err != nil {
		proxy.ResetConn(fl.guest)
		return err
	}
	gCfg := &tls.Config{Certificates: []tls.Certificate{*leaf}, MinVersion: tls.VersionTLS12}
	if proto != "" {
		gCfg.NextProtos = []string{proto}
	}
	gTLS := tls.Server(guest, gCfg)
	if err := gTLS.HandshakeContext(hctx); err != nil {
		// The sandbox does not trust the CA, most likely.
		h.report(fl, hello, d, "intercepted", "the sandbox's TLS handshake failed: "+err.Error())
		return err
	}
	cancel()
	ev := Event{Flow: fl.f, Decision: d, L7: flow.L7{Mode: "intercepted", SNI: sni, ALPN: proto}}
	if upErr != nil {
		ev.Reason = "upstream: " + upErr.Error()
	}
	h.o.Report(ev)

	rh := &requestHandler{h: h, fl: fl, host: sni, tls: true, scheme: "https", certAsked: certAsked}
	if upErr != nil {
		rh.upErr = "upstream TLS: " + upErr.Error()
		if certAsked.Load() {
			rh.upErr = rh.clientCertMessage() + ": " + upErr.Error()
		}
	} else if proto == "h2" {
		// The server's bytes, as they are: no gzip asked for on the
		// client's behalf and decoded behind its back.
		t2 := &http2.Transport{DisableCompression: true, MaxHeaderListSize: uint32(h.maxHeaderBytes())}
		cc, err := t2.NewClientConn(upTLS)
		if err != nil {
			rh.upErr = "upstream HTTP/2: " + err.Error()
			if certAsked.Load() {
				rh.upErr = rh.clientCertMessage() + ": " + err.Error()
			}
		} else {
			rh.rt = cc
			defer cc.Close()
		}
	} else {
		tr := h.upstreamTransport(fl, upTLS, func(ctx context.Context, c net.Conn) (net.Conn, error) {
			cfg := upCfg.Clone()
			cfg.NextProtos = []string{"http/1.1"}
			t := tls.Client(c, cfg)
			return t, t.HandshakeContext(ctx)
		})
		defer tr.CloseIdleConnections()
		rh.rt = tr
	}
	if proto == "h2" {
		(&http2.Server{IdleTimeout: 5 * time.Minute}).ServeConn(gTLS, &http2.ServeConnOpts{Context: ctx, Handler: rh.wrap()})
		rh.wg.Wait()
		return nil
	}
	return serveOne(ctx, gTLS, rh)
}

// serveHTTP proxies plain HTTP/1 request by request, so that every
// request's host is checked, not only the first one's.
func (h *Handler) serveHTTP(ctx context.Context, fl conn, peeked []byte, host string, _ any) error {
	guest := proxy.WrapConn(fl.guest, peeked, &fl.f.Up, &fl.f.Down)
	defer guest.Close()
	defer fl.host.Close()
	tr := h.upstreamTransport(fl, fl.host, nil)
	defer tr.CloseIdleConnections()
	rh := &requestHandler{h: h, fl: fl, host: host, scheme: "http", rt: tr}
	return serveOne(ctx, guest, rh)
}

// upstreamTransport is an HTTP/1 transport whose first connection is the
// flow's own (already dialled, policy-checked) upstream, and which dials
// the same address again (wrapped by wrap, for TLS) when the client opens
// more.
func (h *Handler) upstreamTransport(fl conn, first net.Conn, wrap func(context.Context, net.Conn) (net.Conn, error)) *http.Transport {
	var mu sync.Mutex
	take := func() net.Conn {
		mu.Lock()
		defer mu.Unlock()
		c := first
		first = nil
		return c
	}
	dial := func(ctx context.Context, _, _ string) (net.Conn, error) {
		if c := take(); c != nil {
			return &meteredConn{Conn: c}, nil
		}
		c, err := h.o.Dial(ctx, fl.f.Flow.Dst.String())
		if err == nil && wrap != nil {
			c, err = wrap(ctx, c)
		}
		if err != nil {
			return nil, err
		}
		return &meteredConn{Conn: c}, nil
	}
	tr := &http.Transport{MaxIdleConnsPerHost: 4, IdleConnTimeout: 90 * time.Second, DisableCompression: true,
		MaxResponseHeaderBytes: h.maxHeaderBytes()}
	if wrap != nil {
		tr.DialTLSContext = dial
	} else {
		tr.DialContext = dial
	}
	return tr
}

// requestHandler decides and proxies the requests of one flow.
type requestHandler struct {
	h      *Handler
	fl     conn
	host   string // the name the connection asked for (SNI), or the first request's host
	tls    bool
	scheme string
	rt     http.RoundTripper
	upErr  string // the upstream could not be reached: every request gets 502
	// certAsked: the upstream asked for a client certificate (TLS only).
	certAsked *atomic.Bool
	wg        sync.WaitGroup
	rpOnce    sync.Once
	rp        *httputil.ReverseProxy
}

// wrap counts the requests being served, so that the flow ends after them.
func (rh *requestHandler) wrap() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rh.wg.Add(1)
		defer rh.wg.Done()
		rh.ServeHTTP(w, r)
	})
}

func refuse(w http.ResponseWriter, r *http.Request, code int, reason string) {
	w.Header().Set(ReasonHeader, reason)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if r.ProtoMajor < 2 {
		// HTTP/2 takes this as a GOAWAY and a teardown, which could cut
		// the refusal's own body short (curl: partial file); its other
		// streams are checked one by one anyway.
		w.Header().Set("Connection", "close")
	}
	w.WriteHeader(code)
	fmt.Fprintf(w, "msbtap: %s\n", reason)
}

// hostOnly is the name a request's Host (or :authority) checks as, for
// the log ("" if it is not one).
func hostOnly(hostport string) string {
	a, err := inspect.ParseAuthority(hostport)
	if err != nil {
		return ""
	}
	return a.Name
}

func (rh *requestHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := rh.h
	auth, authErr := inspect.ParseAuthority(r.Host)
	host := auth.Name
	ev := Event{Flow: rh.fl.f, L7: flow.L7{Mode: "request", Method: r.Method, Host: host, Path: r.URL.Path}}
	if rh.tls {
		ev.SNI = rh.host
	}
	quiet := false
	deny := func(code int, d policy.Decision, reason string) {
		if d.Action == policy.Allow {
			d.Action = policy.Deny
		}
		ev.Decision, ev.Reason = d, reason
		h.reqDenied.Add(1)
		if !quiet {
			h.o.Report(ev)
		}
		refuse(w, r, code, reason)
		if d.Action == policy.Terminate {
			h.o.Terminate(ev)
		}
	}
	if r.Host != "" && authErr != nil {
		deny(http.StatusBadRequest, policy.Decision{Action: policy.Deny, Rule: -1}, authErr.Error())
		return
	}
	// What goes upstream is byte for byte the host checked.
	r.Host = auth.String()
	declineH2C(r.Header)
	if rh.tls && host != rh.host {
		deny(http.StatusMisdirectedRequest, policy.Decision{Action: policy.Deny, Rule: -1},
			fmt.Sprintf("host %q is not the server name %q this connection asked for", host, rh.host))
		return
	}
	if host == "" && (rh.tls || rh.fl.f.Decision.ByName || rh.fl.f.Decision.PerRequest) {
		// Where the addresses decide (a flow read for the domain deny
		// rules only), a request without a host names none of them.
		deny(http.StatusBadRequest, policy.Decision{Action: policy.Deny, Rule: -1}, "request without a host")
		return
	}
	d := h.o.Policy.Load().CheckRequest(withDomain(rh.fl.f.Flow, host), r.Method, r.URL.Path)
	ev.Decision = d
	if d.Action != policy.Allow {
		deny(http.StatusForbidden, d, fmt.Sprintf("%s %s%s is not allowed by the policy", r.Method, host, r.URL.Path))
		return
	}
	if h.o.Rewriter != nil && h.o.Rewriter.Active() {
		req := &Request{Host: host, TLS: rh.tls, HTTP: r, Report: func(secret, what string) {
			e := ev
			e.Secret, e.Reason = secret, what
			h.o.Report(e)
		}}
		if ref := h.o.Rewriter.Request(req); ref != nil {
			ev.Secret, quiet = ref.Secret, ref.Quiet
			deny(http.StatusForbidden, ref.decision(), ref.Reason)
			return
		}
	}
	if rh.upErr != "" {
		ev.Reason = rh.upErr
		h.o.Report(ev)
		w.Header().Set(ErrorHeader, rh.upErr)
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusBadGateway)
		fmt.Fprintf(w, "msbtap: %s\n", rh.upErr)
		return
	}
	h.reqAllowed.Add(1)
	if d.Rule >= 0 && h.o.Policy.Load().HasHTTPRules() {
		h.o.Report(ev)
	}
	rh.serveUpstream(w, r)
}

// declineH2C takes an offer to upgrade to cleartext HTTP/2 (Upgrade: h2c)
// out of a request, which then goes upstream as plain HTTP/1.1, as to a
// server that does not upgrade: a 101 would turn the connection into
// bytes copied unchecked, HTTP/2 streams for any :authority among them.
// Other upgrades (WebSocket) stay: they are checked like any request
// before their 101.
func declineH2C(hdr http.Header) {
	var kept []string
	h2c := false
	for _, v := range hdr.Values("Upgrade") {
		for _, p := range strings.Split(v, ",") {
			if p = strings.TrimSpace(p); strings.EqualFold(p, "h2c") {
				h2c = true
			} else if p != "" {
				kept = append(kept, p)
			}
		}
	}
	if !h2c {
		return
	}
	hdr.Del("Upgrade")
	hdr.Del("Http2-Settings")
	if len(kept) > 0 {
		hdr.Set("Upgrade", strings.Join(kept, ", "))
	}
	var conn []string
	for _, v := range hdr.Values("Connection") {
		for _, p := range strings.Split(v, ",") {
			p = strings.TrimSpace(p)
			if p == "" || strings.EqualFold(p, "http2-settings") || (len(kept) == 0 && strings.EqualFold(p, "upgrade")) {
				continue
			}
			conn = append(conn, p)
		}
	}
	hdr.Del("Connection")
	if len(conn) > 0 {
		hdr.Set("Connection", strings.Join(conn, ", "))
	}
}

func (rh *requestHandler) proxy() *httputil.ReverseProxy {
	rh.rpOnce.Do(func() {
		rh.rp = &httputil.ReverseProxy{
			Rewrite: func(pr *httputil.ProxyRequest) {
				pr.Out.URL.Scheme = rh.scheme
				pr.Out.URL.Host = pr.In.Host
				pr.Out.Host = pr.In.Host
				prepareRequest(pr.Out)
			},
			Transport:     limitedTransport{rh.rt},
			FlushInterval: -1,
			ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
				var rerr interface{ Refusal() *Refusal }
				if errors.As(err, &rerr) {
					// The Rewriter stopped the request mid-body.
					ref := rerr.Refusal()
					ev := Event{Flow: rh.fl.f, Decision: ref.decision(), L7: flow.L7{Mode: "request", Method: r.Method,
						Host: hostOnly(r.Host), Path: r.URL.Path, Reason: ref.Reason, Secret: ref.Secret}}
					rh.h.reqDenied.Add(1)
					if !ref.Quiet {
						rh.h.o.Report(ev)
					}
					refuse(w, r, http.StatusForbidden, ref.Reason)
					if ref.Terminate {
						rh.h.o.Terminate(ev)
					}
					return
				}
				if errors.Is(err, context.Canceled) {
					return
				}
				rh.badGateway(w, r, err)
			},
			ModifyResponse: modifyResponse,
		}
	})
	return rh.rp
}

// serveOne serves HTTP/1 on one connection until it closes, and waits
// for its handlers (an upgraded connection's included).
func serveOne(ctx context.Context, conn net.Conn, rh *requestHandler) error {
	c := newHoldEOF(conn)
	ln := &oneConnListener{c: c, done: make(chan struct{})}
	srv := &http.Server{
		Handler:           rh.wrap(),
		ReadHeaderTimeout: time.Minute,
		IdleTimeout:       5 * time.Minute,
		ConnState: func(_ net.Conn, st http.ConnState) {
			c.state(st)
			if st == http.StateClosed || st == http.StateHijacked {
				ln.close()
			}
		},
		ErrorLog: nil,
	}
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	srv.Serve(ln)
	rh.wg.Wait()
	return nil
}

// oneConnListener hands out one connection, then waits until it is done.
type oneConnListener struct {
	c     net.Conn
	taken bool
	done  chan struct{}
	once  sync.Once
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	if !l.taken {
		l.taken = true
		return l.c, nil
	}
	<-l.done
	return nil, net.ErrClosed
}

func (l *oneConnListener) close()         { l.once.Do(func() { close(l.done) }) }
func (l *oneConnListener) Close() error   { l.close(); return nil }
func (l *oneConnListener) Addr() net.Addr { return l.c.LocalAddr() }
