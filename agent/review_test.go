package agent

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/upstream"
)

// TestUpstreamCredentialsFileHidden: the upstream proxy's credentials
// file is masked in the command's mount namespace (as --user root, the
// command could read root's 0600 file otherwise). The rest of the
// credentials' path to the command is process's
// TestUpstreamCredentialsNeverReachTheCommand.
func TestUpstreamCredentialsFileHidden(t *testing.T) {
	creds := filepath.Join(t.TempDir(), "proxy-credentials")
	a := &Agent{cfg: Config{ForCommand: true,
		Upstream: upstream.Config{URL: "socks5://127.0.0.1:1080", CredentialsFile: creds}}}
	if hide := a.Private(); !slices.Contains(hide, creds) {
		t.Errorf("the credentials file %s is not masked from the command: %v", creds, hide)
	}
}

// TestUpstreamProxyNeverReachedDirectly: a flow to the proxy itself is
// refused on every route, not only through the proxy: to the gateway at
// the proxy's port when the proxy listens on the host's loopback (the
// gateway maps to it), to the proxy's address when a bypass covers it (in
// IPv4-mapped form too). The proxy never sees a connection, and the
// refusals are counted. (Nothing is dialed but loopback.)
func TestUpstreamProxyNeverReachedDirectly(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var accepted atomic.Int32
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			c.Close()
		}
	}()
	proxyAt := netip.MustParseAddrPort(ln.Addr().String())
	d, err := upstream.New(upstream.Config{URL: "http://" + proxyAt.String(), Bypass: []string{"127.0.0.0/8", "198.51.100.0/24"}}, func(string) (string, bool) { return "", false })
	if err != nil {
		t.Fatal(err)
	}
	gw, hostAddr := netip.MustParseAddr("10.200.0.1"), netip.MustParseAddr("198.51.100.77")
	a := &Agent{upstream: &upstreamRoute{d: d}, log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		popts: policy.Options{Host: policy.NewHostSet(gw, hostAddr), Pins: policy.NewPins(0)}}
	port := proxyAt.Port()
	for _, tc := range []struct{ dst, to netip.AddrPort }{
		{netip.AddrPortFrom(gw, port), proxyAt}, // the host, mapped to its loopback
		{proxyAt, proxyAt},                      // the proxy's address, bypassed
		{netip.MustParseAddrPort("[::ffff:127.0.0.1]:" + strconv.Itoa(int(port))), proxyAt},
	} {
		f := policy.Flow{Proto: policy.TCP, Src: netip.MustParseAddrPort("10.200.0.2:40000"), Dst: tc.dst}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		c, err := a.dialTCP(ctx, flow.Of(f, policy.Decision{Action: policy.Allow}), tc.to)
		cancel()
		if err == nil {
			c.Close()
			t.Errorf("flow to %s (dialed at %s) reached the proxy's port", tc.dst, tc.to)
		} else if ue, ok := err.(*upstream.Error); !ok || ue.Reason != upstream.ReasonSelf {
			t.Errorf("flow to %s: %v, want %s", tc.dst, err, upstream.ReasonSelf)
		}
	}
	time.Sleep(50 * time.Millisecond)
	if n := accepted.Load(); n != 0 {
		t.Errorf("the proxy got %d connections from the sandbox", n)
	}
	if n := d.Failures()[upstream.ReasonSelf]; n != 3 {
		t.Errorf("%d refusals counted, want 3", n)
	}
	// Another of the host's addresses at the proxy's port is the proxy
	// too (it may listen on all of them); another port is not.
	if !a.upstream.d.IsProxy(netip.AddrPortFrom(hostAddr, port), a.isHostAddr) {
		t.Errorf("%s not taken for the proxy", netip.AddrPortFrom(hostAddr, port))
	}
	for _, other := range []netip.AddrPort{netip.AddrPortFrom(gw, port+1), netip.MustParseAddrPort("198.51.100.200:" + strconv.Itoa(int(port)))} {
		if a.upstream.d.IsProxy(other, a.isHostAddr) {
			t.Errorf("%s taken for the proxy", other)
		}
	}
}
