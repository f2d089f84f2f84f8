package intercept

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/inspect"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/proxy"
)

// Mode says which TLS connections are intercepted.
type Mode int

const (
	// Off: none. Names are still checked; HTTP rules, which need to see
	// requests, refuse the connections they would decide.
	Off Mode = iota
	// Auto: those whose host needs it (an HTTP rule or a secret); the rest
	// are spliced after the name check.
	Auto
	// All: every TLS connection with a server name not bypassed.
	All
)

func (m Mode) String() string { return [...]string{"off", "auto", "all"}[m] }

// ParseMode parses off, auto or all.
func ParseMode(s string) (Mode, error) {
	switch s {
	case "off":
		return Off, nil
	case "auto":
		return Auto, nil
	case "all":
		return All, nil
	}
	return Off, fmt.Errorf("%q: want off, auto or all", s)
}

// Rewriter changes requests on their way upstream: the secrets. It must be
// safe for concurrent use.
type Rewriter interface {
	// Wants reports whether connections to host must be intercepted.
	Wants(host string) bool
	// Active reports whether it has anything to do at all.
	Active() bool
	// Request rewrites r, a request to host (TLS says whether it came
	// intercepted from TLS, or in the clear), or refuses it.
	Request(r *Request) *Refusal
}

// Refusal is why a Rewriter refused a request or a flow.
type Refusal struct {
	Reason string
	// Secret names the secret involved, if any.
	Secret string
	// Terminate asks for the sandbox to be stopped.
	Terminate bool
	// Quiet: refuse without an audit line (a secret's "block").
	Quiet bool
}

// decision is the refusal as a policy decision, for the log.
func (r *Refusal) decision() policy.Decision {
	d := policy.Decision{Action: policy.Deny, Rule: policy.RuleSecret}
	if r.Terminate {
		d.Action = policy.Terminate
	}
	return d
}

// Request is one request as a Rewriter sees it.
type Request struct {
	Host string
	TLS  bool
	// HTTP is the request itself, which the Rewriter may change (headers,
	// URL, body).
	HTTP *HTTPRequest
	// Report records what the Rewriter did (the secret, for the audit).
	Report func(secret, what string)
}

// FlowScanner, implemented by a Rewriter, looks for what may not leave
// in a flow's server name and first bytes.
type FlowScanner interface {
	ScanFlow(name string, first []byte) *Refusal
}

// Event is one decision of the handler, for the decision log and counters.
type Event struct {
	Flow *flow.Flow
	// Decision is the handler's: on the flow, or on one request.
	Decision policy.Decision
	flow.L7
}

// Options configure a Handler.
type Options struct {
	Mode Mode
	// CA issues the certificates the sandbox sees; Roots verify upstream.
	CA    *CA
	Roots *x509.CertPool
	// Bypass are names spliced whatever the mode (exact, or *.suffix).
	Bypass []string
	Policy *policy.Holder
	// Ask, if set, holds a connection whose server name the policy asks
	// about (its ClientHello unanswered, nothing sent upstream) until the
	// question is answered, and returns the decision that replaces the
	// ask. Without it an ask is a refusal.
	Ask func(ctx context.Context, f policy.Flow, d policy.Decision) policy.Decision
	// Rewriter, if any, rewrites intercepted requests.
	Rewriter Rewriter
	// Report is told of every flow decision and refused request.
	Report func(Event)
	// Terminate stops the sandbox after a fatal violation (the event,
	// already reported).
	Terminate func(Event)
	// Dial opens further upstream connections for a proxied host (an
	// HTTP/1 client may open several on one intercepted flow's behalf).
	Dial func(ctx context.Context, addr string) (net.Conn, error)
	// FirstBytes bounds how long a client has, once it started sending,
	// to say what it wants (default 5 s).
	FirstBytes time.Duration
	// MaxResponseHeaderBytes caps one response's headers, and
	// ResponseHeaderBudget those of all responses held at once (defaults
	// DefaultMaxResponseHeaderBytes, DefaultResponseHeaderBudget): past
	// either the sandbox gets a 502.
	MaxResponseHeaderBytes, ResponseHeaderBudget int64
	Log                                          *slog.Logger
}

// conn is one allowed TCP flow being served: its guest side accepted, its
// upstream (host) dialled; f's meters count what each side sends.
type conn struct {
	guest, host net.Conn
	f           *flow.Flow
}

// Handler decides, flow by flow, whether to splice, intercept or refuse.
type Handler struct {
	o Options

	spliced, intercepted, proxied, refused atomic.Uint64
	reqAllowed, reqDenied                  atomic.Uint64

	budgetOnce  sync.Once // sets hdrBudget's bound
	hdrBudget   headerBudget
	respRefused responseCounters
}

