package upstream

import (
	"context"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// hostileProxy answers every CONNECT with head, then writes filler for
// ever (until the client goes away); sent counts the bytes it got out.
func hostileProxy(t *testing.T, head, filler string) (addr string, sent *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	sent = new(atomic.Int64)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 4096)
				c.Read(buf) // the CONNECT request
				if n, err := c.Write([]byte(head)); err != nil {
					return
				} else {
					sent.Add(int64(n))
				}
				chunk := []byte(strings.Repeat(filler, 64<<10/len(filler)))
				for {
					n, err := c.Write(chunk)
					sent.Add(int64(n))
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	return ln.Addr().String(), sent
}

// TestConnectAnswerBounded: a hostile CONNECT proxy that never ends its
// answer's header, or sends an endless body with a refusal, costs the
// agent a bounded read: Dial fails at once (an overlong answer counted as
// the proxy's refusal) instead of holding the flow and reading, and keeping, all the
// proxy sends until the dial times out.
func TestConnectAnswerBounded(t *testing.T) {
	for _, tc := range []struct{ name, head, filler, reason string }{
		{"endless header", "HTTP/1.1 200 Connection established\r\n", "X-Filler: " + strings.Repeat("a", 100) + "\r\n", ReasonRefused},
		{"endless header line", "HTTP/1.1 200 Connection established\r\nX-Long: ", "b", ReasonRefused},
		{"endless refusal body", "HTTP/1.1 407 Proxy Authentication Required\r\nTransfer-Encoding: chunked\r\n\r\n", "1000\r\n" + strings.Repeat("c", 0x1000) + "\r\n", ReasonAuth},
		{"endless status line", "HTTP/1.1 200 ", "d", ReasonRefused},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr, sent := hostileProxy(t, tc.head, tc.filler)
			d, err := New(Config{URL: "http://" + addr}, noEnv)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			start := time.Now()
			c, err := d.Dial(ctx, netip.MustParseAddrPort("198.51.100.10:443"), "")
			took := time.Since(start)
			if err == nil {
				c.Close()
				t.Fatal("the hostile proxy's answer was taken")
			}
			if took > 2*time.Second {
				t.Errorf("Dial took %s reading the proxy's answer (%d bytes sent), want a bounded read", took.Round(time.Millisecond), sent.Load())
			}
			if reason(err) != tc.reason {
				t.Errorf("reason %q (%v), want %s", reason(err), err, tc.reason)
			}
		})
	}
}

// TestProxyNotAskedForItself: a flow allowed by name and handed to the
// proxy as that name is refused when the name is the proxy's own at its
// port, whatever address the sandbox's resolver gave for it: the proxy
// would connect to itself, and the sandbox would speak to it directly.
func TestProxyNotAskedForItself(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var asked atomic.Int32
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			asked.Add(1)
			c.Write([]byte("HTTP/1.1 403 Forbidden\r\n\r\n"))
			c.Close()
		}
	}()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	d, err := New(Config{URL: "http://localhost:" + port}, noEnv)
	if err != nil {
		t.Fatal(err)
	}
	p, _ := strconv.Atoi(port)
	dst := netip.AddrPortFrom(netip.MustParseAddr("198.51.100.9"), uint16(p)) // not dialed: the proxy is
	for _, name := range []string{"localhost", "LocalHost."} {
		if _, err := d.Dial(context.Background(), dst, name); reason(err) != ReasonSelf {
			t.Errorf("CONNECT %s:%s: %v, want %s", name, port, err, ReasonSelf)
		}
	}
	if n := asked.Load(); n != 0 {
		t.Errorf("the proxy was asked %d times for itself", n)
	}
	// The same name at another port is another service.
	other := netip.AddrPortFrom(dst.Addr(), uint16(p)+1)
	if _, err := d.Dial(context.Background(), other, "localhost"); reason(err) == ReasonSelf {
		t.Errorf("localhost:%d refused as the proxy", other.Port())
	}
}
