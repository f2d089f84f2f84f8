package stack

import (
	"net/netip"
	"testing"
	"time"

	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/policy"
)

// TestSynTableAges: the records of SYNs that no relay took leave on their
// own, map and all, and a record survives one ageing (a SYN that waited
// for the forwarder still finds its decision). Before, up to 4096 dead
// records stayed after a flood for as long as the agent ran.
func TestSynTableAges(t *testing.T) {
	defer func(d time.Duration) { synAge = d }(synAge)
	synAge = 40 * time.Millisecond
	var tb synTable
	defer tb.close()
	key := func(i int) synKey {
		return synKey{netip.MustParseAddrPort("100.96.0.2:40000"), netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 51, 100, byte(i)}), uint16(1000+i))}
	}
	for i := 0; i < 3*maxSyns; i++ {
		tb.put(key(i%250), flow.Of(policy.Flow{ID: uint64(i)}, policy.Decision{}))
	}
	if n := tb.len(); n > maxSyns {
		t.Fatalf("%d records kept, want at most %d", n, maxSyns)
	}
	tb.age() // by hand: the records are old now, and still there
	if d, ok := tb.take(key(7)); !ok || d.ID == 0 {
		t.Fatalf("a record was gone after one ageing: %v %v", d, ok)
	}
	deadline := time.Now().Add(3 * time.Second)
	for tb.len() > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	tb.mu.Lock()
	defer tb.mu.Unlock()
	if len(tb.cur)+len(tb.old) != 0 || tb.cur != nil || tb.old != nil || tb.ager != nil {
		t.Errorf("after two ages: cur %d, old %d, ager pending %v; want both maps dropped and no timer", len(tb.cur), len(tb.old), tb.ager != nil)
	}
}
