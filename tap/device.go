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
// thread, and Close wakes it, until Detach hands the descriptor to an
// event loop of our own.
type File struct {
	name  string
	f     *os.File // nil once detached
	fd    int      // the descriptor after Detach (-1 before)
	batch int
	vnet  int
	once  sync.Once
	err   error
}

var _ Device = (*File)(nil)

// NewFile wraps an open, non-blocking TAP file; vnetHdrLen is the length of
// its virtio net header (0 for plain frames).
func NewFile(f *os.File, name string, vnetHdrLen int) *File {
	return &File{name: name, f: f, fd: -1, batch: DefaultBatch, vnet: vnetHdrLen}
}

// Detach takes the descriptor out of the Go runtime poller and returns it
// (non-blocking, valid until Close), for an event loop that waits on it
// and reads it with ReadNow: the runtime's poller no longer wakes up for
// every frame that nobody waits for there. From then on Read fails and
// Write writes directly. The caller must make sure no Read or Write is
// under way while it detaches.
func (d *File) Detach() (int, error) {
	if d.f == nil {
		return d.fd, nil
	}
	rc, err := d.f.SyscallConn()
	if err != nil {
		return -1, closedOr(err)
	}
	fd := -1
	var derr error
	// A second descriptor of the same open file; closing the first takes
	// it out of the runtime's epoll set (not f.Fd(): that would make the
	// file blocking).
	if cerr := rc.Control(func(old uintptr) {
		fd, derr = unix.FcntlInt(old, unix.F_DUPFD_CLOEXEC, 0)
	}); cerr != nil {
		return -1, closedOr(cerr)
	}
	if derr != nil {
		return -1, fmt.Errorf("detach %s: %w", d.name, derr)
	}
	if err := d.f.Close(); err != nil {
		unix.Close(fd)
		return -1, closedOr(err)
	}
	d.f, d.fd = nil, fd
	return fd, nil
}

// ReadNow is Read without waiting, on a detached descriptor: it returns 0
// frames when none is ready.
func (d *File) ReadNow(bufs, spill [][]byte, sizes []int) (int, error) {
	if d.f != nil {
		return 0, errors.New("tap: ReadNow before Detach")
	}
	n, err := readFrames(d.fd, bufs, spill, sizes)
	if n > 0 {
		return n, nil
	}
	if err == unix.EBADF {
		return 0, os.ErrClosed
	}
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", d.name, err)
	}
	return 0, nil
}

// readFrames reads up to len(bufs) frames from the non-blocking fd; it
// stops at EAGAIN (returning what it read, and a nil error) or at another
// error.
func readFrames(fd int, bufs, spill [][]byte, sizes []int) (int, error) {
	n := 0
	var iov [2][]byte
	for n < len(bufs) {
		var m int
		var e error
		if spill != nil && spill[n] != nil {
			iov[0], iov[1] = bufs[n], spill[n]
			m, e = unix.Readv(fd, iov[:])
		} else {
			m, e = unix.Read(fd, bufs[n])
		}
		switch e {
		case nil:
			sizes[n] = m
			n++
		case unix.EINTR:
		case unix.EAGAIN:
			return n, nil
		default:
			return n, e
		}
	}
	return n, nil
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
	if d.f == nil {
		return 0, errors.New("tap: Read of a detached device (its event loop reads it)")
	}
	rc, err := d.f.SyscallConn()
	if err != nil {
		return 0, closedOr(err)
	}
	n := 0
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		var m int
		m, rerr = readFrames(int(fd), bufs[n:], spillFrom(spill, n), sizes[n:])
		n += m
		return n > 0 || rerr != nil
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

func spillFrom(spill [][]byte, n int) [][]byte {
	if spill == nil {
		return nil
	}
	return spill[n:]
}

// Write implements Device.
func (d *File) Write(bufs [][]byte) (int, error) {
	if d.f == nil {
		return writeDirect(d.fd, d.name, bufs)
	}
	rc, err := d.f.SyscallConn()
	if err != nil {
		return 0, closedOr(err)
	}
	n := 0
	var werr error
	err = rc.Write(func(fd uintptr) bool {
		var m int
		m, werr = writeFrames(int(fd), bufs[n:])
		n += m
		return werr != unix.EAGAIN
	})
	if err != nil {
		return n, closedOr(err)
	}
	if werr != nil {
		return n, fmt.Errorf("write %s: %w", d.name, werr)
	}
	return n, nil
}

// writeDirect writes frames to a detached descriptor, waiting in poll(2)
// when the device pushes back (a TAP seldom does).
func writeDirect(fd int, name string, bufs [][]byte) (int, error) {
	n := 0
	for {
		m, err := writeFrames(fd, bufs[n:])
		n += m
		switch err {
		case nil:
			return n, nil
		case unix.EAGAIN:
			pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
			_, _ = unix.Poll(pfd, 100)
		case unix.EBADF:
			return n, os.ErrClosed
		default:
			return n, fmt.Errorf("write %s: %w", name, err)
		}
	}
}

// writeFrames writes each of bufs as one frame, stopping at EAGAIN or an
// error; a frame the kernel refuses (too large, malformed) is skipped
// rather than wedge the writer.
func writeFrames(fd int, bufs [][]byte) (int, error) {
	n := 0
	for n < len(bufs) {
		_, e := unix.Write(fd, bufs[n])
		switch e {
		case nil, unix.EINVAL, unix.EMSGSIZE, unix.EFAULT:
			n++
		case unix.EINTR:
		default:
			return n, e
		}
	}
	return n, nil
}

// Close implements Device.
func (d *File) Close() error {
	d.once.Do(func() {
		if d.f != nil {
			d.err = d.f.Close()
		} else {
			d.err = unix.Close(d.fd)
		}
	})
	return d.err
}

func closedOr(err error) error {
	if errors.Is(err, os.ErrClosed) {
		return os.ErrClosed
	}
	return err
}
