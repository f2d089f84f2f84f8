package agent

import (
	"net/netip"
	"slices"
	"testing"
)

// The routing table's word on lo's addresses: 127.0.0.1 is local,
// 127.255.255.255 the broadcast of 127.0.0.0/8, and the host set's
// broadcasts have it too.
func TestLocalRoutesKnowBroadcasts(t *testing.T) {
	l := newLocalRoutes()
	lo, bc := netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.255.255.255")
	if !l.IsLocal(lo) || l.IsBroadcast(lo) {
		t.Errorf("127.0.0.1: local %v, broadcast %v", l.IsLocal(lo), l.IsBroadcast(lo))
	}
	if l.kind(bc) == routeOther {
		t.Skip("no broadcast route for 127.255.255.255 here")
	}
	if !l.IsBroadcast(bc) || l.IsLocal(bc) {
		t.Errorf("127.255.255.255: local %v, broadcast %v", l.IsLocal(bc), l.IsBroadcast(bc))
	}
	if m := netip.MustParseAddr("224.0.0.1"); l.kind(m) != routeOther && !l.IsBroadcast(m) {
		t.Errorf("224.0.0.1 has a route that is not multicast: %v", l.kind(m))
	}
	if b := hostBroadcasts(); !slices.Contains(b, bc) {
		t.Errorf("the host's broadcasts %v lack lo's 127.255.255.255", b)
	}
}
