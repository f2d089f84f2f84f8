// Package inspect reads the first bytes a client sends on a connection and
// says what it asks for: the server name of a TLS ClientHello (and its ALPN
// offer, and whether it hides the name with ECH), or the host of an HTTP/1
// request. crypto/tls and net/http do the parsing; this package only frames
// the bytes and bounds how many it looks at.
package inspect

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/textproto"
	"slices"
	"strings"
	"time"

	"github.com/msbtap/msbtap/policy"
)

// MaxPeek is the most a client may send before it has said what it wants.
const MaxPeek = 16 << 10

// Kind is what the first bytes turned out to be.
type Kind int

const (
	// Other is any protocol that is neither TLS nor HTTP (SSH, say).
	Other Kind = iota
	// TLS is a TLS ClientHello.
	TLS
	// HTTP is an HTTP/1 request.
	HTTP
	// H2C is cleartext HTTP/2 with prior knowledge ("PRI * HTTP/2.0"):
	// its host sits in compressed headers.
	H2C
)

func (k Kind) String() string {
	return [...]string{"other", "tls", "http", "h2c"}[k]
}

// Hello is what a client's first bytes ask for.
type Hello struct {
	Kind Kind
	// Names are the server names asked for, lower case, without port: the
	// SNI of a ClientHello (none if it sent none), or the host of an HTTP
	// request (its Host header and, for an absolute URL, the URL's host).
	Names []string
	// ALPN is a ClientHello's protocol offer.
	ALPN []string
	// ECH: the ClientHello carries encrypted_client_hello, so the name
	// that counts is not the one in the clear.
	ECH bool
	// Method and Path of an HTTP request.
	Method, Path string
}

// ErrTooLong: the client sent MaxPeek bytes without a complete ClientHello
// or request head.
var ErrTooLong = errors.New("no complete ClientHello or request head in the first 16 KiB")

// Classify looks at b, the client's bytes so far. It returns more = true
// when it cannot tell yet, and an error for bytes that claim TLS or HTTP
// but are malformed. Bytes that an HTTP server could take for a request
// (a request line naming an HTTP version, an HTTP/0.9 "GET", a blank line
// before the request line) are HTTP: net/http must parse them, or they are
// an error, so that no request reaches a server unchecked because it was
// written in a way this package did not expect.
func Classify(b []byte) (h Hello, more bool, err error) {
	switch {
	case len(b) == 0:
		return h, true, nil
	case b[0] == 0x16: // a TLS handshake record
		return classifyTLS(b)
	case b[0] == '\r' || b[0] == '\n':
		// Servers skip blank lines before a request; net/http does not.
		return Hello{Kind: HTTP}, false, errors.New("http: a blank line before the request line")
	}
	switch looksHTTP(b) {
	case maybe:
		return h, true, nil
	case yes:
		return classifyHTTP(b)
	}
	return Hello{Kind: Other}, false, nil
}

// extensionECH is encrypted_client_hello (draft-ietf-tls-esni).
const extensionECH = 0xfe0d

