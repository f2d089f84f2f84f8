package stack

import (
	"context"
	"net/netip"
	"syscall"
	"testing"
	"time"
)

func TestDialBudget(t *testing.T) {
	b := newDialBudget(3)
	b.perDst, b.wait = 2, 50*time.Millisecond
	a, c := netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("198.51.100.2")
	p1, ctx1, err := b.acquire(context.Background(), a)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := b.acquire(context.Background(), a); err != nil {
		t.Fatal(err)
	}
	if _, _, err := b.acquire(context.Background(), a); err != errTooManyToDst {
		t.Fatalf("third dial to one address: %v, want the per-destination cap", err)
	}
	p3, _, _ := b.acquire(context.Background(), c)
	// The budget is full: a new dial cancels the oldest.
	p4, _, err := b.acquire(context.Background(), netip.MustParseAddr("198.51.100.3"))
	if err != nil {
		t.Fatal(err)
	}
	if ctx1.Err() == nil {
		t.Fatal("the oldest pending dial was not cancelled")
	}
	if n := b.pending(); n != 3 {
		t.Errorf("pending %d, want 3", n)
	}
	b.release(p1, context.Canceled) // the evicted dial ends: nothing to free twice
	if n := b.pending(); n != 3 {
		t.Errorf("pending %d after the evicted dial ended, want 3", n)
	}
	// An unreachable address is refused at once for a while.
	b.release(p3, syscall.EHOSTUNREACH)
	if _, _, err := b.acquire(context.Background(), c); err != errDeadDst {
		t.Errorf("dial to an address just found unreachable: %v", err)
	}
	b.release(p4, nil)
	if _, _, err := b.acquire(context.Background(), netip.MustParseAddr("198.51.100.3")); err != nil {
		t.Errorf("a reachable address: %v", err)
	}
}

// A dial over the per-destination cap waits for one to that address to
// end, and then goes ahead.
func TestDialBudgetWaitsForASlot(t *testing.T) {
	b := newDialBudget(10)
	b.perDst = 1
	a := netip.MustParseAddr("198.51.100.1")
	p1, _, err := b.acquire(context.Background(), a)
	if err != nil {
		t.Fatal(err)
	}
	time.AfterFunc(50*time.Millisecond, func() { b.release(p1, nil) })
	start := time.Now()
	p2, _, err := b.acquire(context.Background(), a)
	if err != nil || time.Since(start) < 40*time.Millisecond {
		t.Fatalf("the waiting dial: %v after %s", err, time.Since(start))
	}
	b.release(p2, nil)
}
