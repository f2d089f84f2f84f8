package intercept

import (
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// holdEOF keeps a client's half-close from cancelling the request it has
// just sent. Go's HTTP/1 server reads on in the background while a handler
// runs, and takes the end of the client's stream for a client that went
// away: it cancels the request's context, so the upstream request was cut
// and the client, still reading, got a 200 with an empty body (`nc -N`
// and other clients that shut their write side after the request do
// this). So the end of the stream is held back from that background read
// while a request is being served: the read waits until the request is
// done (the server then takes it back with a deadline in the past, which
// this honours), and the end is reported when the server reads for the
// next request and closes the connection.
//
// Only the background read is held: net/http makes it with a one-byte
// buffer, while its other reads go through a 4 KiB bufio.Reader, so they
// ask for 4 KiB or more. A body cut short by a half-close must end the
// request at once, not wait for it. Should net/http change the size of its
// background read, a half-close would cancel the request again (as before
// this type), never hang it; TestHalfCloseAfterRequest would say so.
type holdEOF struct {
	net.Conn
	eof      atomic.Bool // the client's side has ended
	mu       sync.Mutex
	active   bool // a request is being served
	closed   bool
	deadline time.Time
	change   chan struct{} // closed (and replaced) when the fields above change
}

func newHoldEOF(c net.Conn) *holdEOF { return &holdEOF{Conn: c, change: make(chan struct{})} }

// changedLocked wakes the reads waiting on the fields.
func (c *holdEOF) changedLocked() {
	close(c.change)
	c.change = make(chan struct{})
}

func (c *holdEOF) Read(b []byte) (int, error) {
	if !c.eof.Load() {
		n, err := c.Conn.Read(b)
		if n > 0 || !errors.Is(err, io.EOF) {
			return n, err
		}
		c.eof.Store(true)
	}
	if len(b) != 1 { // not the server's background read
		return 0, io.EOF
	}
	return 0, c.waitEOF()
}

// waitEOF returns io.EOF once no request is being served, or a timeout
// once the read deadline passes.
func (c *holdEOF) waitEOF() error {
	for {
		c.mu.Lock()
		active, closed, deadline, change := c.active, c.closed, c.deadline, c.change
		c.mu.Unlock()
		if !active || closed {
			return io.EOF
		}
		if deadline.IsZero() {
			<-change
			continue
		}
		d := time.Until(deadline)
		if d <= 0 {
			return os.ErrDeadlineExceeded
		}
		t := time.NewTimer(d)
		select {
		case <-change:
			t.Stop()
		case <-t.C:
			return os.ErrDeadlineExceeded
		}
	}
}

func (c *holdEOF) SetReadDeadline(t time.Time) error {
	c.readDeadline(t)
	return c.Conn.SetReadDeadline(t)
}

func (c *holdEOF) SetDeadline(t time.Time) error {
	c.readDeadline(t)
	return c.Conn.SetDeadline(t)
}

// readDeadline tells a read waiting for the end of a request when to give
// up.
func (c *holdEOF) readDeadline(t time.Time) {
	c.mu.Lock()
	c.deadline = t
	c.changedLocked()
	c.mu.Unlock()
}

func (c *holdEOF) Close() error {
	c.mu.Lock()
	c.closed = true
	c.changedLocked()
	c.mu.Unlock()
	return c.Conn.Close()
}

// state follows the server's view of the connection (its ConnState hook).
func (c *holdEOF) state(st http.ConnState) {
	c.mu.Lock()
	c.active = st == http.StateActive
	c.changedLocked()
	c.mu.Unlock()
}

// CloseWrite passes the server's half-close after a last answer on to the
// connection (TLS close_notify, TCP FIN), as it did before this wrapper
// hid the connection's type from it.
func (c *holdEOF) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}
