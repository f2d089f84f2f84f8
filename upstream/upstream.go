// Package upstream sends the sandbox's allowed TCP flows through an
// upstream proxy the operator names: SOCKS5 (RFC 1928, with RFC 1929
// username and password) or HTTP CONNECT. The policy has decided before a
// flow gets here; the proxy only carries what was allowed.
package upstream

import (
	"bufio"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/net/proxy"

	"github.com/msbtap/msbtap/internal/fielderr"
)

// Config is the upstream proxy as the operator gives it.
type Config struct {
	// URL is socks5://HOST:PORT or http://HOST:PORT, without credentials.
	URL string
	// CredentialsFile holds USER:PASSWORD on one line (mode 0600 or
	// stricter); CredentialsEnv names an environment variable that does.
	// At most one of them.
	CredentialsFile, CredentialsEnv string
	// Bypass are destinations reached directly: a CIDR or an address, a
	// NAME, or *.SUFFIX / .SUFFIX (SUFFIX and every name under it).
	Bypass []string
}

// Enabled reports whether a proxy is configured.
func (c Config) Enabled() bool { return c.URL != "" }

// Why a flow could not leave through the proxy, as counted.
const (
	ReasonUnreachable = "upstream_proxy_unreachable" // no connection to the proxy
	ReasonRefused     = "upstream_proxy_refused"     // the proxy answered, and said no
	ReasonAuth        = "upstream_proxy_auth"        // the proxy refused the credentials
	ReasonSelf        = "upstream_proxy_self"        // a flow to the proxy itself
)

// Reasons lists the failure reasons, in a fixed order.
func Reasons() []string { return []string{ReasonUnreachable, ReasonRefused, ReasonAuth, ReasonSelf} }

// Error is a flow the proxy did not carry.
type Error struct {
	Reason string
	Err    error
}

func (e *Error) Error() string { return e.Reason + ": " + e.Err.Error() }
func (e *Error) Unwrap() error { return e.Err }

// Dialer connects through the proxy.
type Dialer struct {
	scheme     string // socks5 or http
	addr       string // the proxy, host:port
	user, pass string
	auth       string // Proxy-Authorization, for http
	self       []netip.AddrPort
	cidrs      []netip.Prefix
	names      []string // exact
	suffixes   []string // without the leading dot
	timeout    time.Duration

	fails [4]atomic.Uint64 // by Reasons() order
}

// New checks the configuration and reads the credentials; errors name the
// setting. lookupEnv reads the environment (os.LookupEnv).
func New(c Config, lookupEnv func(string) (string, bool)) (*Dialer, error) {
	d, u, port, err := parse(c)
	if err != nil {
		return nil, err
	}
	shown := redact(c.URL)
	if a, err := netip.ParseAddr(u.Hostname()); err == nil {
		d.self = append(d.self, netip.AddrPortFrom(a.Unmap(), port))
	} else {
		// A name is resolved once, at start, with the host's resolver: the
		// agent then dials addresses (no lookup per flow, none after its
		// system calls are narrowed), and refuses flows to them.
		ips, err := net.LookupIP(u.Hostname())
		if err != nil || len(ips) == 0 {
			return nil, fielderr.Bad("upstream_proxy", shown, "cannot resolve %s: %v", u.Hostname(), err)
		}
		for _, ip := range ips {
			if a, ok := netip.AddrFromSlice(ip); ok {
				d.self = append(d.self, netip.AddrPortFrom(a.Unmap(), port))
			}
		}
	}
	cred, field, err := readCredentials(c, lookupEnv)
	if err != nil {
		return nil, err
	}
	if cred != "" {
		user, pass, ok := strings.Cut(cred, ":")
		if !ok || user == "" {
			return nil, fielderr.Bad(field, "…", "want USER:PASSWORD")
		}
		if d.scheme == "socks5" && (len(user) > 255 || len(pass) > 255) {
			return nil, fielderr.Bad(field, "…", "SOCKS5 user and password are 255 bytes at most")
		}
		d.user, d.pass = user, pass
		d.auth = "Basic " + base64.StdEncoding.EncodeToString([]byte(cred))
	}
	return d, nil
}

// Validate checks the proxy's URL and bypass list, without reading the
// credentials or resolving anything.
func Validate(c Config) error {
	_, _, _, err := parse(c)
	return err
}

