// Package sockopt opens the agent's datagram and raw sockets without
// SO_BROADCAST, for the relays, the DNS forwarder and the published ports
// alike.
package sockopt

import (
	"context"
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// NoBroadcast is a net.Dialer or net.ListenConfig Control function that
// clears SO_BROADCAST. Go sets the option on every datagram and raw socket
// it opens, and with it the kernel sends to a subnet's broadcast address as
// the host. The agent's sockets carry the sandbox's traffic and must never
// reach a whole segment: cleared before a socket connects or binds, a
// broadcast destination fails with EACCES even where a check above missed
// it.
func NoBroadcast(_, _ string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_BROADCAST, 0)
	}); err != nil {
		return err
	}
	return serr
}

// Dialer dials the agent's datagram sockets without SO_BROADCAST.
var Dialer = &net.Dialer{Control: NoBroadcast}

// DialUDP opens a connected UDP socket to, without SO_BROADCAST.
func DialUDP(to netip.AddrPort) (*net.UDPConn, error) {
	c, err := Dialer.Dial("udp", to.String())
	if err != nil {
		return nil, err
	}
	return c.(*net.UDPConn), nil
}

// ListenPacket opens a datagram or raw socket without SO_BROADCAST.
func ListenPacket(network, address string) (net.PacketConn, error) {
	lc := net.ListenConfig{Control: NoBroadcast}
	return lc.ListenPacket(context.Background(), network, address)
}

// Broadcasts reports whether c's socket has SO_BROADCAST set (for the
// tests of every package that opens the agent's sockets).
func Broadcasts(c syscall.Conn) (bool, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return false, err
	}
	var v int
	var serr error
	if err := rc.Control(func(fd uintptr) { v, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_BROADCAST) }); err != nil {
		return false, err
	}
	return v != 0, serr
}
