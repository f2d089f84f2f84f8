// Package wake provides a coalescing waker: any number of Wake calls made
// before the consumer drains cost it a single wake-up.
package wake

import "sync/atomic"

// Waker signals a single consumer that work is pending. Producers call Wake
// after they publish work; the consumer waits on C, then drains everything it
// finds before waiting again. A Wake that arrives while a wake-up is already
// pending is absorbed, so bursts of producers never queue more than one
// wake-up and never block.
type Waker struct {
	ch      chan struct{}
	wakes   atomic.Uint64
	wakeups atomic.Uint64
}

// New returns a Waker with no wake-up pending.
func New() *Waker {
	return &Waker{ch: make(chan struct{}, 1)}
}

// Wake makes a wake-up pending. It never blocks.
func (w *Waker) Wake() {
	w.wakes.Add(1)
	select {
	case w.ch <- struct{}{}:
		w.wakeups.Add(1)
	default:
	}
}

// C returns the channel the consumer receives from to wait for a wake-up.
// A receive consumes the pending wake-up.
func (w *Waker) C() <-chan struct{} {
	return w.ch
}

// Wait blocks until a wake-up is pending, then consumes it.
func (w *Waker) Wait() {
	<-w.ch
}

// Stats reports how many Wake calls were made and how many of them turned
// into a wake-up for the consumer; the difference is what coalescing saved.
func (w *Waker) Stats() (wakes, wakeups uint64) {
	return w.wakes.Load(), w.wakeups.Load()
}
