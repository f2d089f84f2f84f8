package agent

import (
	"context"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/internal/fielderr"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/sandbox"
	"github.com/msbtap/msbtap/upstream"
)

// upstreamRoute counts the TCP flows that left through the proxy and
// those reached directly while one is configured.
type upstreamRoute struct {
	d               *upstream.Dialer
	proxied, direct atomic.Uint64
}

// buildUpstream reads the upstream proxy's settings and credentials, before
// anything is created.
func (a *Agent) buildUpstream() error {
	if !a.cfg.Upstream.Enabled() {
		return nil
	}
	if v := a.cfg.Upstream.CredentialsEnv; v != "" {
		for _, e := range a.cfg.CommandEnv {
			if sandbox.EnvName(e) == v {
				return fielderr.Bad("env", e, "%s holds the upstream proxy's credentials, which never reach the command", v)
			}
		}
	}
	d, err := upstream.New(a.cfg.Upstream, os.LookupEnv)
	if err != nil {
		return err
	}
	a.upstream = &upstreamRoute{d: d}
	a.ctl.reg.MustRegister(a.upstream)
	a.log.Info("TCP flows leave through an upstream proxy", "proxy", d.String(), "bypass", len(a.cfg.Upstream.Bypass))
	return nil
}

// dialTCP opens the host side of an allowed TCP flow (stack.Options.Dial):
// through the upstream proxy unless there is none, the destination is the
// host itself (the gateway's addresses), or it is on the bypass list. A
// flow allowed by name is handed to a SOCKS5 or CONNECT proxy as that name,
// which the proxy resolves; the sandbox's SNI or Host is still checked
// against the policy on the first bytes.
func (a *Agent) dialTCP(ctx context.Context, fl *flow.Flow, to netip.AddrPort) (net.Conn, error) {
	f, d := fl.Flow, fl.Decision
	u := a.upstream
	if u != nil && (u.d.IsProxy(to, a.isHostAddr) || u.d.IsProxy(f.Dst, a.isHostAddr)) {
		// By the host's addresses or a bypass, too: the proxy would carry
		// the sandbox anywhere.
		a.log.Warn("flow to the upstream proxy itself refused; the sandbox gets a reset", "flow_id", f.ID,
			"src", f.Src, "dst", f.Dst, "reason", upstream.ReasonSelf)
		return nil, u.d.RefuseSelf()
	}
	var names []string
	if u != nil && to == f.Dst {
		names = a.popts.Pins.Lookup(f.Dst.Addr().Unmap())
	}
	if u == nil || to != f.Dst || u.d.Bypassed(f.Dst.Addr(), names) {
		if u != nil {
			u.direct.Add(1)
		}
		nd := net.Dialer{KeepAlive: 30 * time.Second}
		return nd.DialContext(ctx, "tcp", to.String())
	}
	name := ""
	if d.ByName {
		name = a.allowedName(f, d, names)
	}
	c, err := u.d.Dial(ctx, f.Dst, name)
	if err != nil {
		reason := "upstream_proxy"
		if ue, ok := err.(*upstream.Error); ok {
			reason = ue.Reason
		}
		a.log.Warn("upstream proxy did not carry the flow; the sandbox gets a reset", "flow_id", f.ID,
			"src", f.Src, "dst", f.Dst, "name", name, "reason", reason, "err", err)
		return nil, err
	}
	u.proxied.Add(1)
	return c, nil
}

// isHostAddr reports whether a is one of the host's own addresses (the
// gateway's included).
func (a *Agent) isHostAddr(x netip.Addr) bool { return a.popts.Host.Contains(x.Unmap()) }

// allowedName is the name, among those the destination was resolved from,
// by which the policy allowed the flow.
func (a *Agent) allowedName(f policy.Flow, d policy.Decision, names []string) string {
	e := a.holder.Load()
	for _, n := range names {
		nf := f
		nf.Domain = n
		if nd := e.Check(nf); nd.Action == policy.Allow && nd.Rule == d.Rule {
			return n
		}
	}
	return ""
}

// dialIntercepted opens a further upstream connection for an intercepted
// or proxied flow (an HTTP/1 client's second connection, say): the same
// route as the flow's first.
func (a *Agent) dialIntercepted(ctx context.Context, addr string) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || a.upstream == nil {
		var nd net.Dialer
		return nd.DialContext(ctx, "tcp", addr)
	}
	f := policy.Flow{Proto: policy.TCP, Dst: ap}
	gw := a.gwRef.Load()
	to := ap
	if gw != nil {
		to = gw.MapDst(ap)
	}
	return a.dialTCP(ctx, flow.Of(f, a.holder.Check(f)), to)
}

var (
	upstreamFailuresDesc = prometheus.NewDesc("msbtap_upstream_proxy_failures_total",
		"TCP flows the upstream proxy did not carry (the sandbox got a reset), by reason: unreachable, refused, auth, self (a flow to the proxy itself).", []string{"reason"}, nil)
	upstreamFlowsDesc = prometheus.NewDesc("msbtap_upstream_proxy_flows_total",
		"TCP flows opened with an upstream proxy configured, by route: proxy, or direct (the host, or --upstream-proxy-bypass).", []string{"route"}, nil)
)

// Describe implements prometheus.Collector.
func (u *upstreamRoute) Describe(ch chan<- *prometheus.Desc) {
	ch <- upstreamFailuresDesc
	ch <- upstreamFlowsDesc
}

// Collect implements prometheus.Collector.
func (u *upstreamRoute) Collect(ch chan<- prometheus.Metric) {
	for r, n := range u.d.Failures() {
		ch <- prometheus.MustNewConstMetric(upstreamFailuresDesc, prometheus.CounterValue, float64(n), r[len("upstream_proxy_"):])
	}
	ch <- prometheus.MustNewConstMetric(upstreamFlowsDesc, prometheus.CounterValue, float64(u.proxied.Load()), "proxy")
	ch <- prometheus.MustNewConstMetric(upstreamFlowsDesc, prometheus.CounterValue, float64(u.direct.Load()), "direct")
}
