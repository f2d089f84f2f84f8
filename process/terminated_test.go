package process

import (
	"fmt"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestTerminatedNoticeNeverBlocks: the --terminated-fd notice is written
// on the packet path before the network is cut; a supervisor whose pipe
// is full (it stopped reading) must not hold the cut back. Before, the
// write blocked until the pipe had room.
func TestTerminatedNoticeNeverBlocks(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	fd, err := unix.Dup(int(w.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	w.Close()
	defer unix.Close(fd)
	p := &Process{cfg: Config{ReadyFD: -1, TerminatedFD: fd}}
	if err := p.openFDs(); err != nil {
		t.Fatal(err)
	}
	// Fill the pipe through an open file description of its own (one
	// that never blocks), so that the filling cannot hang whatever
	// openFDs did to fd's.
	filler, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", fd), unix.O_WRONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(filler)
	for {
		if _, err := unix.Write(filler, make([]byte, 4096)); err != nil {
			break
		}
	}
	done := make(chan struct{})
	go func() { p.halt().Notify(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("the notice blocked on a full pipe")
	}
}
