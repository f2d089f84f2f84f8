// Package dnsproxy is the sandbox's DNS server: it answers every query the
// guest sends to port 53 (over UDP and TCP), through the policy's filter,
// from its answer cache or from the upstream resolvers it forwards to.
package dnsproxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/time/rate"

	"github.com/msbtap/msbtap/internal/sockopt"
	"github.com/msbtap/msbtap/policy"
)

// Replier delivers the answers to the guest, outside the netstack.
// Implementations copy payload before returning.
type Replier interface {
	// SendUDP delivers a datagram from src to the guest address dst.
	SendUDP(src, dst netip.AddrPort, payload []byte) bool
}

// Options configure the DNS forwarder.
type Options struct {
	// Upstreams are resolver addresses, "IP" or "IP:PORT" ("[IPv6]:PORT").
	Upstreams []string
	Replier   Replier
	// Timeout bounds one query across all upstreams (default 5 s).
	Timeout time.Duration
	// MaxInFlight caps queries being answered at once, over UDP and TCP
	// together (default 256); excess UDP queries are dropped (the guest's
	// resolver retries), excess TCP ones wait.
	MaxInFlight int
	// MaxTCPConns caps concurrent DNS-over-TCP connections (default 16);
	// TCPIdleTimeout ends one that carries no query for that long (default
	// 10 s); MaxTCPQueries closes one after that many queries (default 100).
	MaxTCPConns    int
	TCPIdleTimeout time.Duration
	MaxTCPQueries  int
	// MaxUDPPayload is the largest UDP answer that fits a frame to the guest.
	MaxUDPPayload int
	// CacheSize bounds the answer cache in entries (default 4096; negative
	// turns it off). Answers are kept for their TTL, at most 5 minutes.
	CacheSize int
	// UpstreamRate bounds the queries sent upstream per second (default
	// 1000, with bursts of a fifth of that): a flood of new names is
	// dropped cheaply past it, and cached names are answered regardless.
	UpstreamRate float64
	// Filter, when set, sees every query before it is forwarded and every
	// answer before it is returned; see Filter.
	Filter Filter
	// Holds, if set, says which queries the filter may hold (an ask
	// waiting for its answer): those are never answered from the cache
	// on the caller's path, always in a goroutine of their own.
	Holds func(src netip.AddrPort, q *dns.Msg) bool
	// Report is told of the filter's decisions.
	Report func(policy.Flow, policy.Decision)
	Log    *slog.Logger
}

// Filter lets the policy act on name resolution. Each method returns
// the decision it made, if any, for the forwarder to report.
type Filter interface {
	// Query decides a query from the guest at src. A non-nil message is
	// returned to the guest as it is (NXDOMAIN for a denied name, say)
	// instead of forwarding.
	Query(src netip.AddrPort, q *dns.Msg) (*dns.Msg, *policy.Verdict)
	// Answer inspects an upstream answer; a non-nil message replaces it.
	Answer(src netip.AddrPort, q, a *dns.Msg) (*dns.Msg, *policy.Verdict)
}

// Server answers every query the guest sends to port 53, whatever address it
// was sent to. The guest's message never leaves as it is: each query goes
// upstream as a fresh message of the agent's own making (random ID, opcode
// QUERY, class IN, a type from a known list, a minimal OPT), the answer
// must match its question, and the guest gets it back under its own ID and
// question.
type Server struct {
	o         Options
	upstreams []string
	preferred atomic.Int32 // index of the upstream that answered last
	sem       chan struct{}
	cache     *dnsCache
	upRate    *rate.Limiter
	tcpConns  atomic.Int32
	ctx       context.Context
	cancel    context.CancelFunc

	mu     sync.Mutex // mu protects closed and wg.Add
	closed bool
	wg     sync.WaitGroup

	queries, failures, dropped, refused, tcpOverCap, cacheHits, rateLimited atomic.Uint64
}

// forwardedTypes are the query types sent upstream; others (ANY, AXFR,
// IXFR, and everything obscure) are answered NOTIMP.
var forwardedTypes = map[uint16]bool{
	dns.TypeA: true, dns.TypeAAAA: true, dns.TypeCNAME: true, dns.TypeMX: true, dns.TypeTXT: true,
	dns.TypeNS: true, dns.TypeSOA: true, dns.TypePTR: true, dns.TypeSRV: true, dns.TypeHTTPS: true,
	dns.TypeSVCB: true, dns.TypeCAA: true, dns.TypeNAPTR: true, dns.TypeDS: true, dns.TypeDNSKEY: true,
	dns.TypeTLSA: true, dns.TypeSSHFP: true,
}

