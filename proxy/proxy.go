// Package proxy relays the sandbox's allowed flows through ordinary host
// sockets: TCP streams, UDP sessions and ICMP echo.
package proxy

import "net/netip"

// Replier delivers packets to the guest that the proxies build outside the
// netstack. Implementations copy payload before returning.
type Replier interface {
	// SendUDP delivers a datagram from src to the guest address dst.
	SendUDP(src, dst netip.AddrPort, payload []byte) bool
	// SendEchoReply delivers an echo reply from src to the guest address dst.
	SendEchoReply(src, dst netip.Addr, id, seq uint16, payload []byte) bool
}

// MapDst returns the host address the agent connects to for a destination
// the guest named: the gateway's own addresses stand for the host itself and
// map to its loopback; every other address is used as it is.
type MapDst func(netip.AddrPort) netip.AddrPort

// Identity is the MapDst that changes nothing.
func Identity(a netip.AddrPort) netip.AddrPort { return a }

// GatewayToLoopback returns a MapDst that sends the gateway's addresses to
// the host's loopback (127.0.0.1 and ::1).
func GatewayToLoopback(gw4, gw6 netip.Addr) MapDst {
	lo4, lo6 := netip.AddrFrom4([4]byte{127, 0, 0, 1}), netip.IPv6Loopback()
	return func(a netip.AddrPort) netip.AddrPort {
		switch a.Addr() {
		case gw4:
			return netip.AddrPortFrom(lo4, a.Port())
		case gw6:
			return netip.AddrPortFrom(lo6, a.Port())
		}
		return a
	}
}
