// Package tap is the sandbox's TAP device: made inside the sandbox's
// namespace (or on the host for a VMM) and configured there, with its virtio
// net header, and the pump that moves its frames to and from the shared
// rings.
package tap

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// Device is a frame device read and written in batches. Buffers belong to the
// caller, so the hot path allocates nothing.
type Device interface {
	// Read reads up to len(bufs) frames, blocking until at least one is
	// available, and stores each frame's length in sizes. Frame i fills
	// bufs[i] and, past its end, spill[i] (one readv): small frames take
	// small buffers, and a large one spills over. spill, or spill[i], may be
	// nil. It returns the number of frames read. After Close it returns
	// os.ErrClosed.
	Read(bufs, spill [][]byte, sizes []int) (int, error)
	// Write writes each of bufs as one frame and returns how many it wrote.
	Write(bufs [][]byte) (int, error)
	// Name is the interface name.
	Name() string
	// BatchSize is the largest batch Read fills in one call.
	BatchSize() int
	// VNetHdrLen is the length of the virtio net header that precedes
	// every frame read and written (0: plain frames).
	VNetHdrLen() int
	// Close releases the device; it is safe to call more than once.
	Close() error
}

// DefaultBatch is the number of frames read or written per call.
const DefaultBatch = 64

// File is a Device backed by a TAP file descriptor. Reads and writes go
// through the Go runtime poller, so a blocked Read parks a goroutine, not a
// thread, and Close wakes it.
type File struct {
	name  string
	f     *os.File
	batch int
	vnet  int
	once  sync.Once
	err   error
}

var _ Device = (*File)(nil)

// NewFile wraps an open, non-blocking TAP file; vnetHdrLen is the length of
// its virtio net header (0 for plain frames).
func NewFile(f *os.File, name string, vnetHdrLen int) *File {
	return &File{name: name, f: f, batch: DefaultBatch, vnet: vnetHdrLen}
}

// VNetHdrLen implements Device.
func (d *File) VNetHdrLen() int { return d.vnet }

// Name implements Device.
func (d *File) Name() string { return d.name }

// BatchSize implements Device.
func (d *File) BatchSize() int { return d.batch }

// Read implements Device. It drains every frame that is ready, up to
// len(bufs), in one trip through the poller.
func (d *File) Read(bufs, spill [][]byte, sizes []int) (int, error) {
	rc, err := d.f.SyscallConn()
	if err != nil {
		return 0, closedOr(err)
	}
	n := 0
	var rerr error
	var iov [2][]byte
	err = rc.Read(func(fd uintptr) bool {
		for n < len(bufs) {
			var m int
			var e error
			if spill != nil && spill[n] != nil {
				iov[0], iov[1] = bufs[n], spill[n]
				m, e = unix.Readv(int(fd), iov[:])
			} else {
				m, e = unix.Read(int(fd), bufs[n])
			}
			if e == unix.EINTR {
				continue
			}
			if e == unix.EAGAIN {
				return n > 0
			}
			if e != nil {
				rerr = e
				return true
			}
			sizes[n] = m
			n++
		}
		return true
	})
	if n > 0 {
		return n, nil
	}
	if err != nil {
		return 0, closedOr(err)
	}
	if rerr != nil {
		return 0, fmt.Errorf("read %s: %w", d.name, rerr)
	}
	return 0, nil
}

// Write implements Device.
func (d *File) Write(bufs [][]byte) (int, error) {
	rc, err := d.f.SyscallConn()
	if err != nil {
		return 0, closedOr(err)
	}
	n := 0
	var werr error
	err = rc.Write(func(fd uintptr) bool {
		for n < len(bufs) {
			_, e := unix.Write(int(fd), bufs[n])
			switch e {
			case nil:
				n++
			case unix.EINTR:
			case unix.EAGAIN:
				return false
			case unix.EINVAL, unix.EMSGSIZE, unix.EFAULT:
				// The kernel refused this frame (too large, malformed):
				// skip it rather than wedge the writer.
				n++
			default:
				werr = e
				return true
			}
		}
		return true
	})
	if err != nil {
		return n, closedOr(err)
	}
	if werr != nil {
		return n, fmt.Errorf("write %s: %w", d.name, werr)
	}
	return n, nil
}

// Close implements Device.
func (d *File) Close() error {
	d.once.Do(func() { d.err = d.f.Close() })
	return d.err
}

func closedOr(err error) error {
	if errors.Is(err, os.ErrClosed) {
		return os.ErrClosed
	}
	return err
}