// upstreamEDNSSize is the UDP payload size the agent offers upstream (the
// DNS flag day 2020 value).
const upstreamEDNSSize = 1232

// ParseUpstream normalises "IP" or "IP:PORT" to "IP:PORT".
func ParseUpstream(s string) (string, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap.String(), nil
	}
	if a, err := netip.ParseAddr(s); err == nil {
		return netip.AddrPortFrom(a.Unmap(), 53).String(), nil
	}
	return "", fmt.Errorf("%q is not IP or IP:PORT (IPv6 with a port goes in brackets: [2001:db8::1]:53)", s)
}

// HostUpstreams reads the host's resolvers from a resolv.conf file. A
// missing or empty file gives no upstreams, not an error.
func HostUpstreams(path string) []string {
	cfg, err := dns.ClientConfigFromFile(path)
	if err != nil || cfg == nil {
		return nil
	}
	var out []string
	for _, s := range cfg.Servers {
		if u, err := ParseUpstream(s); err == nil {
			out = append(out, u)
		} else if u, err := ParseUpstream(net.JoinHostPort(s, cfg.Port)); err == nil {
			out = append(out, u)
		}
	}
	return out
}

// New returns a DNS server and forwarder.
func New(o Options) (*Server, error) {
	if o.Timeout <= 0 {
		o.Timeout = 5 * time.Second
	}
	if o.MaxInFlight <= 0 {
		o.MaxInFlight = 256
	}
	if o.MaxTCPConns <= 0 {
		o.MaxTCPConns = 16
	}
	if o.TCPIdleTimeout <= 0 {
		o.TCPIdleTimeout = 10 * time.Second
	}
	if o.MaxTCPQueries <= 0 {
		o.MaxTCPQueries = 100
	}
	if o.MaxUDPPayload <= 0 {
		o.MaxUDPPayload = 1472
	}
	if o.UpstreamRate <= 0 {
		o.UpstreamRate = 1000
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	d := &Server{o: o, sem: make(chan struct{}, o.MaxInFlight), cache: newDNSCache(o.CacheSize),
		upRate: rate.NewLimiter(rate.Limit(o.UpstreamRate), max(1, int(o.UpstreamRate/5)))}
	for _, u := range o.Upstreams {
		p, err := ParseUpstream(u)
		if err != nil {
			return nil, fmt.Errorf("dns_upstream: %w", err)
		}
		d.upstreams = append(d.upstreams, p)
	}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	return d, nil
}

// Upstreams returns the resolvers in use.
func (d *Server) Upstreams() []string { return d.upstreams }

// Resolve answers q: through the filter, then the upstreams (starting with
// the one that answered last and failing over in order), and SERVFAIL when
// none answers in time. It never returns nil.
func (d *Server) Resolve(ctx context.Context, src netip.AddrPort, q *dns.Msg) *dns.Msg {
	return d.resolve(ctx, src, q, policy.UDP)
}

// resolve is Resolve for a query that came over transport (UDP or TCP), as
// the decisions report it.
func (d *Server) resolve(ctx context.Context, src netip.AddrPort, q *dns.Msg, transport policy.Proto) *dns.Msg {
	up, done := d.prepare(src, q, transport)
	if done != nil {
		return done
	}
	if a := d.fromCache(src, q, up, transport); a != nil {
		return a
	}
	return d.fromUpstream(ctx, src, q, up, transport)
}

// prepare checks a query: refused, or decided by the filter (done), or the
// message to send upstream.
func (d *Server) prepare(src netip.AddrPort, q *dns.Msg, transport policy.Proto) (up, done *dns.Msg) {
	d.queries.Add(1)
	if len(q.Question) != 1 {
		d.refused.Add(1)
		return nil, reply(q, dns.RcodeFormatError)
	}
	if _, err := policy.NormalizeQuery(q.Question[0].Name); err != nil {
		// No host has such a name (a NUL, an escaped dot, an empty label).
		d.refused.Add(1)
		d.report(&policy.Verdict{Flow: policy.Flow{Proto: policy.UDP, Src: src, Dst: netip.AddrPortFrom(netip.Addr{}, 53), DNS: true},
			Decision: policy.Decision{Action: policy.Deny, Rule: policy.RuleBadName}}, transport)
		return nil, reply(q, dns.RcodeNameError)
	}
	up, rcode := upstreamQuery(q)
	if up == nil {
		d.refused.Add(1)
		return nil, reply(q, rcode)
	}
	if d.o.Filter != nil {
		m, v := d.o.Filter.Query(src, q)
		d.report(v, transport)
		if m != nil {
			return nil, m
		}
	}
	return up, nil
}

// fromCache answers a prepared query from the cache, or returns nil.
func (d *Server) fromCache(src netip.AddrPort, q, up *dns.Msg, transport policy.Proto) *dns.Msg {
	a := d.cache.get(up)
	if a == nil {
		return nil
	}
	d.cacheHits.Add(1)
	return d.toGuest(src, q, a, transport)
}

// fromUpstream answers a prepared query from the upstreams.
func (d *Server) fromUpstream(ctx context.Context, src netip.AddrPort, q, up *dns.Msg, transport policy.Proto) *dns.Msg {
	a := d.forward(ctx, up)
	if a == nil {
		d.failures.Add(1)
		return reply(q, dns.RcodeServerFailure)
	}
	d.cache.put(up, a)
	return d.toGuest(src, q, a, transport)
}

// toGuest passes an answer through the filter and readies it for the guest.
func (d *Server) toGuest(src netip.AddrPort, q, a *dns.Msg, transport policy.Proto) *dns.Msg {
	if d.o.Filter != nil {
		m, v := d.o.Filter.Answer(src, q, a)
		d.report(v, transport)
		if m != nil {
			a = m
		}
	}
	return toGuest(q, a)
}

func (d *Server) report(v *policy.Verdict, transport policy.Proto) {
	if v != nil && d.o.Report != nil {
		v.Flow.Proto = transport
		d.o.Report(v.Flow, v.Decision)
	}
}

func reply(q *dns.Msg, rcode int) *dns.Msg {
	m := new(dns.Msg)
	m.SetRcode(q, rcode)
	m.RecursionAvailable = true
	return m
}

// upstreamQuery builds the message sent upstream for the guest's query, or
// says with which rcode to refuse it.
func upstreamQuery(q *dns.Msg) (*dns.Msg, int) {
	if q.Opcode != dns.OpcodeQuery {
		return nil, dns.RcodeNotImplemented
	}
	qq := q.Question[0]
	if qq.Qclass != dns.ClassINET || !forwardedTypes[qq.Qtype] {
		return nil, dns.RcodeNotImplemented
	}
	// Nothing of the guest's choosing but the name and type goes upstream:
	// the name in lower case (the letter case a client picks, 0x20 style,
	// would be a channel to whoever watches the resolver), and the agent's
	// own flags, the same for every query: recursion desired, checking
	// enabled (the upstream validates), DNSSEC records wanted (DO), which
	// toGuest removes again for a guest that did not ask for them.
	m := new(dns.Msg)
	m.Id = dns.Id()
	m.RecursionDesired = true
	m.Question = []dns.Question{{Name: strings.ToLower(qq.Name), Qtype: qq.Qtype, Qclass: dns.ClassINET}}
	m.SetEdns0(upstreamEDNSSize, true)
	return m, 0
}

// toGuest turns the upstream answer into the guest's: its own ID, question
// and CD bit, the question's letter case on the records owned by that
// name (resolvers that set random case, 0x20 style, check it), DNSSEC
// records and the AD bit only if it asked for them (DO, or AD), and an OPT
// record only if it sent one, with no options of the upstream's.
func toGuest(q, a *dns.Msg) *dns.Msg {
	a.Id = q.Id
	a.Question = q.Question
	a.CheckingDisabled = q.CheckingDisabled
	qopt := q.IsEdns0()
	dnssec := qopt != nil && qopt.Do()
	if !dnssec && !q.AuthenticatedData {
		a.AuthenticatedData = false
	}
	name := q.Question[0].Name
	keep := func(rrs []dns.RR) []dns.RR {
		out := rrs[:0]
		for _, rr := range rrs {
			h := rr.Header()
			switch h.Rrtype {
			case dns.TypeOPT:
				continue
			case dns.TypeRRSIG, dns.TypeNSEC, dns.TypeNSEC3:
				if !dnssec {
					continue
				}
			}
			if strings.EqualFold(h.Name, name) {
				h.Name = name
			}
			out = append(out, rr)
		}
		return out
	}
	a.Answer, a.Ns, a.Extra = keep(a.Answer), keep(a.Ns), keep(a.Extra)
	if qopt != nil {
		a.SetEdns0(qopt.UDPSize(), dnssec)
	}
	return a
}

func (d *Server) forward(ctx context.Context, q *dns.Msg) *dns.Msg {
	n := len(d.upstreams)
	if n == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, d.o.Timeout)
	defer cancel()
	start := int(d.preferred.Load())
	for i := 0; i < n; i++ {
		idx := (start + i) % n
		// Give each remaining upstream a fair share of the time left, but
		// at least a second, so one dead resolver cannot eat the budget.
		dl, _ := ctx.Deadline()
		share := time.Until(dl) / time.Duration(n-i)
		if share < time.Second {
			share = time.Until(dl)
		}
		if share <= 0 {
			return nil
		}
		a, err := d.exchange(ctx, q, d.upstreams[idx], share)
		if err != nil {
			d.o.Log.Debug("dns upstream failed", "upstream", d.upstreams[idx], "err", err)
			continue
		}
		if a.Rcode == dns.RcodeServerFailure || a.Rcode == dns.RcodeRefused {
			// Another resolver may do better; keep this answer as a fallback.
			if i == n-1 {
				return a
			}
			continue
		}
		d.preferred.Store(int32(idx))
		return a
	}
	return nil
}

