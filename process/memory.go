package process

import (
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Memory trimming: after a burst (a flood, a bulk transfer) the Go runtime
// keeps freed heap, and pooled buffers, for a while; the executable's code
// the burst ran stays mapped. An agent per sandbox should give that back
// promptly: every trimInterval, when the heap it retains is more than
// trimSlack above the least seen, it collects (twice, so that pooled frames
// go too), returns the free heap to the OS and releases the executable's
// pages again.
const (
	trimInterval = 5 * time.Second
	trimSlack    = 2 << 20
)

// startTrimmer returns memory to the OS after bursts, and sets Go's soft
// memory limit when limit > 0. activity counts what the agent did (frames
// moved): once it stops moving, the executable's pages are released again.
// stop ends it.
func startTrimmer(limit int64, activity func() uint64) (stop func()) {
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
		runtime.ReadMemStats(&ms)
		least := ms.HeapInuse + ms.HeapIdle - ms.HeapReleased + ms.StackInuse
		last, released := activity(), true
		for {
			select {
			case <-done:
				return
			case <-t.C:
			}
			runtime.ReadMemStats(&ms)
			retained := ms.HeapInuse + ms.HeapIdle - ms.HeapReleased + ms.StackInuse
			if retained > least+trimSlack {
				runtime.GC() // the pools' buffers move to their victim caches
				debug.FreeOSMemory()
				released = false
				runtime.ReadMemStats(&ms)
				retained = ms.HeapInuse + ms.HeapIdle - ms.HeapReleased + ms.StackInuse
			}
			least = min(least, retained)
			if now := activity(); now != last {
				last, released = now, false
			} else if !released {
				releaseImage() // a quiet interval after work
				released = true
			}
		}
	}()
	var once sync.Once
	return func() { once.Do(func() { close(done); wg.Wait() }) }
}

// releaseImage stops counting the pages of msbtap's own executable that
// set-up touched and the idle agent does not need: its read-only mappings
// (code and constants, never written) are advised random (no read-around:
// a page faults in alone) and dropped from this process (MADV_DONTNEED:
// they stay in the page cache, shared by every agent, and fault back in on
// use). It lowers each agent's RSS to what it really uses.
func releaseImage() {
	self, err := os.Executable()
	if err != nil {
		return
	}
	b, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 6 || f[5] != self || strings.Contains(f[1], "w") {
			continue // only the read-only mappings of the file (text, rodata)
		}
		lo, hi, ok := strings.Cut(f[0], "-")
		if !ok {
			continue
		}
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 != nil || err2 != nil {
			continue
		}
		for _, advice := range []uintptr{unix.MADV_RANDOM, unix.MADV_DONTNEED} {
			_, _, _ = unix.Syscall(unix.SYS_MADVISE, uintptr(start), uintptr(end-start), advice)
		}
	}
}
