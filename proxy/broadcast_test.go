package proxy

import (
	"errors"
	"net"
	"net/netip"
	"syscall"
	"testing"

	"github.com/msbtap/msbtap/internal/sockopt"
)

// loopBroadcast is the broadcast address of lo's 127.0.0.0/8: the kernel
// lets a socket send there only with SO_BROADCAST, and nothing leaves the
// host.
var loopBroadcast = netip.MustParseAddrPort("127.255.255.255:9")

func broadcastOpt(t *testing.T, c syscall.Conn) int {
	t.Helper()
	on, err := sockopt.Broadcasts(c)
	if err != nil {
		t.Fatal(err)
	}
	if on {
		return 1
	}
	return 0
}

// TestAgentSocketsNeverBroadcast: Go sets SO_BROADCAST on every datagram
// socket; the agent's UDP sessions and ICMP echo sockets do without (its
// DNS upstream queries and published UDP ports too: internal/sockopt's and
// publish's tests), so the kernel refuses a
// broadcast destination even if a check above let one through.
func TestAgentSocketsNeverBroadcast(t *testing.T) {
	plain, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(loopBroadcast))
	if err != nil {
		t.Skipf("no broadcast route on lo here (%v): nothing to compare with", err)
	}
	if broadcastOpt(t, plain) != 1 {
		t.Log("Go no longer sets SO_BROADCAST by default")
	}
	plain.Close()

	if c, err := sockopt.DialUDP(loopBroadcast); !errors.Is(err, syscall.EACCES) {
		t.Errorf("a UDP session's socket to a broadcast address: %v, want EACCES", err)
		if c != nil {
			c.Close()
		}
	}
	u := NewUDP(UDPOptions{Replier: &captureReplier{}})
	defer u.Close()
	if _, err := u.Handle(netip.MustParseAddrPort("100.96.0.2:4000"), loopBroadcast, []byte("x")); err == nil {
		t.Error("the UDP relay opened a session to a broadcast address")
	}
	// A session's socket to an ordinary address is without it too.
	echo, _ := net.ListenPacket("udp", "127.0.0.1:0")
	defer echo.Close()
	c, err := sockopt.DialUDP(netip.MustParseAddrPort(echo.LocalAddr().String()))
	if err != nil {
		t.Fatal(err)
	}
	if v := broadcastOpt(t, c); v != 0 {
		t.Errorf("a UDP session's socket has SO_BROADCAST %d", v)
	}
	c.Close()

	ic, raw, err := listenICMP(false)
	if err != nil {
		t.Logf("no ICMP socket here (%v): echo sockets not checked", err)
		return
	}
	defer ic.Close()
	if sc, ok := ic.(syscall.Conn); ok {
		if v := broadcastOpt(t, sc); v != 0 {
			t.Errorf("the ICMP echo socket (raw %v) has SO_BROADCAST %d", raw, v)
		}
	}
	var to net.Addr = &net.IPAddr{IP: loopBroadcast.Addr().AsSlice()}
	if !raw {
		to = &net.UDPAddr{IP: loopBroadcast.Addr().AsSlice()}
	}
	echoReq := []byte{8, 0, 0xf7, 0xff, 0, 0, 0, 0} // type 8, code 0, checksum, id 0, seq 0
	if _, err := ic.WriteTo(echoReq, to); !errors.Is(err, syscall.EACCES) {
		t.Errorf("an echo request to a broadcast address (raw socket %v): %v, want EACCES", raw, err)
	}
}