func (d *Server) exchange(ctx context.Context, q *dns.Msg, upstream string, timeout time.Duration) (*dns.Msg, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c := &dns.Client{Net: "udp", UDPSize: upstreamEDNSSize, Dialer: sockopt.Dialer}
	a, _, err := c.ExchangeContext(ctx, q, upstream)
	if err == nil && a.Truncated {
		c = &dns.Client{Net: "tcp"}
		a, _, err = c.ExchangeContext(ctx, q, upstream)
	}
	if err != nil {
		return nil, err
	}
	if a.Id != q.Id || !a.Response {
		return nil, errors.New("answer id does not match the query")
	}
	if len(a.Question) != 1 || !strings.EqualFold(a.Question[0].Name, q.Question[0].Name) ||
		a.Question[0].Qtype != q.Question[0].Qtype || a.Question[0].Qclass != q.Question[0].Qclass {
		return nil, errors.New("answer question does not match the query")
	}
	return a, nil
}

// start runs f in a goroutine the forwarder waits for on Close; it reports
// false (and runs nothing) once the forwarder is closed.
func (d *Server) start(f func()) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return false
	}
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		f()
	}()
	return true
}

// HandleUDP answers one query datagram the guest at src sent to dst:53. A
// query refused by policy, or answered from the cache, is answered at once
// (so that during a flood of new names, known ones still are); any other
// goes upstream in a goroutine of its own, and HandleUDP returns at once.
// Malformed queries and queries over the in-flight cap are dropped; a
// query with more questions than one (or none) gets FORMERR.
func (d *Server) HandleUDP(src, dst netip.AddrPort, payload []byte) bool {
	q := new(dns.Msg)
	if err := q.Unpack(payload); err != nil || q.Response {
		d.dropped.Add(1)
		return false
	}
	send := func(a *dns.Msg) {
		limit := dns.MinMsgSize
		if opt := q.IsEdns0(); opt != nil && int(opt.UDPSize()) > limit {
			limit = int(opt.UDPSize())
		}
		a.Truncate(min(limit, d.o.MaxUDPPayload))
		b, err := a.Pack()
		if err != nil {
			d.dropped.Add(1)
			return
		}
		d.o.Replier.SendUDP(dst, src, b)
	}
	if len(q.Question) != 1 {
		// A forwarder that checks only the first of several questions is
		// a known bypass: a message of more (or none) is malformed.
		d.refused.Add(1)
		send(reply(q, dns.RcodeFormatError))
		return true
	}
	if d.cache.has(q) && (d.o.Holds == nil || !d.o.Holds(src, q)) {
		// Known answers cost no upstream round trip: answered here, ahead
		// of any flood of new names.
		up, done := d.prepare(src, q, policy.UDP)
		if done == nil {
			done = d.fromCache(src, q, up, policy.UDP)
		}
		if done != nil {
			send(done)
			return true
		}
	}
	// Past the upstream rate or the in-flight cap a query is dropped
	// before it costs anything more (the guest's resolver retries).
	if !d.upRate.Allow() {
		d.rateLimited.Add(1)
		return false
	}
	select {
	case d.sem <- struct{}{}:
	default:
		d.dropped.Add(1)
		return false
	}
	ok := d.start(func() {
		defer func() { <-d.sem }()
		up, done := d.prepare(src, q, policy.UDP)
		if done == nil {
			done = d.fromCache(src, q, up, policy.UDP)
		}
		if done == nil {
			done = d.fromUpstream(d.ctx, src, q, up, policy.UDP)
		}
		send(done)
	})
	if !ok {
		<-d.sem
	}
	return ok
}

