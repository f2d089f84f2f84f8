package proxy

import (
	"context"
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// Go sets SO_BROADCAST on every datagram and raw socket it opens, and with
// it the kernel sends to a subnet's broadcast address as the host. The
// agent's sockets carry the sandbox's traffic and must never reach a whole
// segment: noBroadcast clears the option before a socket connects or
// binds, so a broadcast destination fails with EACCES even where a check
// above missed it.
func noBroadcast(_, _ string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_BROADCAST, 0)
	}); err != nil {
		return err
	}
	return serr
}

// upstreamDialer dials the agent's datagram sockets.
var upstreamDialer = &net.Dialer{Control: noBroadcast}

// dialUDP opens a connected UDP socket to, without SO_BROADCAST.
func dialUDP(to netip.AddrPort) (*net.UDPConn, error) {
	c, err := upstreamDialer.Dial("udp", to.String())
	if err != nil {
		return nil, err
	}
	return c.(*net.UDPConn), nil
}

// listenPacket opens a datagram or raw socket without SO_BROADCAST.
func listenPacket(network, address string) (net.PacketConn, error) {
	lc := net.ListenConfig{Control: noBroadcast}
	return lc.ListenPacket(context.Background(), network, address)
}