func parse(c Config) (d *Dialer, u *url.URL, port uint16, err error) {
	shown := redact(c.URL) // never echo a password
	if u, err = url.Parse(c.URL); err != nil {
		return nil, nil, 0, fielderr.Bad("upstream_proxy", shown, "want socks5://HOST:PORT or http://HOST:PORT")
	}
	if u.User != nil || shown != c.URL {
		return nil, nil, 0, fielderr.Bad("upstream_proxy", shown, "credentials in the URL would show in the process list: give them in a credentials file or an environment variable")
	}
	d = &Dialer{scheme: u.Scheme, addr: u.Host, timeout: 10 * time.Second}
	switch {
	case u.Scheme != "socks5" && u.Scheme != "socks5h" && u.Scheme != "http":
		return nil, nil, 0, fielderr.Bad("upstream_proxy", c.URL, "scheme %q: want socks5 or http (CONNECT)", u.Scheme)
	case u.Port() == "" || u.Hostname() == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "":
		return nil, nil, 0, fielderr.Bad("upstream_proxy", c.URL, "want %s://HOST:PORT", u.Scheme)
	}
	if d.scheme == "socks5h" {
		d.scheme = "socks5"
	}
	p, perr := strconv.ParseUint(u.Port(), 10, 16)
	if perr != nil || p == 0 {
		return nil, nil, 0, fielderr.Bad("upstream_proxy", shown, "port %q: want 1..65535", u.Port())
	}
	for _, b := range c.Bypass {
		if err := d.addBypass(b); err != nil {
			return nil, nil, 0, err
		}
	}
	return d, u, uint16(p), nil
}

// redact hides what a URL holds before an '@' (user and password).
func redact(s string) string {
	at := strings.LastIndex(s, "@")
	if at < 0 {
		return s
	}
	start := strings.Index(s, "://")
	if start < 0 || start > at {
		start = -3
	}
	return s[:start+3] + "…" + s[at:]
}

func readCredentials(c Config, lookupEnv func(string) (string, bool)) (cred, field string, err error) {
	switch {
	case c.CredentialsFile != "" && c.CredentialsEnv != "":
		return "", "", fielderr.Bad("upstream_proxy_credentials_env", c.CredentialsEnv, "give the credentials in a file or in the environment, not both")
	case c.CredentialsFile != "":
		field = "upstream_proxy_credentials_file"
		fi, err := os.Stat(c.CredentialsFile)
		if err != nil {
			return "", "", fielderr.Wrap(field, err)
		}
		if fi.Mode().Perm()&0o077 != 0 {
			return "", "", fielderr.Bad(field, c.CredentialsFile, "mode %04o lets others read the credentials: chmod 600 it", fi.Mode().Perm())
		}
		b, err := os.ReadFile(c.CredentialsFile)
		if err != nil {
			return "", "", fielderr.Wrap(field, err)
		}
		cred = strings.TrimRight(string(b), "\r\n")
		if cred == "" || strings.ContainsAny(cred, "\r\n") {
			return "", "", fielderr.Bad(field, c.CredentialsFile, "want one line, USER:PASSWORD")
		}
	case c.CredentialsEnv != "":
		field = "upstream_proxy_credentials_env"
		v, ok := lookupEnv(c.CredentialsEnv)
		if !ok || v == "" {
			return "", "", fielderr.Bad(field, c.CredentialsEnv, "not set in msbtap's environment (with sudo, keep it: sudo -E)")
		}
		cred = v
	}
	return cred, field, nil
}

func (d *Dialer) addBypass(b string) error {
	if p, err := netip.ParsePrefix(b); err == nil {
		d.cidrs = append(d.cidrs, p.Masked())
		return nil
	}
	if a, err := netip.ParseAddr(b); err == nil {
		d.cidrs = append(d.cidrs, netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
		return nil
	}
	n := strings.ToLower(strings.TrimSuffix(b, "."))
	suffix := strings.HasPrefix(n, "*.") || strings.HasPrefix(n, ".")
	n = strings.TrimPrefix(strings.TrimPrefix(n, "*"), ".")
	if n == "" || strings.ContainsAny(n, "*/ ") {
		return fielderr.Bad("upstream_proxy_bypass", b, "want a CIDR, an address, a NAME or *.SUFFIX")
	}
	if suffix {
		d.suffixes = append(d.suffixes, n)
	} else {
		d.names = append(d.names, n)
	}
	return nil
}

// Bypassed reports whether dst (known by names, if any) is reached
// directly rather than through the proxy.
func (d *Dialer) Bypassed(dst netip.Addr, names []string) bool {
	dst = dst.Unmap()
	for _, p := range d.cidrs {
		if p.Contains(dst) {
			return true
		}
	}
	for _, n := range names {
		n = strings.ToLower(strings.TrimSuffix(n, "."))
		for _, b := range d.names {
			if n == b {
				return true
			}
		}
		for _, s := range d.suffixes {
			if n == s || strings.HasSuffix(n, "."+s) {
				return true
			}
		}
	}
	return false
}

// String describes the proxy, never its credentials.
func (d *Dialer) String() string {
	s := d.scheme + "://" + d.addr
	if d.user != "" {
		s += " (with credentials)"
	}
	return s
}

// Failures returns the flows the proxy did not carry, by reason.
func (d *Dialer) Failures() map[string]uint64 {
	m := make(map[string]uint64, len(d.fails))
	for i, r := range Reasons() {
		m[r] = d.fails[i].Load()
	}
	return m
}

func (d *Dialer) fail(reason string, err error) error {
	for i, r := range Reasons() {
		if r == reason {
			d.fails[i].Add(1)
		}
	}
	return &Error{Reason: reason, Err: err}
}

// Dial connects to dst through the proxy; when name is not empty the
// proxy is asked for name:port instead, and resolves it itself.
func (d *Dialer) Dial(ctx context.Context, dst netip.AddrPort, name string) (net.Conn, error) {
	for _, s := range d.self {
		if s.Addr() == dst.Addr().Unmap() && s.Port() == dst.Port() {
			return nil, d.fail(ReasonSelf, errors.New("the sandbox may not talk to the upstream proxy itself"))
		}
	}
	target := dst.String()
	if name != "" {
		target = net.JoinHostPort(name, fmt.Sprint(dst.Port()))
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, d.timeout)
		defer cancel()
	}
	nd := net.Dialer{KeepAlive: 30 * time.Second}
	var c net.Conn
	var err error
	for _, a := range d.self { // the proxy's addresses, in the resolver's order
		if c, err = nd.DialContext(ctx, "tcp", a.String()); err == nil || ctx.Err() != nil {
			break
		}
	}
	if err != nil {
		return nil, d.fail(ReasonUnreachable, fmt.Errorf("connect to %s: %w", d.addr, err))
	}
	tc := c.(*net.TCPConn)
	var up net.Conn
	if d.scheme == "socks5" {
		up, err = d.socks(ctx, tc, target)
	} else {
		up, err = d.connect(ctx, tc, target)
	}
	if err != nil {
		tc.Close()
		return nil, err
	}
	return up, nil
}

