package inspect

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// clientHello returns the first flight of a crypto/tls client.
func clientHello(t testing.TB, name string, alpn ...string) []byte {
	t.Helper()
	a, b := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		c := tls.Client(a, &tls.Config{ServerName: name, NextProtos: alpn, InsecureSkipVerify: name == ""})
		c.HandshakeContext(context.Background())
	}()
	var out []byte
	buf := make([]byte, 4096)
	b.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		n, err := b.Read(buf)
		out = append(out, buf[:n]...)
		if _, more, _ := Classify(out); !more || err != nil {
			break
		}
	}
	b.Close()
	a.Close()
	<-done
	return out
}

// withExtension adds an empty extension of type typ to a one-record
// ClientHello, fixing the lengths around it.
func withExtension(hello []byte, typ uint16) []byte {
	out := slices.Clone(hello)
	out = binary.BigEndian.AppendUint16(out, typ)
	out = binary.BigEndian.AppendUint16(out, 0)
	grow := func(off, size, by int) {
		v := 0
		for i := 0; i < size; i++ {
			v = v<<8 | int(out[off+i])
		}
		v += by
		for i := size - 1; i >= 0; i-- {
			out[off+i] = byte(v)
			v >>= 8
		}
	}
	grow(3, 2, 4) // record length
	grow(6, 3, 4) // handshake length
	// The extensions' length: after version, random, session id, cipher
	// suites and compression methods.
	p := 9 + 2 + 32
	p += 1 + int(out[p])
	p += 2 + int(binary.BigEndian.Uint16(out[p:]))
	p += 1 + int(out[p])
	grow(p, 2, 4)
	return out
}

func TestTLS(t *testing.T) {
	b := clientHello(t, "Web.Test", "h2", "http/1.1")
	h, more, err := Classify(b)
	if err != nil || more || h.Kind != TLS || !slices.Equal(h.Names, []string{"web.test"}) || !slices.Equal(h.ALPN, []string{"h2", "http/1.1"}) || h.ECH {
		t.Fatalf("%+v more=%v err=%v", h, more, err)
	}
	// Any prefix asks for more.
	for _, n := range []int{1, 5, 40, len(b) - 1} {
		if _, more, err := Classify(b[:n]); !more || err != nil {
			t.Fatalf("%d bytes: more=%v err=%v", n, more, err)
		}
	}
	// No SNI.
	if h, _, err := Classify(clientHello(t, "")); err != nil || len(h.Names) != 0 {
		t.Fatalf("no SNI: %+v %v", h, err)
	}
	// ECH is seen.
	h, _, err = Classify(withExtension(b, extensionECH))
	if err != nil || !h.ECH || h.Names[0] != "web.test" {
		t.Fatalf("ECH: %+v %v", h, err)
	}
}

// A ClientHello split across two records is put back together.
func TestTLSAcrossRecords(t *testing.T) {
	b := clientHello(t, "web.test")
	body := b[5:]
	cut := 30
	var two []byte
	for _, part := range [][]byte{body[:cut], body[cut:]} {
		two = append(two, 0x16, 3, 1, byte(len(part)>>8), byte(len(part)))
		two = append(two, part...)
	}
	h, more, err := Classify(two)
	if err != nil || more || h.Names[0] != "web.test" {
		t.Fatalf("%+v %v %v", h, more, err)
	}
}

