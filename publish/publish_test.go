package publish

import (
	"net/netip"
	"syscall"
	"testing"

	"github.com/msbtap/msbtap/internal/portspec"
	"github.com/msbtap/msbtap/internal/sockopt"
)

// TestPublishedUDPNeverBroadcasts: Go sets SO_BROADCAST on every datagram
// socket; a published UDP port's socket does without, so the kernel
// refuses a broadcast destination for it.
func TestPublishedUDPNeverBroadcasts(t *testing.T) {
	p, err := Listen([]portspec.Spec{{Proto: "udp", Host: netip.MustParseAddrPort("127.0.0.1:0")}})
	if err != nil {
		t.Fatal(err)
	}
	defer p.closeSockets()
	for _, c := range p.udp {
		if v := broadcastOpt(t, c); v != 0 {
			t.Errorf("a published UDP port's socket has SO_BROADCAST %d", v)
		}
	}
}

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
