package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"

	"github.com/msbtap/msbtap/policy"
)

// DNSOptions configure the DNS forwarder.
type DNSOptions struct {
	// Upstreams are resolver addresses, "IP" or "IP:PORT" ("[IPv6]:PORT").
	Upstreams []string
	Replier   Replier
	// Timeout bounds one query across all upstreams (default 5 s).
	Timeout time.Duration
	// MaxInFlight caps concurrent UDP queries (default 256); excess are
	// dropped and the guest's resolver retries.
	MaxInFlight int
	// MaxUDPPayload is the largest UDP answer that fits a frame to the guest.
	MaxUDPPayload int
	// Filter, when set, sees every query before it is forwarded and every
	// answer before it is returned; see DNSFilter.
	Filter DNSFilter
	// Report is told of the filter's decisions.
	Report func(policy.Flow, policy.Decision)
	Log    *slog.Logger
}

// DNSFilter lets the policy act on name resolution. Each method returns
// the decision it made, if any, for the forwarder to report.
type DNSFilter interface {
	// Query decides a query from the guest at src. A non-nil message is
	// returned to the guest as it is (NXDOMAIN for a denied name, say)
	// instead of forwarding.
	Query(src netip.AddrPort, q *dns.Msg) (*dns.Msg, *policy.Verdict)
	// Answer inspects an upstream answer; a non-nil message replaces it.
	Answer(src netip.AddrPort, q, a *dns.Msg) (*dns.Msg, *policy.Verdict)
}

// DNS answers every query the guest sends to port 53, whatever address it
// was sent to, by forwarding it to the upstream resolvers in turn.
type DNS struct {
	o         DNSOptions
	upstreams []string
	preferred atomic.Int32 // index of the upstream that answered last
	sem       chan struct{}
	wg        sync.WaitGroup
	ctx       context.Context
	cancel    context.CancelFunc

	queries, failures, dropped atomic.Uint64
}

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

// NewDNS returns a DNS forwarder.
func NewDNS(o DNSOptions) (*DNS, error) {
	if o.Timeout <= 0 {
		o.Timeout = 5 * time.Second
	}
	if o.MaxInFlight <= 0 {
		o.MaxInFlight = 256
	}
	if o.MaxUDPPayload <= 0 {
		o.MaxUDPPayload = 1472
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	d := &DNS{o: o, sem: make(chan struct{}, o.MaxInFlight)}
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
func (d *DNS) Upstreams() []string { return d.upstreams }

// Resolve answers q: through the filter, then the upstreams (starting with
// the one that answered last and failing over in order), and SERVFAIL when
// none answers in time. It never returns nil.
func (d *DNS) Resolve(ctx context.Context, src netip.AddrPort, q *dns.Msg) *dns.Msg {
	return d.resolve(ctx, src, q, policy.UDP)
}

// resolve is Resolve for a query that came over transport (UDP or TCP), as
// the decisions report it.
func (d *DNS) resolve(ctx context.Context, src netip.AddrPort, q *dns.Msg, transport policy.Proto) *dns.Msg {
	d.queries.Add(1)
	if d.o.Filter != nil {
		m, v := d.o.Filter.Query(src, q)
		d.report(v, transport)
		if m != nil {
			return m
		}
	}
	a := d.forward(ctx, q)
	if a == nil {
		d.failures.Add(1)
		m := new(dns.Msg)
		m.SetRcode(q, dns.RcodeServerFailure)
		return m
	}
	if d.o.Filter != nil {
		m, v := d.o.Filter.Answer(src, q, a)
		d.report(v, transport)
		if m != nil {
			return m
		}
	}
	return a
}

func (d *DNS) report(v *policy.Verdict, transport policy.Proto) {
	if v != nil && d.o.Report != nil {
		v.Flow.Proto = transport
		d.o.Report(v.Flow, v.Decision)
	}
}

func (d *DNS) forward(ctx context.Context, q *dns.Msg) *dns.Msg {
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

func (d *DNS) exchange(ctx context.Context, q *dns.Msg, upstream string, timeout time.Duration) (*dns.Msg, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c := &dns.Client{Net: "udp", UDPSize: dns.DefaultMsgSize}
	a, _, err := c.ExchangeContext(ctx, q, upstream)
	if err == nil && a.Truncated {
		c = &dns.Client{Net: "tcp"}
		a, _, err = c.ExchangeContext(ctx, q, upstream)
	}
	if err != nil {
		return nil, err
	}
	if a.Id != q.Id {
		return nil, errors.New("answer id does not match the query")
	}
	return a, nil
}

// HandleUDP answers one query datagram the guest at src sent to dst:53. It
// works in its own goroutine and returns at once; malformed queries and
// queries over the in-flight cap are dropped.
func (d *DNS) HandleUDP(src, dst netip.AddrPort, payload []byte) bool {
	q := new(dns.Msg)
	if err := q.Unpack(payload); err != nil || q.Response || len(q.Question) != 1 {
		d.dropped.Add(1)
		return false
	}
	select {
	case d.sem <- struct{}{}:
	default:
		d.dropped.Add(1)
		return false
	}
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		defer func() { <-d.sem }()
		a := d.Resolve(d.ctx, src, q)
		limit := dns.MinMsgSize
		if opt := q.IsEdns0(); opt != nil && int(opt.UDPSize()) > limit {
			limit = int(opt.UDPSize())
		}
		if limit > d.o.MaxUDPPayload {
			limit = d.o.MaxUDPPayload
		}
		a.Truncate(limit)
		b, err := a.Pack()
		if err != nil {
			d.dropped.Add(1)
			return
		}
		d.o.Replier.SendUDP(dst, src, b)
	}()
	return true
}

// ServeTCP answers length-prefixed queries on a TCP connection from the
// guest at src until it closes or idles for two minutes.
func (d *DNS) ServeTCP(conn net.Conn, src netip.AddrPort) {
	defer conn.Close()
	dc := &dns.Conn{Conn: conn}
	for {
		_ = conn.SetDeadline(time.Now().Add(2 * time.Minute))
		q, err := dc.ReadMsg()
		if err != nil {
			return
		}
		if q.Response || len(q.Question) != 1 {
			d.dropped.Add(1)
			return
		}
		a := d.resolve(d.ctx, src, q, policy.TCP)
		if err := dc.WriteMsg(a); err != nil {
			return
		}
	}
}

// DNSStats are the forwarder's counters.
type DNSStats struct {
	// InFlight UDP queries are being answered now.
	InFlight int
	// Queries answered, Failures no upstream answered, queries Dropped
	// (malformed, over the in-flight cap).
	Queries, Failures, Dropped uint64
}

// Stats returns the forwarder's counters.
func (d *DNS) Stats() DNSStats {
	return DNSStats{InFlight: len(d.sem), Queries: d.queries.Load(), Failures: d.failures.Load(), Dropped: d.dropped.Load()}
}

// Close cancels queries in flight and waits for them.
func (d *DNS) Close() {
	d.cancel()
	d.wg.Wait()
}

// DefaultResolvConf is where the host's resolvers are read from.
const DefaultResolvConf = "/etc/resolv.conf"
