// Package taptest provides a channel-backed tap.Device for tests that need no
// root and no kernel device.
package taptest

import (
	"os"
	"sync"
)

// Device is an in-memory tap.Device. Frames given to Inject are what Read
// returns (frames "sent by the guest"); frames passed to Write appear on
// Written (frames "received by the guest").
type Device struct {
	in      chan []byte
	Written chan []byte
	done    chan struct{}
	once    sync.Once
	batch   int
}

// New returns a fake device whose Written channel buffers up to queue frames;
// Write blocks when the test does not read them.
func New(queue int) *Device {
	return &Device{
		in:      make(chan []byte, queue),
		Written: make(chan []byte, queue),
		done:    make(chan struct{}),
		batch:   16,
	}
}

// Inject queues a frame for Read.
func (d *Device) Inject(frame []byte) { d.in <- append([]byte(nil), frame...) }

// Name implements tap.Device.
func (d *Device) Name() string { return "taptest0" }

// VNetHdrLen implements tap.Device: the fake carries plain frames.
func (d *Device) VNetHdrLen() int { return 0 }

// BatchSize implements tap.Device.
func (d *Device) BatchSize() int { return d.batch }

// Read implements tap.Device: as readv would, a frame fills bufs[i] and
// then spill[i]; what fits neither is cut off (the size says so).
func (d *Device) Read(bufs, spill [][]byte, sizes []int) (int, error) {
	select {
	case <-d.done:
		return 0, os.ErrClosed
	case f := <-d.in:
		n := 0
		for {
			c := copy(bufs[n], f)
			if spill != nil && spill[n] != nil {
				copy(spill[n], f[c:])
			}
			sizes[n] = len(f)
			n++
			if n == len(bufs) {
				return n, nil
			}
			select {
			case f = <-d.in:
			default:
				return n, nil
			}
		}
	}
}

// Write implements tap.Device.
func (d *Device) Write(bufs [][]byte) (int, error) {
	for i, b := range bufs {
		select {
		case <-d.done:
			return i, os.ErrClosed
		case d.Written <- append([]byte(nil), b...):
		}
	}
	return len(bufs), nil
}

// Close implements tap.Device.
func (d *Device) Close() error {
	d.once.Do(func() { close(d.done) })
	return nil
}