func classifyTLS(b []byte) (Hello, bool, error) {
	h := Hello{Kind: TLS}
	// The ClientHello may span records: gather handshake bytes until the
	// message's own length is there.
	var hs []byte
	for rest := b; ; {
		if len(rest) < 5 {
			return h, true, nil
		}
		if rest[0] != 0x16 || rest[1] != 3 {
			return h, false, errors.New("tls: a record that is no handshake before the ClientHello ended")
		}
		n := int(rest[3])<<8 | int(rest[4])
		if n == 0 || n > 1<<14 {
			return h, false, fmt.Errorf("tls: record length %d", n)
		}
		if len(rest) < 5+n {
			return h, true, nil
		}
		hs = append(hs, rest[5:5+n]...)
		rest = rest[5+n:]
		if len(hs) >= 4 {
			if hs[0] != 1 {
				return h, false, fmt.Errorf("tls: handshake message %d, want a ClientHello", hs[0])
			}
			if want := 4 + (int(hs[1])<<16 | int(hs[2])<<8 | int(hs[3])); len(hs) >= want {
				break
			}
		}
	}
	// crypto/tls parses it: a server over the bytes, stopped as soon as it
	// has read the hello.
	var info *tls.ClientHelloInfo
	stop := errors.New("stop")
	srv := tls.Server(&replayConn{r: bytes.NewReader(b)}, &tls.Config{
		GetConfigForClient: func(chi *tls.ClientHelloInfo) (*tls.Config, error) {
			info = chi
			return nil, stop
		},
	})
	err := srv.HandshakeContext(context.Background())
	if info == nil {
		return h, false, fmt.Errorf("tls: not a ClientHello: %v", err)
	}
	if sn := info.ServerName; sn != "" {
		// The name goes upstream as the client wrote it: it must be one
		// that normalises to itself, up to ASCII case (RFC 6066: an
		// A-label, with no trailing dot).
		for i := 0; i < len(sn); i++ {
			if sn[i] >= 0x80 {
				return h, false, fmt.Errorf("tls: server name %q is not ASCII", sn)
			}
		}
		n, err := policy.NormalizeName(sn)
		if err == nil && n != strings.ToLower(sn) {
			err = fmt.Errorf("%q is not in its normal form %q", sn, n)
		}
		if err != nil {
			return h, false, fmt.Errorf("tls: server name: %v", err)
		}
		h.Names = []string{n}
	}
	h.ALPN = slices.Clone(info.SupportedProtos)
	h.ECH = slices.Contains(info.Extensions, extensionECH)
	return h, false, nil
}

type tristate int

const (
	no tristate = iota
	maybe
	yes
)

// looksHTTP says whether b starts with what an HTTP server would read as
// a request line: a first line that names an HTTP version ("HTTP/", in
// any case), starts with the word GET (an HTTP/0.9 request names none; in
// lower case it is memcached's), or
// is a token and what looks like a request target (a path, "*", an
// absolute URL).
// Until the first line ends, bytes that could still be one (printable
// text) are maybe; anything else (an SSH banner, a binary protocol) is no.
func looksHTTP(b []byte) tristate {
	line, complete := b, false
	if i := bytes.IndexByte(b, '\n'); i >= 0 {
		line, complete = b[:i], true
	}
	line = bytes.TrimSuffix(line, []byte("\r"))
	if containsFold(line, "http/") {
		return yes
	}
	word := line
	if i := bytes.IndexAny(line, " \t"); i >= 0 {
		word = line[:i]
		if string(word) == "GET" || (isToken(word) && looksTarget(bytes.TrimLeft(line[i:], " \t"))) {
			return yes
		}
	} else if complete && string(word) == "GET" {
		return yes
	}
	if complete {
		return no
	}
	for _, c := range line {
		if (c < 0x20 || c > 0x7e) && c != '\t' {
			return no
		}
	}
	return maybe
}