// TryTCP takes one of the DNS-over-TCP connection slots; ok false means
// the cap is reached and the connection is to be refused. release gives the
// slot back.
func (d *Server) TryTCP() (release func(), ok bool) {
	if d.tcpConns.Add(1) > int32(d.o.MaxTCPConns) {
		d.tcpConns.Add(-1)
		d.tcpOverCap.Add(1)
		return nil, false
	}
	return func() { d.tcpConns.Add(-1) }, true
}

// ServeTCP answers length-prefixed queries on a TCP connection from the
// guest at src, one at a time, until it closes, idles for TCPIdleTimeout,
// or has asked MaxTCPQueries. The caller holds a slot from TryTCP.
func (d *Server) ServeTCP(conn net.Conn, src netip.AddrPort) {
	defer conn.Close()
	dc := &dns.Conn{Conn: conn}
	for n := 0; n < d.o.MaxTCPQueries; n++ {
		_ = conn.SetDeadline(time.Now().Add(d.o.TCPIdleTimeout))
		q, err := dc.ReadMsg()
		if err != nil {
			return
		}
		if q.Response {
			d.dropped.Add(1)
			return
		}
		if len(q.Question) != 1 {
			d.refused.Add(1)
			if err := dc.WriteMsg(reply(q, dns.RcodeFormatError)); err != nil {
				return
			}
			continue
		}
		select {
		case d.sem <- struct{}{}:
		case <-d.ctx.Done():
			return
		}
		a := d.resolve(d.ctx, src, q, policy.TCP)
		<-d.sem
		if err := dc.WriteMsg(a); err != nil {
			return
		}
	}
}

