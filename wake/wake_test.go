package wake

import (
	"sync"
	"testing"
	"time"
)

func TestWakeCoalesces(t *testing.T) {
	w := New()
	for i := 0; i < 100; i++ {
		w.Wake()
	}
	select {
	case <-w.C():
	default:
		t.Fatal("no wake-up pending after 100 wakes")
	}
	select {
	case <-w.C():
		t.Fatal("got a second wake-up; want the 100 wakes coalesced into one")
	default:
	}
	wakes, wakeups := w.Stats()
	if wakes != 100 || wakeups != 1 {
		t.Fatalf("stats: got wakes=%d wakeups=%d, want 100 and 1", wakes, wakeups)
	}
}

func TestWakeAfterDrainWakesAgain(t *testing.T) {
	w := New()
	w.Wake()
	w.Wait()
	w.Wake()
	select {
	case <-w.C():
	case <-time.After(time.Second):
		t.Fatal("a wake after a drain was lost")
	}
}

// TestNoLostWakeup checks the producer/consumer protocol the rings rely on:
// publish, then Wake; the consumer drains, then waits. No published item may
// be left behind while the consumer sleeps.
func TestNoLostWakeup(t *testing.T) {
	w := New()
	const producers, each = 4, 10000
	var mu sync.Mutex
	pending := 0
	var wg sync.WaitGroup
	for p := 0; p < producers; p++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				mu.Lock()
				pending++
				mu.Unlock()
				w.Wake()
			}
		}()
	}
	got := 0
	deadline := time.After(10 * time.Second)
	for got < producers*each {
		select {
		case <-w.C():
		case <-deadline:
			t.Fatalf("consumer stuck with %d of %d items", got, producers*each)
		}
		mu.Lock()
		got += pending
		pending = 0
		mu.Unlock()
	}
	wg.Wait()
}

func BenchmarkWake(b *testing.B) {
	w := New()
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		w.Wake()
		if i%64 == 63 {
			w.Wait()
		}
	}
}

func BenchmarkWakeWait(b *testing.B) {
	w := New()
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		w.Wake()
		w.Wait()
	}
}
