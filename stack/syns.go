package stack

import (
	"net/netip"
	"sync"
	"time"

	"github.com/msbtap/msbtap/flow"
)

// synKey is a new flow's (source, destination); synTable keeps its flow,
// decided at its first packet, for the relay that opens it: gVisor's
// forwarder hands that relay the connection's addresses and nothing else.
type synKey struct{ src, dst netip.AddrPort }

// maxSyns bounds the table: a SYN the forwarder dropped never collects its
// entry.
const maxSyns = 4096

// synAge is how often the table ages: an entry lives one to two ages,
// far longer than a SYN waits for the forwarder (a pending dial waits up
// to 3 s for a slot). A record that is gone only means the flow is decided
// again.
var synAge = 5 * time.Second

// synTable keeps the records in two generations: new ones go to cur, and
// each age (or when cur is full) cur becomes old and old is dropped, map
// and all. The ageing runs on a timer only while records are kept, so the
// records of SYNs nobody took leave on their own: after a flood of SYNs to
// random addresses, a table of 4096 dead records once stayed for good.
type synTable struct {
	mu       sync.Mutex // mu protects what follows
	cur, old map[synKey]*flow.Flow
	ager     *time.Timer // pending while records are kept
	closed   bool
}

func (t *synTable) put(k synKey, fl *flow.Flow) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.cur) >= maxSyns/2 {
		t.old, t.cur = t.cur, nil
	}
	if t.cur == nil {
		t.cur = make(map[synKey]*flow.Flow)
	}
	t.cur[k] = fl
	if t.ager == nil && !t.closed {
		t.ager = time.AfterFunc(synAge, t.age)
	}
}

func (t *synTable) take(k synKey) (*flow.Flow, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if fl, ok := t.cur[k]; ok {
		delete(t.cur, k)
		return fl, true
	}
	fl, ok := t.old[k]
	delete(t.old, k)
	return fl, ok
}

// age drops the old generation and makes the current one old.
func (t *synTable) age() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.ager = nil
	if t.closed {
		return
	}
	t.old, t.cur = t.cur, nil
	if len(t.old) == 0 {
		t.old = nil
		return
	}
	t.ager = time.AfterFunc(synAge, t.age)
}

// len returns how many records are kept.
func (t *synTable) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.cur) + len(t.old)
}

// close stops the ageing.
func (t *synTable) close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.closed = true
	if t.ager != nil {
		t.ager.Stop()
		t.ager = nil
	}
}