func TestHTTP(t *testing.T) {
	for _, tc := range []struct {
		req   string
		names []string
	}{
		{"GET /x?y=1 HTTP/1.1\r\nHost: Web.Test:8080\r\n\r\n", []string{"web.test"}},
		{"POST http://other.test/ HTTP/1.1\r\nHost: web.test\r\nContent-Length: 0\r\n\r\n", []string{"web.test", "other.test"}},
		{"GET / HTTP/1.0\r\n\r\n", nil},
	} {
		h, more, err := Classify([]byte(tc.req))
		if err != nil || more || h.Kind != HTTP || !slices.Equal(h.Names, tc.names) {
			t.Errorf("%q: %+v more=%v err=%v", tc.req, h, more, err)
		}
	}
	if _, more, _ := Classify([]byte("GET / HTTP/1.1\r\nHost: web")); !more {
		t.Error("an unfinished head did not ask for more")
	}
	if h, _, _ := Classify([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")); h.Kind != H2C {
		t.Errorf("h2c: %v", h.Kind)
	}
	// Any token is a method, as written; what a lenient server would read
	// as a request but net/http does not parse is an error.
	for _, tc := range []struct{ req, method string }{
		{"get / HTTP/1.1\r\nHost: evil.test\r\n\r\n", "get"},
		{"FOO /public HTTP/1.1\r\nHost: web.test\r\n\r\n", "FOO"},
		{"PROPFIND /dav HTTP/1.1\r\nHost: web.test\r\n\r\n", "PROPFIND"},
	} {
		h, more, err := Classify([]byte(tc.req))
		if err != nil || more || h.Kind != HTTP || h.Method != tc.method || len(h.Names) != 1 {
			t.Errorf("%q: %+v more=%v err=%v", tc.req, h, more, err)
		}
	}
	for _, bad := range []string{"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", "\n", "GET /\r\n", "get /x\n",
		"GET / http/1.1\r\nHost: a\r\n\r\n", "G\x00T / HTTP/1.1\r\n\r\n", "POST http://evil.test/\r\n", "FOO /x\r\n", "OPTIONS *\r\n"} {
		if _, more, err := Classify([]byte(bad)); err == nil || more {
			t.Errorf("%q: more=%v err=%v, want an error", bad, more, err)
		}
	}
	for _, prefix := range []string{"G", "FOO /pub", "get / HT"} {
		if _, more, err := Classify([]byte(prefix)); !more || err != nil {
			t.Errorf("%q: more=%v err=%v, want more", prefix, more, err)
		}
	}
	for _, other := range []string{"SSH-2.0-OpenSSH_9.2\r\n", "SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", "GETX\r\n", "\x00\x01", "*1\r\n$4\r\nPING\r\n", "get key1\r\n", "set k 0 0 1\r\n"} {
		if h, more, err := Classify([]byte(other)); h.Kind != Other || more || err != nil {
			t.Errorf("%q: %+v %v %v", other, h, more, err)
		}
	}
	if _, _, err := Classify([]byte("GET / HTTP/1.1\r\nBad Header\r\n\r\n")); err == nil {
		t.Error("a malformed head was accepted")
	}
}

func TestPeekBounds(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	go func() {
		a.Write([]byte("GET / HTTP/1.1\r\n"))
		for i := 0; i < 20; i++ {
			a.Write(bytes.Repeat([]byte("X-Pad: 0123456789abcdef0123456789abcdef\r\n"), 25))
		}
	}()
	if _, _, err := Peek(context.Background(), b, 5*time.Second); err != ErrTooLong {
		t.Fatalf("a head past 16 KiB: %v", err)
	}
	// A client that started and stalls has patience to finish.
	c, d := net.Pipe()
	defer c.Close()
	defer d.Close()
	go c.Write([]byte("GET / HT"))
	start := time.Now()
	if _, _, err := Peek(context.Background(), d, 100*time.Millisecond); err == nil || time.Since(start) > 2*time.Second {
		t.Fatalf("a stalled client: %v after %s", err, time.Since(start))
	}
	// One that never starts waits for ctx.
	e, f := net.Pipe()
	defer e.Close()
	defer f.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if _, _, err := Peek(ctx, f, 50*time.Millisecond); err != context.DeadlineExceeded || time.Since(start) < 300*time.Millisecond {
		t.Fatalf("a silent client: %v after %s", err, time.Since(start))
	}
}

func FuzzClassify(f *testing.F) {
	f.Add(clientHello(f, "web.test", "h2"))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: a\r\n\r\n"))
	f.Add([]byte("SSH-2.0-x\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > MaxPeek {
			return
		}
		h, more, err := Classify(b)
		if err == nil && !more && h.Kind == TLS && len(h.Names) > 1 {
			t.Fatal("more than one SNI")
		}
		// Every name that passes is in the one form the policy compares.
		for _, n := range h.Names {
			if ip, perr := netip.ParseAddr(n); perr == nil && ip.String() == n {
				continue
			}
			if a, aerr := ParseAuthority(n); aerr != nil || a.Name != n {
				t.Fatalf("name %q is not in its normal form (%q, %v)", n, a.Name, aerr)
			}
		}
	})
}
