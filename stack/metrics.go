package stack

import "sync/atomic"

// tcpStats are the TCP relay's counters.
type tcpStats struct {
	total, overCap, dialFailed, dialRefused, relayFailed, rateLimited atomic.Uint64
}

// FlowStat is the number of open and total flows of one protocol.
type FlowStat struct {
	Proto  string
	Active int
	Total  uint64
}

// Metrics is one snapshot of the gateway's counters, read at scrape time.
type Metrics struct {
	// Flows are open and total flows by protocol (tcp, udp, icmp, dns).
	Flows []FlowStat
	// PendingDials are TCP dials under way (guest handshakes waiting).
	PendingDials int
	// Failures are flows or packets the gateway could not relay, by
	// reason.
	Failures map[string]uint64
}

// Metrics returns a snapshot of the gateway's counters.
func (st *Stack) Metrics() Metrics {
	echo := st.echo.Stats()
	dns := st.dns.Stats()
	udp := st.udp.Stats()
	m := Metrics{
		PendingDials: st.tcp.dials.pending(),
		Flows: []FlowStat{
			{"tcp", int(st.tcp.active.Load()), st.stats.total.Load()},
			{"udp", udp.Active, udp.Total},
			{"icmp", echo.InFlight, echo.Sent},
			{"dns", dns.InFlight + dns.TCPConns, dns.Queries},
		},
		Failures: map[string]uint64{
			"tcp_over_cap":      st.stats.overCap.Load(),
			"tcp_dial_failed":   st.stats.dialFailed.Load(),
			"tcp_relay_failed":  st.stats.relayFailed.Load(),
			"tcp_rate_limited":  st.stats.rateLimited.Load(),
			"udp_dropped":       udp.Dropped,
			"udp_too_big":       udp.TooBig,
			"udp_evicted":       udp.Evicted,
			"udp_held_dropped":  st.heldUDP.dropped.Load(),
			"icmp_dropped":      echo.Dropped,
			"icmp_timeout":      echo.TimedOut,
			"dns_dropped":       dns.Dropped,
			"dns_no_upstream":   dns.Failures,
			"dns_not_forwarded": dns.Refused,
			"dns_tcp_over_cap":  dns.TCPOverCap,
			// Segments the netstack dropped: a TCP receive queue over its
			// memory, say.
			"netstack_dropped": st.s.Stats().DroppedPackets.Value(),
		},
	}
	if st.fast != nil {
		// The fast path's own: refusals, connect timeouts and connects
		// reset to make room are dial failures like the relay's; the
		// rest have names of their own.
		fs := st.fast.Stats()
		m.Failures["tcp_dial_failed"] += fs.Refused + fs.ConnectTimeouts + fs.Evicted
		m.Failures["tcp_fast_aborted"] = fs.Aborted - fs.Evicted
		m.Failures["tcp_fast_bad_segments"] = fs.BadSegments
	}
	return m
}
