// Package stack runs one sandbox's gateway: gVisor's netstack behind a link
// endpoint of our own, fed by a poll loop that sees every guest frame first,
// decides each new flow against the policy, answers ARP, NDP, DHCP and
// router solicitations, and hands allowed flows to the proxies.
package stack

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/time/rate"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	gstack "gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"

	"github.com/msbtap/msbtap/dnsproxy"
	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/plan"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/proxy"
	"github.com/msbtap/msbtap/rings"
	"github.com/msbtap/msbtap/tcpfast"
	"github.com/msbtap/msbtap/wire"
)

const nicID tcpip.NICID = 1

// DenyMode says how a denied flow is refused.
type DenyMode int

// Deny modes.
const (
	// DenyReject answers a denied TCP SYN with a RST and a denied UDP or
	// echo packet with ICMP "administratively prohibited".
	DenyReject DenyMode = iota
	// DenyDrop drops denied packets silently.
	DenyDrop
)

// Options configure a Stack.
type Options struct {
	Plan   plan.Plan
	Shared *rings.Shared
	// Policy decides new flows; nil allows everything.
	Policy policy.Checker
	// Ask, if set, holds a TCP flow the policy decided to ask about: it
	// blocks (the guest's SYN unanswered, nothing dialled) until the
	// question is answered and returns the decision that replaces the
	// ask. Without it an ask is a deny.
	Ask func(ctx context.Context, f policy.Flow, d policy.Decision) policy.Decision
	// DNSHolds says which queries the DNS filter may hold (ask): they are
	// never decided on the packet path.
	DNSHolds func(src netip.AddrPort, q *dns.Msg) bool
	// HandleTCP, if set, serves the allowed TCP flows WantsTCP says yes
	// to (their first bytes looked at, say) instead of a plain relay:
	// guest is the sandbox's side, accepted, and host the upstream,
	// dialled; fl's meters count what each side sends.
	HandleTCP func(ctx context.Context, fl *flow.Flow, guest, host net.Conn) error
	WantsTCP  func(*flow.Flow) bool
	// OnDecision, when set, is told of every flow decision (for the audit
	// log and metrics); it runs on the packet path and must not keep fl
	// once it returns (a refused flow's memory is reused), nor must
	// Terminate.
	OnDecision func(*flow.Flow)
	// Terminate is called on a terminate decision, after OnDecision; it
	// should cut the network (Cut) before it returns, and the gateway
	// cuts it after if it did not.
	Terminate func(*flow.Flow)
	DenyMode  DenyMode
	// DNSUpstreams are the resolvers the agent forwards the guest's queries
	// to.
	DNSUpstreams []string
	// DNSFilter lets the policy act on name resolution (optional).
	DNSFilter dnsproxy.Filter
	// Offload says the TAP carries virtio net headers: take and hand over
	// 64 KiB TCP segments with partial checksums.
	Offload bool
	// FastPath carries the allowed TCP flows the agent need not read on
	// the TCP translator (package tcpfast) instead of the netstack;
	// WriteNow, if set, lets it write a few frames to the TAP itself
	// (tap.Pump.WriteNow); Link, if set, lets its loop read the TAP
	// (tap.Pump: see ReadsTAP).
	FastPath bool
	WriteNow func([]*rings.Frame) bool
	Link     tcpfast.Link
	// MaxConnections caps concurrent established TCP relays (default
	// DefaultMaxConnections).
	MaxConnections int
	// MaxPendingDials caps upstream TCP dials under way (default 192): a
	// new one past it cancels the oldest.
	MaxPendingDials int
	// DialTimeout bounds the upstream dial of a TCP flow (default 10 s).
	DialTimeout time.Duration
	// Dial, when set, opens the host side of every allowed TCP flow fl, to
	// the address MapDst gave. Default: a direct connection to to. The
	// upstream proxy hooks in here; any other path that opens host sockets
	// for TCP flows must go through it too.
	Dial func(ctx context.Context, fl *flow.Flow, to netip.AddrPort) (net.Conn, error)
	// UDPIdleTimeout ends idle UDP sessions (default 60 s).
	UDPIdleTimeout time.Duration
	// MaxUDPSessions caps concurrent UDP sessions (default 1024).
	MaxUDPSessions int
	// MapDst maps a destination to the host address to connect to (default:
	// the gateway's addresses map to the host's loopback).
	MapDst proxy.MapDst
	// IsLocal reports whether the host's routing table resolves an address
	// as local (one of the host's own). A destination it says is local is
	// dialed only if the policy allows it as the host. nil skips the check.
	IsLocal func(netip.Addr) bool
	// IsBroadcast reports whether the host's routing table resolves an
	// address as a broadcast or multicast destination: never dialed. nil
	// skips the check.
	IsBroadcast func(netip.Addr) bool
	// RateUp and RateDown pace what the sandbox sends and receives, in
	// bytes a second (0: no limit); NewConnsPerSecond bounds the TCP
	// connections it opens a second (0: no limit). All can change later.
	RateUp, RateDown, NewConnsPerSecond float64
	Log                                 *slog.Logger
}

