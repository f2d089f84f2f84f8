package proxy

import (
	"context"
	"net"

	"github.com/msbtap/msbtap/flow"
)

// WrapConn returns c with prefix replayed before its own bytes, what is
// read counted (and paced) by rm and what is written by wm (either may be
// nil). Reset and CloseWrite pass through to c, so relays treat it as c.
func WrapConn(c net.Conn, prefix []byte, rm, wm *flow.Meter) net.Conn {
	return &wrappedConn{Conn: c, prefix: prefix, rm: rm, wm: wm}
}

type wrappedConn struct {
	net.Conn
	prefix []byte
	rm, wm *flow.Meter
}

func (c *wrappedConn) Read(b []byte) (int, error) {
	var n int
	var err error
	if len(c.prefix) > 0 {
		n = copy(b, c.prefix)
		c.prefix = c.prefix[n:]
	} else {
		n, err = c.Conn.Read(b)
	}
	if n > 0 && c.rm != nil {
		c.rm.Shaper.Wait(context.Background(), n)
		c.rm.Bytes.Add(uint64(n))
	}
	return n, err
}

func (c *wrappedConn) Write(b []byte) (int, error) {
	if c.wm != nil {
		c.wm.Shaper.Wait(context.Background(), len(b))
	}
	n, err := c.Conn.Write(b)
	if c.wm != nil {
		c.wm.Bytes.Add(uint64(n))
	}
	return n, err
}

func (c *wrappedConn) Reset() { reset(c.Conn) }

func (c *wrappedConn) CloseWrite() error {
	if hc, ok := c.Conn.(halfCloser); ok {
		return hc.CloseWrite()
	}
	return c.Conn.Close()
}
