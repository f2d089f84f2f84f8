package flow

import (
	"context"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// Shaper paces one direction of the sandbox's traffic as a whole: a token
// bucket (golang.org/x/time/rate) every relay of that direction draws
// from. Streams wait for tokens, so their peers slow down through TCP's own
// flow control, and nothing is dropped. Its rate can change while it runs;
// a zero rate means no limit.
type Shaper struct {
	l atomic.Pointer[rate.Limiter]
}

// shapeBurst is the most a relay draws at once: the size of proxy's copy
// buffer, so that one read's bytes wait for one draw.
const shapeBurst = 64 << 10

// Set sets the rate in bytes per second (0: no limit).
func (s *Shaper) Set(bytesPerSecond float64) {
	if bytesPerSecond <= 0 {
		s.l.Store(nil)
		return
	}
	s.l.Store(rate.NewLimiter(rate.Limit(bytesPerSecond), shapeBurst))
}

// Rate returns the rate in bytes per second (0: no limit).
func (s *Shaper) Rate() float64 {
	if s == nil {
		return 0
	}
	if l := s.l.Load(); l != nil {
		return float64(l.Limit())
	}
	return 0
}

// Wait blocks until n bytes may pass (or ctx ends).
func (s *Shaper) Wait(ctx context.Context, n int) error {
	if s == nil {
		return nil
	}
	l := s.l.Load()
	if l == nil {
		return nil
	}
	for n > 0 {
		c := min(n, shapeBurst)
		if err := l.WaitN(ctx, c); err != nil {
			return err
		}
		n -= c
	}
	return nil
}

// Allow reports whether n bytes may pass now (for datagrams, which cannot
// wait: one over the rate is dropped).
func (s *Shaper) Allow(n int) bool {
	if s == nil {
		return true
	}
	l := s.l.Load()
	return l == nil || l.AllowN(timeNow(), min(n, shapeBurst))
}

// Meter counts one direction of one flow and paces it by a Shaper (nil:
// unlimited).
type Meter struct {
	Bytes  atomic.Uint64
	Shaper *Shaper
}

// timeNow is time.Now; a variable for tests.
var timeNow = time.Now
