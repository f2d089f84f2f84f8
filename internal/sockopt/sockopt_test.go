package sockopt

import (
	"errors"
	"net"
	"net/netip"
	"syscall"
	"testing"
)

// loopBroadcast is the broadcast address of lo's 127.0.0.0/8: the kernel
// lets a socket send there only with SO_BROADCAST, and nothing leaves the
// host.
var loopBroadcast = netip.MustParseAddrPort("127.255.255.255:9")

func broadcastOpt(t *testing.T, c syscall.Conn) int {
	t.Helper()
	on, err := Broadcasts(c)
	if err != nil {
		t.Fatal(err)
	}
	if on {
		return 1
	}
	return 0
}

// TestSocketsNeverBroadcast: Go sets SO_BROADCAST on every datagram
// socket; the ones opened here do without, so the kernel refuses a
// broadcast destination.
func TestSocketsNeverBroadcast(t *testing.T) {
	plain, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(loopBroadcast))
	if err != nil {
		t.Skipf("no broadcast route on lo here (%v): nothing to compare with", err)
	}
	if broadcastOpt(t, plain) != 1 {
		t.Log("Go no longer sets SO_BROADCAST by default")
	}
	plain.Close()

	if c, err := DialUDP(loopBroadcast); !errors.Is(err, syscall.EACCES) {
		t.Errorf("DialUDP to a broadcast address: %v, want EACCES", err)
		if c != nil {
			c.Close()
		}
	}
	if c, err := Dialer.Dial("udp", "127.255.255.255:53"); !errors.Is(err, syscall.EACCES) {
		t.Errorf("Dialer to a broadcast address: %v, want EACCES", err)
		if c != nil {
			c.Close()
		}
	}
	echo, _ := net.ListenPacket("udp", "127.0.0.1:0")
	defer echo.Close()
	c, err := DialUDP(netip.MustParseAddrPort(echo.LocalAddr().String()))
	if err != nil {
		t.Fatal(err)
	}
	if v := broadcastOpt(t, c); v != 0 {
		t.Errorf("a socket to an ordinary address has SO_BROADCAST %d", v)
	}
	c.Close()
	l, err := ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if v := broadcastOpt(t, l.(*net.UDPConn)); v != 0 {
		t.Errorf("a listening socket has SO_BROADCAST %d", v)
	}
}
