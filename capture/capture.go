// Package capture writes the sandbox's frames, both ways, to a pcap file
// that tcpdump and Wireshark read, bounded in size by rotation, without
// ever slowing the data path: frames are copied into a bounded queue that
// a writer goroutine drains, and a full queue drops (and counts) frames.
package capture

import (
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"
	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/internal/safefile"
)

// Defaults.
const (
	DefaultMaxBytes = 100 << 20
	queueLen        = 4096
	snapLen         = 65536 + 256
)

type frame struct {
	at   time.Time
	data []byte
}

// Capture is a running capture.
type Capture struct {
	path     string
	maxBytes int64
	rotate   bool // false: the file was handed over, and stops at maxBytes

	mu      sync.RWMutex // mu protects closed against Frame racing Close
	closed  bool
	q       chan frame
	dropped atomic.Uint64
	written atomic.Uint64
	done    chan struct{}
	once    sync.Once

	reopen func() (*os.File, error) // rotates in another process; nil: here
	f      *os.File
	w      *pcapgo.Writer
	size   int64
}

// Start opens path (without following a symbolic link, mode 0600) and
// starts writing; the file rotates to PATH.1 past maxBytes (0: the
// default), so a capture takes at most twice that on disk.
func Start(path string, maxBytes int64) (*Capture, error) { return StartRotating(path, maxBytes, nil) }

// StartRotating is Start for a process that may no longer create files
// itself (the agent once set up): reopen moves PATH to PATH.1 and returns
// PATH opened anew, empty, for writing.
func StartRotating(path string, maxBytes int64, reopen func() (*os.File, error)) (*Capture, error) {
	if maxBytes <= 0 {
		maxBytes = DefaultMaxBytes
	}
	c := &Capture{path: path, maxBytes: maxBytes, rotate: true, reopen: reopen, q: make(chan frame, queueLen), done: make(chan struct{})}
	if err := c.open(); err != nil {
		return nil, err
	}
	go c.routineWrite()
	return c, nil
}

// StartFile writes to f, a regular file open for writing that someone else
// opened (the control socket's client, as itself), from its current
// offset; name is what Path reports. A file handed over cannot rotate: past
// maxBytes (0: the default) further frames are dropped and counted.
// StartFile owns f from then on, also when it fails.
func StartFile(f *os.File, name string, maxBytes int64) (*Capture, error) {
	if maxBytes <= 0 {
		maxBytes = DefaultMaxBytes
	}
	st, err := f.Stat()
	if err == nil && !st.Mode().IsRegular() {
		err = fmt.Errorf("%s: not a regular file", name)
	}
	if err == nil {
		err = checkWritable(f, name)
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	c := &Capture{path: name, maxBytes: maxBytes, q: make(chan frame, queueLen), done: make(chan struct{})}
	if err := c.start(f); err != nil {
		return nil, err
	}
	go c.routineWrite()
	return c, nil
}

// checkWritable fails unless f was opened for writing.
func checkWritable(f *os.File, name string) error {
	fl, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0)
	if err != nil {
		return err
	}
	if m := fl & unix.O_ACCMODE; m != unix.O_WRONLY && m != unix.O_RDWR {
		return fmt.Errorf("%s: not open for writing", name)
	}
	return nil
}

// next closes the full file and starts PATH anew, the full one kept as
// PATH.1.
func (c *Capture) next() error {
	if c.reopen != nil {
		f, err := c.reopen()
		c.f.Close()
		if err != nil {
			return err
		}
		return c.start(f)
	}
	c.f.Close()
	os.Rename(c.path, c.path+".1")
	return c.open()
}

func (c *Capture) open() error {
	f, err := safefile.OpenNoFollow(c.path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	return c.start(f)
}

// start writes the file header to f and makes it the file written.
func (c *Capture) start(f *os.File) error {
	w := pcapgo.NewWriter(f)
	if err := w.WriteFileHeader(snapLen, layers.LinkTypeEthernet); err != nil {
		f.Close()
		return fmt.Errorf("%s: %w", c.path, err)
	}
	c.f, c.w, c.size = f, w, 24
	return nil
}

// Frame queues a copy of one frame. It never blocks: a full queue drops it.
func (c *Capture) Frame(b []byte) {
	if c == nil {
		return
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.closed {
		return
	}
	if len(c.q) == cap(c.q) {
		c.dropped.Add(1)
		return
	}
	fr := frame{at: time.Now(), data: append([]byte(nil), b...)}
	select {
	case c.q <- fr:
	default:
		c.dropped.Add(1)
	}
}

func (c *Capture) routineWrite() {
	defer close(c.done)
	for fr := range c.q {
		n := int64(16 + len(fr.data))
		if c.size+n > c.maxBytes && !c.rotate {
			c.dropped.Add(1)
			continue
		}
		if c.size+n > c.maxBytes && c.size > 24 {
			if err := c.next(); err != nil {
				for range c.q { // keep draining, write nothing
					c.dropped.Add(1)
				}
				return
			}
		}
		ci := gopacket.CaptureInfo{Timestamp: fr.at, CaptureLength: len(fr.data), Length: len(fr.data)}
		if err := c.w.WritePacket(ci, fr.data); err != nil {
			c.dropped.Add(1)
			continue
		}
		c.size += n
		c.written.Add(1)
	}
	c.f.Close()
}

// Stats returns the frames written and dropped.
func (c *Capture) Stats() (written, dropped uint64) { return c.written.Load(), c.dropped.Load() }

// Path returns the file written.
func (c *Capture) Path() string { return c.path }

// Close writes what is queued and closes the file; frames given after it
// are ignored. Safe to call twice.
func (c *Capture) Close() {
	c.once.Do(func() {
		c.mu.Lock()
		c.closed = true
		close(c.q)
		c.mu.Unlock()
		<-c.done
	})
}
