package stack

import (
	"container/list"
	"context"
	"errors"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"
)

// Pending dials (a guest SYN whose upstream connect is under way) have a
// budget of their own, apart from established connections, so that a SYN
// flood or a port scan cannot take the sandbox's other traffic down:
//   - at most 192 at once; a new one past that cancels the oldest,
//     which is the likeliest to be dead (a live host answers in
//     milliseconds);
//   - at most maxPendingPerDst to one address; more wait up to perDstWait
//     for one of those to finish (a burst to a live host goes through,
//     a flood at a dead one is refused);
//   - an address whose dial just failed as unreachable is refused at once
//     for deadFor, instead of a dial that waits for the kernel to give up.
const (
	defaultMaxPending = 192
	maxPendingPerDst  = 32
	perDstWait        = 3 * time.Second
	deadFor           = 5 * time.Second
	maxDeadAddrs      = 4096
)

type dialBudget struct {
	max, perDst int
	wait        time.Duration // perDstWait

	mu      sync.Mutex // mu protects everything below
	order   *list.List // of *pendingDial, oldest first
	perAddr map[netip.Addr]int
	dead    map[netip.Addr]time.Time
	freed   chan struct{} // closed (and replaced) whenever a dial ends
}

type pendingDial struct {
	dst    netip.Addr
	cancel context.CancelFunc
	el     *list.Element
}

func newDialBudget(max int) *dialBudget {
	if max <= 0 {
		max = defaultMaxPending
	}
	return &dialBudget{max: max, perDst: min(maxPendingPerDst, max), wait: perDstWait, order: list.New(),
		perAddr: make(map[netip.Addr]int), dead: make(map[netip.Addr]time.Time), freed: make(chan struct{})}
}

// Why a dial was refused before it started.
var (
	errDeadDst      = errors.New("destination unreachable a moment ago")
	errTooManyToDst = errors.New("too many pending dials to this destination")
)

// acquire admits a dial to dst under ctx, or says why not. The returned
// context is cancelled if the dial is evicted; release must follow.
func (b *dialBudget) acquire(ctx context.Context, dst netip.Addr) (*pendingDial, context.Context, error) {
	var timeout <-chan time.Time
	b.mu.Lock()
	defer b.mu.Unlock()
	for {
		if t, ok := b.dead[dst]; ok {
			if time.Since(t) < deadFor {
				return nil, nil, errDeadDst
			}
			delete(b.dead, dst)
		}
		if b.perAddr[dst] < b.perDst {
			break
		}
		if timeout == nil {
			tm := time.NewTimer(b.wait)
			defer tm.Stop()
			timeout = tm.C
		}
		freed := b.freed
		b.mu.Unlock()
		select {
		case <-freed:
			b.mu.Lock()
		case <-timeout:
			b.mu.Lock()
			return nil, nil, errTooManyToDst
		case <-ctx.Done():
			b.mu.Lock()
			return nil, nil, ctx.Err()
		}
	}
	if b.order.Len() >= b.max {
		oldest := b.order.Front().Value.(*pendingDial)
		oldest.cancel() // its dial fails now; its release frees the slot
		b.removeLocked(oldest)
	}
	ctx, cancel := context.WithCancel(ctx)
	p := &pendingDial{dst: dst, cancel: cancel}
	p.el = b.order.PushBack(p)
	b.perAddr[dst]++
	return p, ctx, nil
}

func (b *dialBudget) removeLocked(p *pendingDial) {
	if p.el == nil {
		return
	}
	b.order.Remove(p.el)
	p.el = nil
	if b.perAddr[p.dst]--; b.perAddr[p.dst] <= 0 {
		delete(b.perAddr, p.dst)
	}
	close(b.freed)
	b.freed = make(chan struct{})
}

// release ends a dial; err is how it failed, if it did. An address that
// is unreachable (or timed out) is refused at once for a while.
func (b *dialBudget) release(p *pendingDial, err error) {
	p.cancel()
	b.mu.Lock()
	defer b.mu.Unlock()
	b.removeLocked(p)
	if unreachable(err) {
		if len(b.dead) >= maxDeadAddrs {
			clear(b.dead)
		}
		b.dead[p.dst] = time.Now()
	}
}

func unreachable(err error) bool {
	return err != nil && (errors.Is(err, syscall.EHOSTUNREACH) || errors.Is(err, syscall.ENETUNREACH) ||
		errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded))
}

// pending returns the dials under way.
func (b *dialBudget) pending() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.order.Len()
}
