package publish

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/internal/portspec"
	"github.com/msbtap/msbtap/policy"
)

// TestPublishedUDPClientIsAFlow: a host client of a published UDP port
// is a flow like any: listed while its session lives, its datagrams
// metered both ways, and ended by flows close (its session forgotten:
// the guest's replies no longer reach it). Before, UDP clients were in no
// table: not listed, not closed, not revoked, not rate-limited.
func TestPublishedUDPClientIsAFlow(t *testing.T) {
	p, err := Listen([]portspec.Spec{{Proto: "udp", Host: netip.MustParseAddrPort("127.0.0.1:0"), GuestPort: 5353}})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	tb := flow.NewTable(nil, nil)
	toGuest := make(chan uint16, 4)
	p.Start(Options{
		DialGuest: func(ctx context.Context, port uint16, v6 bool) (net.Conn, error) { return nil, ErrGuestRefused },
		SendToGuest: func(gwPort, guestPort uint16, v6 bool, payload []byte) bool {
			toGuest <- gwPort
			return true
		},
		Allow: func(proto policy.Proto, client, listen netip.AddrPort) *flow.Flow {
			return tb.New(policy.Flow{Direction: policy.Ingress, Proto: proto, Src: client, Dst: listen}, policy.Decision{Action: policy.Allow})
		},
	})
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(p.udp[0].LocalAddr().(*net.UDPAddr).AddrPort()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("hello"))
	var gwPort uint16
	select {
	case gwPort = <-toGuest:
	case <-time.After(5 * time.Second):
		t.Fatal("the datagram did not reach the guest")
	}
	guest := netip.AddrPortFrom(netip.MustParseAddr("100.96.0.2"), 5353)
	if !p.HandleGuestReply(gwPort, guest, []byte("hi back")) {
		t.Fatal("the guest's reply found no session")
	}
	l := tb.List(nil)
	if len(l) != 1 || l[0].Proto != "udp" || l[0].Direction != "ingress" || l[0].BytesDown != 5 || l[0].BytesUp != 7 {
		t.Fatalf("listed %+v, want one ingress UDP flow, 5 bytes in, 7 out", l)
	}
	if !tb.Close(l[0].ID) {
		t.Fatal("flows close found no flow")
	}
	if p.HandleGuestReply(gwPort, guest, []byte("late")) || tb.Len() != 0 {
		t.Errorf("the closed client's session lives on (%d flows)", tb.Len())
	}
}
