package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"

	"github.com/msbtap/msbtap/flow"
)

// relayBufSize is the size of each direction's copy buffer.
const relayBufSize = 64 << 10

var relayBufs = sync.Pool{New: func() any { b := make([]byte, relayBufSize); return &b }}

// Resetter is a connection that can be aborted with a TCP reset.
type Resetter interface {
	Reset()
}

// halfCloser is a connection whose write side can be shut on its own.
type halfCloser interface {
	CloseWrite() error
}

// Relay copies a→b and b→a until both directions end, then closes both.
// Each direction is half-closed on its own: when a reaches EOF (its peer
// sent FIN), b's write side is shut, and the other direction goes on. If a
// direction fails (a reset, say), both connections are reset so that both
// ends see it: nothing is silently truncated. abm and bam, when not nil,
// count (and pace) the bytes a→b and b→a as they go. Relay returns the
// bytes copied a→b and b→a, and the first error either direction met (nil
// when both ended cleanly).
func Relay(a, b net.Conn, abm, bam *flow.Meter) (ab, ba int64, err error) {
	type result struct {
		aToB bool
		n    int64
		err  error
	}
	done := make(chan result, 2)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var abort sync.Once
	fail := func() {
		abort.Do(func() {
			cancel()
			reset(a)
			reset(b)
		})
	}
	go func() { n, err := pipe(ctx, b, a, abm, fail); done <- result{true, n, err} }()
	go func() { n, err := pipe(ctx, a, b, bam, fail); done <- result{false, n, err} }()
	for range 2 {
		r := <-done
		if r.aToB {
			ab = r.n
		} else {
			ba = r.n
		}
		if err == nil {
			err = r.err // the first to fail is the cause; the other saw the reset
		}
	}
	a.Close()
	b.Close()
	return ab, ba, err
}

// pipe copies src→dst, through m if given. At src's EOF it shuts dst's
// write side; on any error it calls fail, which resets both ends.
func pipe(ctx context.Context, dst, src net.Conn, m *flow.Meter, fail func()) (int64, error) {
	bp := relayBufs.Get().(*[]byte)
	defer relayBufs.Put(bp)
	buf := *bp
	var total int64
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			if m != nil {
				if err := m.Shaper.Wait(ctx, n); err != nil {
					fail()
					return total, err
				}
			}
			w, werr := dst.Write(buf[:n])
			total += int64(w)
			if m != nil {
				m.Bytes.Add(uint64(w))
			}
			if werr != nil {
				fail()
				return total, werr
			}
		}
		if rerr == nil {
			continue
		}
		if errors.Is(rerr, io.EOF) {
			if hc, ok := dst.(halfCloser); ok {
				if err := hc.CloseWrite(); err != nil && !errors.Is(err, net.ErrClosed) {
					fail()
					return total, err
				}
			} else {
				dst.Close()
			}
			return total, nil
		}
		fail()
		return total, rerr
	}
}

// ResetConn aborts c with a TCP reset where it can, or closes it.
func ResetConn(c net.Conn) { reset(c) }

// reset aborts c with a TCP reset where it can, or closes it.
func reset(c net.Conn) {
	switch c := c.(type) {
	case Resetter:
		c.Reset()
	case *net.TCPConn:
		_ = c.SetLinger(0)
		c.Close()
	default:
		c.Close()
	}
}
