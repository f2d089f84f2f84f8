package rings

import (
	"sync"
	"testing"
)

func TestRingFIFO(t *testing.T) {
	r := NewRing[int](8)
	for lap := 0; lap < 3; lap++ {
		for i := 0; i < 8; i++ {
			if !r.Push(lap*100 + i) {
				t.Fatalf("lap %d: push %d refused with room left", lap, i)
			}
		}
		for i := 0; i < 8; i++ {
			v, ok := r.Pop()
			if !ok || v != lap*100+i {
				t.Fatalf("lap %d: pop %d: got %d,%v, want %d,true", lap, i, v, ok, lap*100+i)
			}
		}
		if v, ok := r.Pop(); ok {
			t.Fatalf("lap %d: pop from empty ring returned %d", lap, v)
		}
	}
}

func TestRingFull(t *testing.T) {
	r := NewRing[int](4)
	for i := 0; i < 4; i++ {
		if !r.Push(i) {
			t.Fatalf("push %d refused", i)
		}
	}
	if r.Push(99) {
		t.Fatal("push into a full ring accepted")
	}
	if got := r.Len(); got != 4 {
		t.Fatalf("Len: got %d, want 4", got)
	}
	if v, _ := r.Pop(); v != 0 {
		t.Fatalf("pop after full: got %d, want 0", v)
	}
	if !r.Push(4) {
		t.Fatal("push refused after a pop made room")
	}
}

func TestRingCapacityRoundsUp(t *testing.T) {
	for _, tc := range []struct{ in, want int }{{0, 2}, {1, 2}, {3, 4}, {1024, 1024}, {1025, 2048}} {
		if got := NewRing[int](tc.in).Cap(); got != tc.want {
			t.Errorf("NewRing(%d).Cap(): got %d, want %d", tc.in, got, tc.want)
		}
	}
}

// TestRingConcurrentNoLoss pushes from several producers into a small ring
// while several consumers pop; every value must come out exactly once, and
// each producer's values must come out in the order it pushed them.
func TestRingConcurrentNoLoss(t *testing.T) {
	const producers, consumers, each = 4, 3, 20000
	r := NewRing[int](64)
	var wg sync.WaitGroup
	for p := 0; p < producers; p++ {
		wg.Add(1)
		go func(p int) {
			defer wg.Done()
			for i := 0; i < each; i++ {
				for !r.Push(p*each + i) {
				}
			}
		}(p)
	}
	seen := make([][]int, consumers)
	var cwg sync.WaitGroup
	var total sync.WaitGroup
	total.Add(producers * each)
	done := make(chan struct{})
	for c := 0; c < consumers; c++ {
		cwg.Add(1)
		go func(c int) {
			defer cwg.Done()
			for {
				v, ok := r.Pop()
				if ok {
					seen[c] = append(seen[c], v)
					total.Done()
					continue
				}
				select {
				case <-done:
					return
				default:
				}
			}
		}(c)
	}
	total.Wait()
	close(done)
	cwg.Wait()
	wg.Wait()

	count := make([]int, producers*each)
	for c := range seen {
		last := make([]int, producers)
		for i := range last {
			last[i] = -1
		}
		for _, v := range seen[c] {
			count[v]++
			p, i := v/each, v%each
			if i <= last[p] {
				t.Fatalf("consumer %d saw producer %d's item %d after %d", c, p, i, last[p])
			}
			last[p] = i
		}
	}
	for v, n := range count {
		if n != 1 {
			t.Fatalf("value %d seen %d times, want once", v, n)
		}
	}
}

func TestSharedDropsWhenFull(t *testing.T) {
	s := NewShared(2, 64)
	for i := 0; i < 3; i++ {
		s.PushTx(s.Frames.Get())
		s.PushRx(s.Frames.Get())
	}
	if got := s.Counters.Drops(DropTxFull); got != 1 {
		t.Errorf("tx_full drops: got %d, want 1", got)
	}
	if got := s.Counters.Drops(DropRxFull); got != 1 {
		t.Errorf("rx_full drops: got %d, want 1", got)
	}
	select {
	case <-s.RxWake.C():
	default:
		t.Error("PushRx did not wake the writer")
	}
}

func BenchmarkRingPushPop(b *testing.B) {
	r := NewRing[*Frame](DefaultCapacity)
	f := &Frame{}
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		r.Push(f)
		r.Pop()
	}
}

func BenchmarkRingSPSC(b *testing.B) {
	r := NewRing[*Frame](DefaultCapacity)
	f := &Frame{}
	b.ReportAllocs()
	done := make(chan struct{})
	go func() {
		for n := 0; n < b.N; {
			if _, ok := r.Pop(); ok {
				n++
			}
		}
		close(done)
	}()
	for i := 0; i < b.N; i++ {
		for !r.Push(f) {
		}
	}
	<-done
}

func BenchmarkFramePool(b *testing.B) {
	p := NewPool(1514)
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		f := p.GetLen(1514)
		p.Put(f)
	}
}

// TestSharedBoundsBytes: a ring refuses frames past its byte bound even
// with slots free, and takes more once popped.
func TestSharedBoundsBytes(t *testing.T) {
	s := NewShared(64, 65536)
	s.SetMaxQueued(3 * (Headroom + SmallSize))
	for i := 0; i < 3; i++ {
		if !s.PushTx(s.Frames.Get()) {
			t.Fatalf("small frame %d refused under the bound", i)
		}
	}
	if s.PushTx(s.Frames.Get()) {
		t.Fatal("a frame past the byte bound was queued")
	}
	if s.PushTx(s.Frames.GetLarge()) {
		t.Fatal("a large frame past the byte bound was queued")
	}
	if got := s.Counters.Drops(DropTxFull); got != 2 {
		t.Errorf("drops: %d, want 2", got)
	}
	f, _ := s.PopTx()
	s.Frames.Put(f)
	if !s.PushTx(s.Frames.Get()) {
		t.Error("refused after a pop made room")
	}
	if tx, _ := s.Queued(); tx != 3*int64(Headroom+SmallSize) {
		t.Errorf("queued %d bytes", tx)
	}
}