// Stack is the gateway of one sandbox.
type Stack struct {
	o           Options
	s           *gstack.Stack
	ep          *linkEndpoint
	r           *replier
	gwMAC       [6]byte
	gwLinkLocal netip.Addr
	sizes       wire.Sizes

	ingress atomic.Pointer[IngressUDP]

	frags *wire.Reassembler
	udp   *proxy.UDP
	echo  *proxy.Echo
	dns   *dnsproxy.Server
	tcp   *tcpRelay
	fast  *tcpfast.Translator // nil: no fast path

	// cut is set by Cut: every decision from then on is a deny.
	cut atomic.Bool

	flows    *flow.Table
	up, down flow.Shaper
	newConns atomic.Pointer[rate.Limiter] // nil: no limit
	syns     synTable
	// heldUDP are the UDP flows an ask holds (see udpask.go).
	heldUDP heldUDP

	done      chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup
	stats     tcpStats
}

// DefaultMaxConnections is the cap on concurrent established TCP relays
// when Options.MaxConnections is not set; msbtap run's --max-connections
// defaults to it too.
const DefaultMaxConnections = 256

// New builds the gateway and starts its poll loop.
func New(o Options) (*Stack, error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.MaxConnections <= 0 {
		o.MaxConnections = DefaultMaxConnections
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = 10 * time.Second
	}
	if o.MapDst == nil {
		o.MapDst = proxy.GatewayToLoopback(o.Plan.GatewayV4, o.Plan.GatewayV6)
	}
	if o.Policy == nil {
		o.Policy = policy.AllowAll{}
	}
	p := o.Plan
	st := &Stack{o: o, done: make(chan struct{}), sizes: wire.SizesFor(p.MTU, o.Offload), frags: wire.NewReassembler()}
	st.flows = flow.NewTable(&st.up, &st.down)
	st.SetRates(o.RateUp, o.RateDown, o.NewConnsPerSecond)
	copy(st.gwMAC[:], p.GatewayMAC)
	st.gwLinkLocal = wire.GatewayLinkLocal(st.gwMAC)

	st.s = gstack.New(gstack.Options{
		NetworkProtocols: []gstack.NetworkProtocolFactory{
			ipv4.NewProtocol,
			ipv6.NewProtocolWithOptions(ipv6.Options{
				DADConfigs:       gstack.DADConfigurations{DupAddrDetectTransmits: 0},
				AutoGenLinkLocal: true,
			}),
			arp.NewProtocol,
		},
		TransportProtocols: []gstack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
	})
	if err := st.configureNetstack(); err != nil {
		st.s.Destroy()
		return nil, err
	}

	st.r = newReplier(o.Shared, p.GatewayMAC, p.GuestMAC)
	st.udp = proxy.NewUDP(proxy.UDPOptions{
		Replier:     st.r,
		Allow:       st.allowUDP,
		Hold:        st.holdUDP,
		MapDst:      o.MapDst,
		IdleTimeout: o.UDPIdleTimeout,
		MaxSessions: o.MaxUDPSessions,
		MaxPayload4: st.sizes.MaxUDPPayload(false),
		MaxPayload6: st.sizes.MaxUDPPayload(true),
		Log:         o.Log.With("component", "udp"),
	})
	st.echo = proxy.NewEcho(proxy.EchoOptions{Replier: st.r, Log: o.Log.With("component", "icmp")})
	dns, err := dnsproxy.New(dnsproxy.Options{
		Upstreams:     o.DNSUpstreams,
		Replier:       st.r,
		MaxUDPPayload: st.sizes.MaxUDPPayload(true),
		Filter:        cutAware{st, o.DNSFilter},
		Holds:         o.DNSHolds,
		Report:        func(f policy.Flow, d policy.Decision) { st.report(flow.Of(f, d)) },
		Log:           o.Log.With("component", "dns"),
	})
	if err != nil {
		st.s.Destroy()
		return nil, err
	}
	st.dns = dns
	st.tcp = newTCPRelay(st)
	if o.FastPath {
		st.startFast()
	}

	st.o.Shared.SetTxHandler(st.handleTx)
	st.wg.Add(1)
	go st.routinePoll()
	return st, nil
}

