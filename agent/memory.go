package agent

import (
	"runtime"
	"runtime/debug"
	"sync"
	"time"
)

// Memory trimming: after a burst (a flood, a bulk transfer) the Go runtime
// keeps freed heap for a while before its scavenger returns it. An agent
// per sandbox should give it back promptly, so every trimInterval it
// returns idle heap to the OS once that is more than trimSlack.
const (
	trimInterval = 10 * time.Second
	trimSlack    = 4 << 20
)

// startTrimmer returns memory to the OS after bursts, and sets Go's soft
// memory limit when limit > 0. stop ends it.
func startTrimmer(limit int64) (stop func()) {
	if limit > 0 {
		debug.SetMemoryLimit(limit)
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(trimInterval)
		defer t.Stop()
		var ms runtime.MemStats
		for {
			select {
			case <-done:
				return
			case <-t.C:
				runtime.ReadMemStats(&ms)
				if ms.HeapIdle-ms.HeapReleased > trimSlack {
					debug.FreeOSMemory()
				}
			}
		}
	}()
	var once sync.Once
	return func() { once.Do(func() { close(done); wg.Wait() }) }
}