// Stats are the forwarder's counters.
type Stats struct {
	// InFlight queries are being answered now; TCPConns connections open.
	InFlight, TCPConns int
	// Queries answered, Failures no upstream answered, queries Dropped
	// (malformed, over the in-flight cap), Refused (opcode, class or type
	// not forwarded, not exactly one question, a name no host has), TCP connections refused over the cap, answers from
	// the cache, queries dropped over the upstream rate.
	Queries, Failures, Dropped, Refused, TCPOverCap, CacheHits, RateLimited uint64
	// Cached answers now.
	Cached int
}

// Stats returns the forwarder's counters.
func (d *Server) Stats() Stats {
	return Stats{InFlight: len(d.sem), TCPConns: int(d.tcpConns.Load()), Queries: d.queries.Load(),
		Failures: d.failures.Load(), Dropped: d.dropped.Load(), Refused: d.refused.Load(), TCPOverCap: d.tcpOverCap.Load(),
		CacheHits: d.cacheHits.Load(), Cached: d.cache.len(), RateLimited: d.rateLimited.Load()}
}

// Close cancels queries in flight and waits for them; queries that arrive
// afterwards are dropped.
func (d *Server) Close() {
	d.mu.Lock()
	d.closed = true
	d.mu.Unlock()
	d.cancel()
	d.wg.Wait()
	d.cache.close()
}

// DefaultResolvConf is where the host's resolvers are read from.
const DefaultResolvConf = "/etc/resolv.conf"