// startFast starts the TCP translator; the gateway runs without it if it
// cannot start.
func (st *Stack) startFast() {
	o := st.o
	var err error
	st.fast, err = tcpfast.New(tcpfast.Options{
		Shared: o.Shared, GatewayMAC: st.gwMAC, GuestMAC: func() [6]byte { return *st.r.guestMAC.Load() },
		MTU: o.Plan.MTU, Offload: o.Offload, ConnectTimeout: o.DialTimeout, MaxConnecting: o.MaxPendingDials, Direct: o.WriteNow, Link: o.Link, Log: o.Log.With("component", "tcpfast"),
	})
	if err != nil {
		o.Log.Warn("TCP fast path off: "+err.Error(), "fast_path", "off")
		st.fast = nil
	}
}

// ReadsTAP reports whether the fast path's loop reads the TAP (Options.Link
// took its reads): if not, the pump's own reader must.
func (st *Stack) ReadsTAP() bool { return st.fast != nil && st.fast.ReadsLink() }

func (st *Stack) configureNetstack() error {
	p := st.o.Plan
	st.ep = newLinkEndpoint(st.o.Shared, tcpip.LinkAddress(p.GatewayMAC), uint32(p.MTU), st.o.Offload)
	if err := st.s.CreateNICWithOptions(nicID, st.ep, gstack.NICOptions{Name: "gateway"}); err != nil {
		return fmt.Errorf("create netstack NIC: %s", err)
	}
	for _, a := range []netip.Prefix{
		netip.PrefixFrom(p.GatewayV4, p.GuestIPv4.Bits()),
		netip.PrefixFrom(p.GatewayV6, p.GuestIPv6.Bits()),
	} {
		proto := ipv4.ProtocolNumber
		if a.Addr().Is6() {
			proto = ipv6.ProtocolNumber
		}
		pa := tcpip.ProtocolAddress{
			Protocol:          proto,
			AddressWithPrefix: tcpip.AddressWithPrefix{Address: wire.TCPIPAddr(a.Addr()), PrefixLen: a.Bits()},
		}
		if err := st.s.AddProtocolAddress(nicID, pa, gstack.AddressProperties{}); err != nil {
			return fmt.Errorf("add gateway address %s: %s", a, err)
		}
	}
	// The gateway accepts traffic for every destination (promiscuous) and
	// answers from it (spoofing); the poll loop keeps ARP, NDP and echo from
	// claiming addresses that are not the gateway's.
	if err := st.s.SetPromiscuousMode(nicID, true); err != nil {
		return fmt.Errorf("netstack promiscuous mode: %s", err)
	}
	if err := st.s.SetSpoofing(nicID, true); err != nil {
		return fmt.Errorf("netstack spoofing: %s", err)
	}
	st.s.SetRouteTable([]tcpip.Route{
		{Destination: anySubnet(4), NIC: nicID},
		{Destination: anySubnet(16), NIC: nicID},
	})
	sack := tcpip.TCPSACKEnabled(true)
	moderate := tcpip.TCPModerateReceiveBufferOption(true)
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 8 << 20}
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 8 << 20}
	for _, opt := range []tcpip.SettableTransportProtocolOption{&sack, &moderate, &rcv, &snd} {
		if err := st.s.SetTransportProtocolOption(tcp.ProtocolNumber, opt); err != nil {
			return fmt.Errorf("netstack tcp option %T: %s", opt, err)
		}
	}
	return nil
}