// isToken reports whether b is an RFC 9110 token, as a method is.
func isToken(b []byte) bool {
	if len(b) == 0 {
		return false
	}
	for _, c := range b {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', bytes.IndexByte([]byte("!#$%&'*+-.^_`|~"), c) >= 0:
		default:
			return false
		}
	}
	return true
}

// looksTarget reports whether b starts like a request target: a path, an
// asterisk, or an absolute URL (scheme "://").
func looksTarget(b []byte) bool {
	if len(b) > 0 && (b[0] == '/' || b[0] == '*') {
		return true
	}
	i := 0
	for i < len(b) && (b[i] >= 'a' && b[i] <= 'z' || b[i] >= 'A' && b[i] <= 'Z' || i > 0 && (b[i] >= '0' && b[i] <= '9' || b[i] == '+' || b[i] == '-' || b[i] == '.')) {
		i++
	}
	return i > 0 && bytes.HasPrefix(b[i:], []byte("://"))
}

// containsFold reports whether b contains s (lower case ASCII) in any
// letter case.
func containsFold(b []byte, s string) bool {
	for i := 0; i+len(s) <= len(b); i++ {
		if bytes.EqualFold(b[i:i+len(s)], []byte(s)) {
			return true
		}
	}
	return false
}

func classifyHTTP(b []byte) (Hello, bool, error) {
	h := Hello{Kind: HTTP}
	if bytes.HasPrefix(b, []byte("PRI * HTTP/2.0")) {
		return Hello{Kind: H2C}, false, nil
	}
	if i := bytes.IndexByte(b, '\n'); i >= 0 && !bytes.Contains(b[:i], []byte(" HTTP/")) {
		// HTTP/0.9, or a version net/http does not read: no head follows.
		return h, false, fmt.Errorf("http: request line %q names no HTTP/1 version", truncate(b[:i], 64))
	}
	if !bytes.Contains(b, []byte("\r\n\r\n")) && !bytes.Contains(b, []byte("\n\n")) {
		return h, true, nil
	}
	req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(b)))
	if err != nil {
		return h, false, fmt.Errorf("http: %v", err)
	}
	h.Method, h.Path = req.Method, req.URL.Path
	var bad error
	add := func(host string) {
		if host == "" {
			return
		}
		a, err := ParseAuthority(host)
		if err != nil {
			bad = err
			return
		}
		if !slices.Contains(h.Names, a.Name) {
			h.Names = append(h.Names, a.Name)
		}
	}
	// ReadRequest keeps one host (the URL's, for an absolute URL); every
	// Host header counts too.
	tp := textproto.NewReader(bufio.NewReader(bytes.NewReader(b)))
	tp.ReadLine()
	if hdr, err := tp.ReadMIMEHeader(); err == nil {
		for _, v := range hdr.Values("Host") {
			add(v)
		}
	}
	add(req.URL.Host)
	if bad != nil {
		return h, false, fmt.Errorf("http: %v", bad)
	}
	return h, false, nil
}

func truncate(b []byte, n int) string {
	if len(b) > n {
		return string(b[:n]) + "…"
	}
	return string(b)
}

// Peek reads c until Classify can tell what the client asks for, at most
// MaxPeek bytes. The client may take as long as it likes (until ctx ends)
// before its first byte, as an idle pooled connection does; from then on
// it has patience to finish. Peek returns the bytes read, to be replayed
// upstream, with the verdict.
func Peek(ctx context.Context, c net.Conn, patience time.Duration) ([]byte, Hello, error) {
	buf := make([]byte, 0, 4096)
	stop := context.AfterFunc(ctx, func() { c.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	defer c.SetReadDeadline(time.Time{})
	for {
		if len(buf) == cap(buf) {
			if cap(buf) >= MaxPeek {
				return buf, Hello{}, ErrTooLong
			}
			buf = slices.Grow(buf, min(cap(buf), MaxPeek-cap(buf)))
		}
		n, err := c.Read(buf[len(buf):cap(buf)])
		if n > 0 && len(buf) == 0 && ctx.Err() == nil {
			c.SetReadDeadline(time.Now().Add(patience))
		}
		buf = buf[:len(buf)+n]
		if n > 0 {
			h, more, cerr := Classify(buf)
			if cerr != nil || !more {
				return buf, h, cerr
			}
		}
		if err != nil {
			if ctx.Err() != nil {
				err = ctx.Err()
			}
			return buf, Hello{}, err
		}
	}
}

// replayConn is a net.Conn that reads from r and swallows writes: a TLS
// server can parse a ClientHello from it.
type replayConn struct {
	net.Conn
	r io.Reader
}

func (c *replayConn) Read(b []byte) (int, error)       { return c.r.Read(b) }
func (c *replayConn) Write(b []byte) (int, error)      { return len(b), nil }
func (c *replayConn) Close() error                     { return nil }
func (c *replayConn) SetDeadline(time.Time) error      { return nil }
func (c *replayConn) SetReadDeadline(time.Time) error  { return nil }
func (c *replayConn) SetWriteDeadline(time.Time) error { return nil }
func (c *replayConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *replayConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