// NewHandler returns a Handler.
func NewHandler(o Options) *Handler {
	if o.FirstBytes <= 0 {
		o.FirstBytes = 5 * time.Second
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Report == nil {
		o.Report = func(Event) {}
	}
	if o.Terminate == nil {
		o.Terminate = func(Event) {}
	}
	if o.Dial == nil {
		var d net.Dialer
		o.Dial = func(ctx context.Context, addr string) (net.Conn, error) { return d.DialContext(ctx, "tcp", addr) }
	}
	return &Handler{o: o}
}

// Stats are the handler's counters: flows by mode, requests by decision.
type Stats struct {
	Spliced, Intercepted, Proxied, Refused uint64
	RequestsAllowed, RequestsDenied        uint64
}

// Stats returns the counters.
func (h *Handler) Stats() Stats {
	return Stats{h.spliced.Load(), h.intercepted.Load(), h.proxied.Load(), h.refused.Load(), h.reqAllowed.Load(), h.reqDenied.Load()}
}

// Wants reports whether flow fl needs its first bytes looked at; the
// others are relayed as they are.
func (h *Handler) Wants(fl *flow.Flow) bool {
	if fl.Decision.ByName || h.o.Mode == All || h.o.Policy.Load().ReadsNames(fl.Flow) {
		return true
	}
	if h.o.Mode == Auto {
		return h.o.Policy.Load().HasHTTPRules() || (h.o.Rewriter != nil && h.o.Rewriter.Active())
	}
	return false
}

// Bypassed reports whether name is on the bypass list.
func (h *Handler) Bypassed(name string) bool { return MatchesAny(h.o.Bypass, name) }

// MatchesAny reports whether name matches one of patterns: exact names, or
// "*.suffix" for every name under suffix. Both sides are compared in the
// normal form of policy.NormalizeName (an IDN pattern matches its A-label).
func MatchesAny(patterns []string, name string) bool {
	name = normalOrLower(name)
	for _, p := range patterns {
		if suf, ok := strings.CutPrefix(p, "*."); ok {
			if strings.HasSuffix(name, "."+normalOrLower(suf)) {
				return true
			}
		} else if name == normalOrLower(p) {
			return true
		}
	}
	return false
}

// normalOrLower is a name's normal form, or, for what is no host name,
// the name lower-cased (it can then only match the same bytes).
func normalOrLower(s string) string {
	if n, err := policy.NormalizeName(s); err == nil {
		return n
	}
	return strings.ToLower(strings.TrimSuffix(s, "."))
}

// Handle serves one flow to its end. The bytes from upstream reach the
// sandbox from the start (a server may speak first); the sandbox's own go
// nowhere until its first bytes have been looked at.
func (h *Handler) Handle(ctx context.Context, f *flow.Flow, guest, host net.Conn) error {
	fl := conn{guest: guest, host: host, f: f}
	down := startDown(fl.host, fl.guest, &fl.f.Down)
	// A client may wait as long as it likes before its first byte; once it
	// has started, it has FirstBytes to say what it wants.
	peeked, hello, err := inspect.Peek(ctx, fl.guest, h.o.FirstBytes)
	if err != nil {
		if errors.Is(err, inspect.ErrTooLong) || len(peeked) > 0 {
			h.refuse(fl, down, inspect.Hello{}, fl.f.Decision, "first bytes: "+err.Error())
			return err
		}
		// The client closed (or ctx ended) before sending anything: let
		// the relay pass the end on.
		down.stop()
		_, _, rerr := proxy.Relay(down.guestAfter(fl.guest, nil), fl.host, &fl.f.Up, &fl.f.Down)
		return rerr
	}
	d := fl.f.Decision
	// Domain deny rules hold whatever the address: a flow the addresses
	// allowed is still refused for the name it asks for.
	denyCheck := !d.ByName && !d.PerRequest && h.o.Policy.Load().ReadsNames(fl.f.Flow)
	if sc, ok := h.o.Rewriter.(FlowScanner); ok && h.o.Rewriter.Active() {
		name := strings.Join(hello.Names, ",")
		first := peeked
		if hello.Kind == inspect.HTTP {
			first = nil // proxied: every request is checked on its own
		}
		if ref := sc.ScanFlow(name, first); ref != nil {
			h.refuseAs(fl, down, hello, ref.decision(), ref.Reason, ref.Secret)
			return nil
		}
	}
	switch hello.Kind {
	case inspect.Other:
		if d.PerRequest {
			// The rule allows some HTTP requests, and this is none.
			h.refuse(fl, down, hello, d, "not an HTTP request or a TLS ClientHello, and HTTP rules decide this flow")
			return nil
		}
		// Other protocols (SSH, a database's) are decided by the address
		// (the DNS pin) alone: nothing in them names an HTTP host.
		return h.splice(fl, down, peeked, hello, d)
	case inspect.H2C:
		if !d.ByName && !d.PerRequest && !denyCheck && !h.rewriterWantsClear() {
			return h.splice(fl, down, peeked, hello, d)
		}
		if !down.stop() {
			// The server spoke first: no HTTP/2 server, nothing msbtap
			// could stand in for.
			h.refuse(fl, down, hello, d, "cleartext HTTP/2 to a server that spoke first")
			return nil
		}
		// Every stream's :authority is checked on its own.
		h.proxied.Add(1)
		h.report(fl, hello, d, "proxied", "")
		return h.serveH2C(ctx, fl, peeked)
	case inspect.HTTP:
		if !d.ByName && !d.PerRequest && !denyCheck && !h.rewriterWantsClear() {
			return h.splice(fl, down, peeked, hello, d)
		}
		if len(hello.Names) == 0 && (d.ByName || d.PerRequest) {
			h.refuse(fl, down, hello, d, "HTTP request without a host")
			return nil
		}
		// Plain HTTP to a host allowed by name goes through the proxy,
		// which checks every request's host, not only the first.
		for _, n := range hello.Names {
			nd := h.o.Policy.Load().CheckRequest(withDomain(fl.f.Flow, n), hello.Method, hello.Path)
			if nd.Action != policy.Allow {
				h.refuse(fl, down, hello, nd, "host "+n+" is not allowed")
				return nil
			}
		}
		if !down.stop() {
			return h.splice(fl, down, peeked, hello, d)
		}
		h.proxied.Add(1)
		h.report(fl, hello, d, "proxied", "")
		first := ""
		if len(hello.Names) > 0 {
			first = hello.Names[0]
		}
		return h.serveHTTP(ctx, fl, peeked, first, nil)
	}
	// TLS.
	sni := ""
	if len(hello.Names) > 0 {
		sni = hello.Names[0]
	}
	if d.ByName || d.PerRequest {
		switch {
		case sni == "":
			h.refuse(fl, down, hello, d, "TLS without a server name")
			return nil
		case hello.ECH:
			h.refuse(fl, down, hello, d, "TLS with encrypted client hello: the server name cannot be checked")
			return nil
		}
		d = h.o.Policy.Load().Check(withDomain(fl.f.Flow, sni))
		if d.Action == policy.Ask && h.o.Ask != nil {
			d = h.o.Ask(ctx, withDomain(fl.f.Flow, sni), d)
		}
		if d.Action != policy.Allow {
			h.refuse(fl, down, hello, d, "server name "+sni+" is not allowed")
			return nil
		}
	} else if denyCheck {
		switch {
		case hello.ECH:
			h.refuse(fl, down, hello, d, "TLS with encrypted client hello: the server name cannot be checked against the domain rules")
			return nil
		case sni != "":
			nd := h.o.Policy.Load().Check(withDomain(fl.f.Flow, sni))
			if nd.Action == policy.Ask && h.o.Ask != nil {
				nd = h.o.Ask(ctx, withDomain(fl.f.Flow, sni), nd)
			}
			if nd.Action != policy.Allow {
				h.refuse(fl, down, hello, nd, "server name "+sni+" is not allowed")
				return nil
			}
		}
	}
	wantsIntercept := sni != "" && !hello.ECH && (h.o.Mode == All || d.PerRequest || (h.o.Rewriter != nil && h.o.Rewriter.Wants(sni)))
	switch {
	case !wantsIntercept:
		return h.splice(fl, down, peeked, hello, d)
	case h.o.Mode == Off || h.Bypassed(sni):
		if d.PerRequest {
			h.refuse(fl, down, hello, d, "HTTP rules decide "+sni+" but its TLS is not intercepted (--tls-intercept off or --tls-bypass)")
			return nil
		}
		return h.splice(fl, down, peeked, hello, d)
	case !down.stop():
		// The server spoke first: this is no TLS client we can stand in
		// for.
		return h.splice(fl, down, peeked, hello, d)
	}
	h.intercepted.Add(1)
	return h.serveTLS(ctx, fl, peeked, hello, d)
}

func (h *Handler) rewriterWantsClear() bool { return h.o.Rewriter != nil && h.o.Rewriter.Active() }

func withDomain(f policy.Flow, name string) policy.Flow {
	f.Domain = name
	return f
}

func (h *Handler) report(fl conn, hello inspect.Hello, d policy.Decision, mode, reason string) Event {
	return h.reportSecret(fl, hello, d, mode, reason, "")
}

func (h *Handler) reportSecret(fl conn, hello inspect.Hello, d policy.Decision, mode, reason, secret string) Event {
	ev := Event{Flow: fl.f, Decision: d, L7: flow.L7{Mode: mode, Reason: reason, Secret: secret}}
	switch hello.Kind {
	case inspect.TLS:
		if len(hello.Names) > 0 {
			ev.SNI = hello.Names[0]
		}
		ev.ALPN = strings.Join(hello.ALPN, ",")
	case inspect.HTTP:
		ev.Method, ev.Path = hello.Method, hello.Path
		ev.Host = strings.Join(hello.Names, ",")
	}
	h.o.Report(ev)
	return ev
}

// splice relays the flow as it is, the peeked bytes first.
func (h *Handler) splice(fl conn, down *downCopier, peeked []byte, hello inspect.Hello, d policy.Decision) error {
	down.stop()
	h.spliced.Add(1)
	if hello.Kind == inspect.TLS || fl.f.Decision.ByName {
		h.report(fl, hello, d, "spliced", "")
	}
	_, _, err := proxy.Relay(down.guestAfter(fl.guest, peeked), fl.host, &fl.f.Up, &fl.f.Down)
	return err
}

// refuse resets both ends and reports d (a terminate stops the sandbox).
func (h *Handler) refuse(fl conn, down *downCopier, hello inspect.Hello, d policy.Decision, reason string) {
	h.refuseAs(fl, down, hello, d, reason, "")
}

func (h *Handler) refuseAs(fl conn, down *downCopier, hello inspect.Hello, d policy.Decision, reason, secret string) {
	if d.Action == policy.Allow {
		d.Action = policy.Deny // allowed by rule, refused for what it sent
	}
	h.refused.Add(1)
	ev := h.reportSecret(fl, hello, d, "refused", reason, secret)
	proxy.ResetConn(fl.guest)
	proxy.ResetConn(fl.host)
	down.stop()
	h.o.Log.Info("flow refused", "flow_id", fl.f.Flow.ID, "dst", fl.f.Flow.Dst, "reason", reason)
	if d.Action == policy.Terminate {
		h.o.Terminate(ev)
	}
}

// downCopier copies upstream to the sandbox while the sandbox's first
// bytes are looked at, until stopped. An upstream that ends passes its end
// on (FIN as FIN, a reset as a reset).
type downCopier struct {
	up      net.Conn
	copied  atomic.Int64
	stopped atomic.Bool
	eof     atomic.Bool // the upstream's FIN was passed on
	done    chan struct{}
	once    sync.Once
}

func startDown(up, guest net.Conn, m *flow.Meter) *downCopier {
	d := &downCopier{up: up, done: make(chan struct{})}
	go func() {
		defer close(d.done)
		buf := make([]byte, 16<<10)
		for {
			n, err := up.Read(buf)
			if n > 0 {
				if m != nil {
					m.Shaper.Wait(context.Background(), n)
				}
				w, werr := guest.Write(buf[:n])
				d.copied.Add(int64(w))
				if m != nil {
					m.Bytes.Add(uint64(w))
				}
				if werr != nil {
					proxy.ResetConn(up)
					return
				}
			}
			switch {
			case err == nil:
			case d.stopped.Load():
				return
			case errors.Is(err, io.EOF):
				if hc, ok := guest.(interface{ CloseWrite() error }); ok {
					hc.CloseWrite()
				}
				d.eof.Store(true)
				return
			default:
				proxy.ResetConn(guest)
				return
			}
		}
	}()
	return d
}

// stop ends the copying; it reports whether nothing was copied.
func (d *downCopier) stop() bool {
	d.once.Do(func() {
		d.stopped.Store(true)
		d.up.SetReadDeadline(time.Unix(1, 0))
		<-d.done
		d.up.SetReadDeadline(time.Time{})
	})
	return d.copied.Load() == 0
}

// guestAfter is the guest connection for the relay that follows: the
// peeked bytes first, and no second FIN if the copier passed one on.
func (d *downCopier) guestAfter(guest net.Conn, peeked []byte) net.Conn {
	c := proxy.WrapConn(guest, peeked, nil, nil)
	if d.eof.Load() {
		return finSent{c}
	}
	return c
}

type finSent struct{ net.Conn }

func (finSent) CloseWrite() error { return nil }
func (f finSent) Reset()          { proxy.ResetConn(f.Conn) }