// anySubnet is 0.0.0.0/0 (n = 4) or ::/0 (n = 16).
func anySubnet(n int) tcpip.Subnet {
	s, _ := tcpip.NewSubnet(tcpip.AddrFromSlice(make([]byte, n)), tcpip.MaskFromBytes(make([]byte, n)))
	return s
}

// report tells OnDecision of a flow's decision and, for a terminate,
// has the network cut and the sandbox stopped (Options.Terminate).
func (st *Stack) report(fl *flow.Flow) {
	if st.o.OnDecision != nil {
		st.o.OnDecision(fl)
	}
	if fl.Decision.Action == policy.Terminate {
		if st.o.Terminate != nil {
			st.o.Terminate(fl)
		}
		if !st.cut.Load() {
			// Terminate did not cut: it had no gateway to cut yet (a
			// frame decided before the agent kept New's result), or it
			// fired once already. The network is cut regardless.
			st.Cut()
		}
	}
}

// decide makes the flow f at its first packet (giving it its id), runs the
// policy on it and reports the decision. An unspecified destination, in
// any form, is never allowed; once the network is cut, nothing is.
func (st *Stack) decide(f policy.Flow) *flow.Flow {
	if st.cut.Load() {
		return st.flows.New(f, policy.Decision{Action: policy.Deny, Rule: policy.RuleDefault}) // no decision to report
	}
	fl := st.flows.New(f, policy.Decision{})
	if f.Direction == policy.Egress && policy.Unspecified(f.Dst.Addr()) {
		fl.Decision = policy.Decision{Action: policy.Deny, Rule: policy.RuleUnspecified}
	} else {
		fl.Decision = st.o.Policy.Check(fl.Flow)
	}
	st.report(fl)
	return fl
}

// hostChecker decides a flow as if its destination were the host.
type hostChecker interface {
	CheckAsHost(policy.Flow) policy.Decision
}

// dialAllowed is the check at dial time: a destination that the host's
// routing table resolves as local (an address the host gained after the
// policy's host group was read, or a local route) is dialed only if the
// policy allows it as the host. A refusal becomes the flow's decision and
// is reported like any.
//
// A destination the routing table resolves as a broadcast (a subnet's
// broadcast address the host gained a moment ago) or multicast is never
// dialed.
func (st *Stack) dialAllowed(fl *flow.Flow) bool {
	dst := fl.Dst.Addr()
	if st.o.IsBroadcast != nil && st.o.MapDst(fl.Dst) == fl.Dst && st.o.IsBroadcast(dst) {
		st.o.Log.Debug("refused at dial: the destination is a broadcast", "proto", fl.Proto, "dst", fl.Dst)
		fl.Decision = policy.Decision{Action: policy.Deny, Rule: policy.RuleBroadcast}
		st.report(fl)
		return false
	}
	if st.o.IsLocal == nil || st.o.MapDst(fl.Dst) != fl.Dst || !st.o.IsLocal(dst) {
		return true // the gateway's own addresses were decided as the host already
	}
	d := policy.Decision{Action: policy.Deny, Rule: policy.RuleLocal}
	if hc, ok := st.o.Policy.(hostChecker); ok {
		d = hc.CheckAsHost(fl.Flow)
	}
	if d.Action == policy.Allow {
		return true
	}
	st.o.Log.Debug("refused at dial: the destination is local to the host", "proto", fl.Proto, "dst", fl.Dst)
	fl.Decision = d
	st.report(fl)
	return false
}