// oneConn hands the SOCKS client the connection already made, so that a
// failure to reach the proxy and a refusal by it can be told apart.
type oneConn struct{ c net.Conn }

func (o oneConn) Dial(string, string) (net.Conn, error) { return o.c, nil }

func (d *Dialer) socks(ctx context.Context, c *net.TCPConn, target string) (net.Conn, error) {
	var auth *proxy.Auth
	if d.user != "" {
		auth = &proxy.Auth{User: d.user, Password: d.pass}
	}
	sd, err := proxy.SOCKS5("tcp", d.addr, auth, oneConn{c})
	if err != nil {
		return nil, d.fail(ReasonRefused, err)
	}
	if _, err := sd.(proxy.ContextDialer).DialContext(ctx, "tcp", target); err != nil {
		if strings.Contains(err.Error(), "authentication") {
			return nil, d.fail(ReasonAuth, err)
		}
		if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
			return nil, d.fail(ReasonUnreachable, err)
		}
		return nil, d.fail(ReasonRefused, err)
	}
	// The SOCKS reply is read to its last byte: what follows is the
	// stream, on the TCP connection itself (which half-closes and resets).
	return c, nil
}

func (d *Dialer) connect(ctx context.Context, c *net.TCPConn, target string) (net.Conn, error) {
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	req := "CONNECT " + target + " HTTP/1.1\r\nHost: " + target + "\r\n"
	if d.auth != "" {
		req += "Proxy-Authorization: " + d.auth + "\r\n"
	}
	if _, err := c.Write([]byte(req + "\r\n")); err != nil {
		return nil, d.fail(ReasonUnreachable, fmt.Errorf("CONNECT %s: %w", target, err))
	}
	br := bufio.NewReaderSize(c, 4096)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		return nil, d.fail(ReasonUnreachable, fmt.Errorf("CONNECT %s: no answer from the proxy: %w", target, err))
	}
	resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusProxyAuthRequired:
		return nil, d.fail(ReasonAuth, fmt.Errorf("CONNECT %s: %s", target, resp.Status))
	case resp.StatusCode/100 != 2:
		return nil, d.fail(ReasonRefused, fmt.Errorf("CONNECT %s: %s", target, resp.Status))
	}
	c.SetDeadline(time.Time{})
	if br.Buffered() > 0 { // the server spoke first, in the same segment
		b, _ := br.Peek(br.Buffered())
		return &bufConn{TCPConn: c, pending: append([]byte(nil), b...)}, nil
	}
	return c, nil
}

// bufConn is a proxied connection with bytes read past the proxy's answer.
type bufConn struct {
	*net.TCPConn
	pending []byte
}

func (b *bufConn) Read(p []byte) (int, error) {
	if len(b.pending) > 0 {
		n := copy(p, b.pending)
		b.pending = b.pending[n:]
		return n, nil
	}
	return b.TCPConn.Read(p)
}

// Reset aborts the connection with a TCP reset.
func (b *bufConn) Reset() {
	_ = b.TCPConn.SetLinger(0)
	b.TCPConn.Close()
}
