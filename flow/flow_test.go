package flow

import (
	"net/netip"
	"sync"
	"testing"

	"go.uber.org/goleak"

	"github.com/msbtap/msbtap/policy"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var (
	guest = netip.MustParseAddrPort("100.96.0.2:40000")
	dst   = netip.MustParseAddrPort("198.51.100.9:443")
)

// TestTableLifecycle: a flow is listed from Open to Close, with its
// decision's rule and its bytes; Close by id resets it once; a closed flow
// is neither listed nor reset again.
func TestTableLifecycle(t *testing.T) {
	tb := NewTable(nil, nil)
	fl := tb.New(policy.Flow{Proto: policy.TCP, Src: guest, Dst: dst}, policy.Decision{Action: policy.Allow, Rule: 3})
	if fl.ID == 0 || !fl.Allowed() {
		t.Fatalf("new flow: id %d, allowed %v", fl.ID, fl.Allowed())
	}
	if n := len(tb.List(nil)); n != 0 {
		t.Fatalf("%d flows listed before Open", n)
	}
	resets := 0
	fl.Open(func() { resets++ })
	fl.Up.Bytes.Add(5)
	fl.Down.Bytes.Add(7)
	l := tb.List(func(netip.Addr) string { return "example.test" })
	if len(l) != 1 || l[0].ID != fl.ID || l[0].Rule != 3 || l[0].BytesUp != 5 || l[0].BytesDown != 7 || l[0].Domain != "example.test" || l[0].Proto != "tcp" {
		t.Fatalf("listed %+v", l)
	}
	if !tb.Close(fl.ID) || resets != 1 {
		t.Fatalf("Close: resets %d", resets)
	}
	fl.Close()
	if tb.Close(fl.ID) || fl.Reset() || resets != 1 || tb.Len() != 0 {
		t.Fatalf("a closed flow was reset again (%d) or is still listed (%d)", resets, tb.Len())
	}
}

// TestTableIngressMeters: an ingress flow's meters draw from the other
// direction's rate and its bytes are listed from the sandbox's side.
func TestTableIngressMeters(t *testing.T) {
	var up, down Shaper
	tb := NewTable(&up, &down)
	eg := tb.New(policy.Flow{Proto: policy.TCP, Src: guest, Dst: dst}, policy.Decision{})
	in := tb.New(policy.Flow{Direction: policy.Ingress, Proto: policy.TCP, Src: dst, Dst: guest}, policy.Decision{})
	if eg.Up.Shaper != &up || eg.Down.Shaper != &down || in.Up.Shaper != &down || in.Down.Shaper != &up {
		t.Fatal("meters draw from the wrong rates")
	}
	if eg.ID == in.ID {
		t.Fatal("two flows share an id")
	}
	in.Open(func() {})
	in.Up.Bytes.Add(10) // the host client sent 10 into the sandbox
	l := tb.List(nil)
	if len(l) != 1 || l[0].BytesDown != 10 || l[0].BytesUp != 0 {
		t.Fatalf("ingress flow listed %+v, want 10 bytes down", l)
	}
}

// TestTableRevoke resets exactly the open flows the check refuses, and a
// reset that closes its own flow (as a relay does) does not deadlock.
func TestTableRevoke(t *testing.T) {
	tb := NewTable(nil, nil)
	var fs []*Flow
	for i := 0; i < 6; i++ {
		fl := tb.New(policy.Flow{Proto: policy.UDP, Src: guest, Dst: netip.AddrPortFrom(dst.Addr(), uint16(1000+i))}, policy.Decision{})
		fl.Open(func() { fl.Close() })
		fs = append(fs, fl)
	}
	n := tb.Revoke(func(fl *Flow) bool { return fl.Dst.Port()%2 == 0 })
	if n != 3 || tb.Len() != 3 {
		t.Fatalf("revoked %d, %d left; want 3 and 3", n, tb.Len())
	}
	for _, fi := range tb.List(nil) {
		if netip.MustParseAddrPort(fi.Dst).Port()%2 != 0 {
			t.Errorf("flow to %s survived", fi.Dst)
		}
	}
}

// TestTableConcurrent opens, lists, resets and closes flows from many
// goroutines (for the race detector).
func TestTableConcurrent(t *testing.T) {
	tb := NewTable(nil, nil)
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 200; i++ {
				fl := tb.New(policy.Flow{Proto: policy.TCP, Src: guest, Dst: dst}, policy.Decision{})
				fl.Open(func() {})
				tb.List(nil)
				tb.Close(fl.ID)
				fl.Close()
			}
		}()
	}
	wg.Wait()
	if tb.Len() != 0 {
		t.Fatalf("%d flows left", tb.Len())
	}
}