// allowUDP decides a new UDP session (proxy.UDPOptions.Allow).
func (st *Stack) allowUDP(src, dst netip.AddrPort) *flow.Flow {
	fl := st.decide(policy.Flow{Proto: policy.UDP, Src: src, Dst: dst})
	if fl.Allowed() {
		st.dialAllowed(fl)
	}
	return fl
}

// allowsAnything says whether the policy allows any egress at all; the
// gateway answers its own echo under every policy that does.
func (st *Stack) allowsAnything() bool {
	if st.cut.Load() {
		return false
	}
	if a, ok := st.o.Policy.(interface{ AllowsAnything() bool }); ok {
		return a.AllowsAnything()
	}
	return st.o.Policy.Check(policy.Flow{Proto: policy.ICMP}).Action == policy.Allow
}

// cutAware refuses every query once the network is cut, and otherwise
// defers to the policy's DNS filter (if any).
type cutAware struct {
	st    *Stack
	inner dnsproxy.Filter
}

func (c cutAware) Query(src netip.AddrPort, q *dns.Msg) (*dns.Msg, *policy.Verdict) {
	if c.st.cut.Load() {
		m := new(dns.Msg)
		m.SetRcode(q, dns.RcodeRefused)
		return m, nil
	}
	if c.inner == nil {
		return nil, nil
	}
	return c.inner.Query(src, q)
}

func (c cutAware) Answer(src netip.AddrPort, q, a *dns.Msg) (*dns.Msg, *policy.Verdict) {
	if c.inner == nil {
		return nil, nil
	}
	return c.inner.Answer(src, q, a)
}

// Cut cuts the sandbox off at once, as the first step of a termination:
// every relayed TCP connection is reset (both ends), every UDP session and
// echo in flight dropped, and every new flow, DNS query and echo to the
// gateway refused from now on. It may run on the packet path.
func (st *Stack) Cut() {
	st.cut.Store(true)
	st.flows.Cut()
	st.tcp.resetAll()
	if st.fast != nil {
		st.fast.ResetAll()
	}
	st.udp.CloseSessions()
	st.echo.Forget()
}

// AllowIngress decides a host client's new flow to a published port, as
// the packet path decides the guest's: reported, and fatal if the policy
// says terminate (publish.Options.Allow).
func (st *Stack) AllowIngress(proto policy.Proto, client, listen netip.AddrPort) *flow.Flow {
	return st.decide(policy.Flow{Direction: policy.Ingress, Proto: proto, Src: client, Dst: listen})
}

// DNSUpstreams returns the resolvers in use.
func (st *Stack) DNSUpstreams() []string { return st.dns.Upstreams() }

// Close stops the poll loop and waits for it, so no new flow starts; then
// it resets every relayed connection and stops the proxies. It is safe to
// call more than once; Wait joins the rest.
func (st *Stack) Close() error {
	st.closeOnce.Do(func() {
		close(st.done)
		st.o.Shared.LockTx() // the TAP reader handles no frame of ours from now on
		st.wg.Wait()         // the poll loop: nothing hands the proxies work now
		st.tcp.close()
		if st.fast != nil {
			st.fast.Close() // every fast-path connection reset both ways
		}
		st.udp.Close()
		st.echo.Close()
		st.dns.Close()
		st.syns.close()
		st.s.Close()
	})
	return nil
}

// Wait blocks until every goroutine of the stack has returned.
func (st *Stack) Wait() {
	st.wg.Wait()
	st.tcp.wait()
	st.s.Wait()
}
