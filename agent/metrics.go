package agent

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/msbtap/msbtap/audit"
	"github.com/msbtap/msbtap/intercept"
	"github.com/msbtap/msbtap/internal/fielderr"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/publish"
	"github.com/msbtap/msbtap/rings"
	"github.com/msbtap/msbtap/secrets"
	"github.com/msbtap/msbtap/stack"
)

// collector exports the agent's counters at scrape time, so the packet path
// only ever touches its own atomics.
type collector struct {
	sh     *rings.Shared
	st     *stack.Stack
	pub    *publish.Ports // nil without published ports
	audit  *audit.Log
	counts *decisionCounts
	l7     *intercept.Handler
	sec    *secrets.Store // nil without secrets

	l7Flows, requests, respRefused, secretSubs, secretViols,
	bytes, frames, drops, flowsActive, flowsTotal, decisions, auditDrops, failures, wakes *prometheus.Desc
}

func newCollector(sh *rings.Shared, st *stack.Stack, pub *publish.Ports, alog *audit.Log, counts *decisionCounts, l7 *intercept.Handler, sec *secrets.Store) *collector {
	return &collector{
		l7:          l7,
		sec:         sec,
		secretSubs:  prometheus.NewDesc("msbtap_secret_substitutions_total", "Requests a secret's value was injected into, by secret name.", []string{"secret"}, nil),
		secretViols: prometheus.NewDesc("msbtap_secret_violations_total", "Placeholders found where their secret may not go, by secret name.", []string{"secret"}, nil),
		l7Flows:     prometheus.NewDesc("msbtap_inspected_flows_total", "TCP flows whose first bytes were looked at, by what became of them: spliced (relayed as they are after the name check), intercepted (TLS terminated by msbtap), proxied (plain HTTP, request by request) or refused.", []string{"mode"}, nil),
		requests:    prometheus.NewDesc("msbtap_http_requests_total", "Requests on intercepted or proxied connections, by decision.", []string{"decision"}, nil),
		respRefused: prometheus.NewDesc("msbtap_http_responses_refused_total", "Upstream responses the sandbox got a 502 for instead, by reason: header_too_large (one response's headers past the cap), header_budget (all responses held past the total), encoding (a secret's host sent a body msbtap cannot decode), too_many_1xx.", []string{"reason"}, nil),
		counts:      counts,
		sh:          sh,
		st:          st,
		pub:         pub,
		audit:       alog,
		wakes:       prometheus.NewDesc("msbtap_wakes_total", "Wake calls on a ring (kind=wake) and the consumer wake-ups they cost (kind=wakeup); the difference is what coalescing saved.", []string{"ring", "kind"}, nil),
		failures:    prometheus.NewDesc("msbtap_flow_failures_total", "Flows or datagrams the gateway could not relay, by reason.", []string{"reason"}, nil),
		auditDrops:  prometheus.NewDesc("msbtap_audit_dropped_total", "Decisions not logged because one window held too many distinct ones (terminations and first denies never are).", nil, nil),
		bytes:       prometheus.NewDesc("msbtap_bytes_total", "Bytes at the guest boundary; direction tx = sent by the guest, rx = delivered to it.", []string{"direction"}, nil),
		frames:      prometheus.NewDesc("msbtap_frames_total", "Frames at the guest boundary; direction tx = sent by the guest, rx = delivered to it.", []string{"direction"}, nil),
		drops:       prometheus.NewDesc("msbtap_drops_total", "Frames dropped, by reason.", []string{"reason"}, nil),
		flowsActive: prometheus.NewDesc("msbtap_flows_active", "Flows open now, by protocol.", []string{"proto"}, nil),
		flowsTotal:  prometheus.NewDesc("msbtap_flows_total", "Flows relayed since start, by protocol.", []string{"proto"}, nil),
		decisions:   prometheus.NewDesc("msbtap_decisions_total", "Policy decisions on new flows, by action.", []string{"action"}, nil),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.l7Flows, c.requests, c.respRefused, c.secretSubs, c.secretViols, c.bytes, c.frames, c.drops, c.flowsActive, c.flowsTotal, c.decisions, c.auditDrops, c.failures, c.wakes} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	ct := &c.sh.Counters
	counter := func(d *prometheus.Desc, v uint64, label string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), label)
	}
	counter(c.bytes, ct.TxBytes(), "tx")
	counter(c.bytes, ct.RxBytes(), "rx")
	counter(c.frames, ct.TxFrames(), "tx")
	counter(c.frames, ct.RxFrames(), "rx")
	for _, r := range rings.DropReasons() {
		counter(c.drops, ct.Drops(r), r.String())
	}
	m := c.st.Metrics()
	for _, f := range m.Flows {
		ch <- prometheus.MustNewConstMetric(c.flowsActive, prometheus.GaugeValue, float64(f.Active), f.Proto)
		counter(c.flowsTotal, f.Total, f.Proto)
	}
	for reason, n := range m.Failures {
		counter(c.failures, n, reason)
	}
	if c.pub != nil {
		accepted, _, failed := c.pub.Stats()
		counter(c.flowsTotal, accepted, "ingress")
		counter(c.failures, failed, "ingress_guest_refused")
	}
	for _, w := range []struct {
		ring string
		wk   interface{ Stats() (uint64, uint64) }
	}{{"tx", c.sh.TxWake}, {"rx", c.sh.RxWake}} {
		wakes, wakeups := w.wk.Stats()
		ch <- prometheus.MustNewConstMetric(c.wakes, prometheus.CounterValue, float64(wakes), w.ring, "wake")
		ch <- prometheus.MustNewConstMetric(c.wakes, prometheus.CounterValue, float64(wakeups), w.ring, "wakeup")
	}
	for _, a := range []policy.Action{policy.Allow, policy.Deny, policy.Terminate} {
		counter(c.decisions, c.counts.get(a), a.String())
	}
	ch <- prometheus.MustNewConstMetric(c.auditDrops, prometheus.CounterValue, float64(c.audit.Dropped()))
	if c.l7 != nil {
		s := c.l7.Stats()
		counter(c.l7Flows, s.Spliced, "spliced")
		counter(c.l7Flows, s.Intercepted, "intercepted")
		counter(c.l7Flows, s.Proxied, "proxied")
		counter(c.l7Flows, s.Refused, "refused")
		counter(c.requests, s.RequestsAllowed, "allowed")
		counter(c.requests, s.RequestsDenied, "denied")
		for reason, n := range c.l7.ResponsesRefused() {
			counter(c.respRefused, n, reason)
		}
	}
	if c.sec != nil {
		for name, n := range c.sec.Counts() {
			counter(c.secretSubs, n[0], name)
			counter(c.secretViols, n[1], name)
		}
	}
}

// metricsServer serves Prometheus /metrics on addr until closed.
type metricsServer struct {
	srv  *http.Server
	addr net.Addr
}

func startMetrics(addr string, pprofOn bool, reg *prometheus.Registry, log *slog.Logger) (*metricsServer, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fielderr.Bad("metrics_addr", addr, "%w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	if pprofOn {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	m := &metricsServer{srv: &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}, addr: ln.Addr()}
	go func() {
		if err := m.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server stopped", "err", err)
		}
	}()
	log.Info("serving metrics", "addr", ln.Addr().String())
	return m, nil
}

func (m *metricsServer) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	return m.srv.Shutdown(ctx)
}

// decisionCounts counts flow decisions (packet path and DNS) by action.
type decisionCounts struct {
	n [3]atomic.Uint64
}

func (d *decisionCounts) add(a policy.Action) {
	if int(a) < len(d.n) {
		d.n[a].Add(1)
	}
}

func (d *decisionCounts) get(a policy.Action) uint64 { return d.n[a].Load() }