func TestAddrText(t *testing.T) {
	if AddrText(netip.AddrPort{}) != "" || AddrText(dst) != "198.51.100.9:443" {
		t.Fatal("AddrText")
	}
	if (L7{SNI: "a.test", Host: "b.test"}).Name() != "a.test" || (L7{Host: "b.test"}).Name() != "b.test" {
		t.Fatal("L7.Name")
	}
}

// TestTableCut: a cut resets every open flow, and a flow opened after it
// (its dial or ask ended after the cut) is reset as it opens and never
// listed.
func TestTableCut(t *testing.T) {
	tb := NewTable(nil, nil)
	before := tb.New(policy.Flow{Proto: policy.TCP, Src: guest, Dst: dst}, policy.Decision{Action: policy.Allow})
	late := tb.New(policy.Flow{Proto: policy.UDP, Src: guest, Dst: dst}, policy.Decision{Action: policy.Allow})
	var resetBefore, resetLate int
	before.Open(func() { resetBefore++ })
	if n := tb.Cut(); n != 1 || resetBefore != 1 {
		t.Fatalf("cut reset %d flows (the open one %d times), want 1", n, resetBefore)
	}
	late.Open(func() { resetLate++ })
	if resetLate != 1 || tb.Len() != 1 {
		t.Fatalf("a flow opened after the cut: reset %d times, %d flows listed (want 1, the one open before)", resetLate, tb.Len())
	}
	late.Close()
	before.Close()
	if tb.Len() != 0 {
		t.Fatalf("%d flows listed after every Close", tb.Len())
	}
}

// TestTableRevokeReachesFlowsOnTheirWay: a flow decided before a
// revocation but opened after it (its dial was under way) is tested as
// the open ones were: reset as it opens if the new policy denies it,
// listed if it allows it; a flow decided after the revocation is not
// tested again.
func TestTableRevokeReachesFlowsOnTheirWay(t *testing.T) {
	tb := NewTable(nil, nil)
	denied := netip.MustParseAddrPort("198.51.100.66:443")
	dialling := tb.New(policy.Flow{Proto: policy.TCP, Src: guest, Dst: denied}, policy.Decision{Action: policy.Allow})
	still := tb.New(policy.Flow{Proto: policy.TCP, Src: guest, Dst: dst}, policy.Decision{Action: policy.Allow})
	tested := 0
	tb.Revoke(func(fl *Flow) bool { tested++; return fl.Dst != denied })
	later := tb.New(policy.Flow{Proto: policy.TCP, Src: guest, Dst: denied}, policy.Decision{Action: policy.Allow})
	var resets [3]int
	dialling.Open(func() { resets[0]++ })
	still.Open(func() { resets[1]++ })
	later.Open(func() { resets[2]++ })
	if resets != [3]int{1, 0, 0} || tested != 2 || tb.Len() != 2 {
		t.Fatalf("resets %v (want [1 0 0]), %d tests (want 2), %d listed (want 2)", resets, tested, tb.Len())
	}
	for _, fl := range []*Flow{dialling, still, later} {
		fl.Close()
	}
}
