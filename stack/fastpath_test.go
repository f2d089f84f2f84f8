package stack

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"

	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/proxy"
	"github.com/msbtap/msbtap/tcpfast"
)

// fastServer listens on loopback and runs serve on each connection; the
// connections are closed at the test's end.
func fastServer(t *testing.T, serve func(net.Conn)) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns []net.Conn
	)
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() { defer wg.Done(); defer c.Close(); serve(c) }()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

func needFastPath(t *testing.T) {
	t.Helper()
	if err := tcpfast.Probe(); err != nil {
		t.Skipf("no fast path here: %v", err)
	}
}

// TestFastPathRelay: with the fast path on, an allowed flow is decided and
// reported as before, carried by the translator (not the netstack), listed
// with its bytes each way, and counted.
func TestFastPathRelay(t *testing.T) {
	needFastPath(t)
	const n = 1 << 20
	up := fastServer(t, func(c net.Conn) {
		h := sha256.New()
		io.Copy(h, c)
		c.Write(h.Sum(nil))
		io.Copy(c, io.LimitReader(zeros{}, n))
	})
	var (
		mu        sync.Mutex
		decisions []policy.Flow
	)
	st, sh, p := newTestStackWith(t, Options{
		FastPath:   true,
		MapDst:     func(netip.AddrPort) netip.AddrPort { return up },
		OnDecision: func(fl *flow.Flow) { mu.Lock(); decisions = append(decisions, fl.Flow); mu.Unlock() },
	})
	if st.fast == nil {
		t.Fatal("fast path asked for and not started")
	}
	g := newGuestStack(t, sh, p)
	for _, dst := range []netip.AddrPort{netip.MustParseAddrPort("198.51.100.9:80"), netip.MustParseAddrPort("[2001:db8::9]:80")} {
		c, err := g.dial(t, dst)
		if err != nil {
			t.Fatalf("%s: dial: %v", dst, err)
		}
		payload := bytes.Repeat([]byte("fastpath"), n/8)
		c.Write(payload)
		var listed []flow.Info
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			if listed = st.Flows(nil); len(listed) == 1 && listed[0].BytesUp == n {
				break
			}
		}
		if len(listed) != 1 || listed[0].BytesUp != n || listed[0].Dst != dst.String() || listed[0].Proto != "tcp" {
			t.Fatalf("%s: flows listed %+v, want this one with %d bytes up", dst, listed, n)
		}
		c.(*gonet.TCPConn).CloseWrite()
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		got, err := io.ReadAll(c)
		c.Close()
		want := sha256.Sum256(payload)
		if err != nil || len(got) != 32+n || !bytes.Equal(got[:32], want[:]) {
			t.Fatalf("%s: got %d bytes (want %d), err %v\n%s", dst, len(got), 32+n, err, st.fast.Debug())
		}
	}
	fs := st.fast.Stats()
	if fs.Opened != 2 {
		t.Errorf("fast path opened %d connections, want 2", fs.Opened)
	}
	mu.Lock()
	if len(decisions) != 2 {
		t.Errorf("decisions %+v, want one per connection", decisions)
	}
	mu.Unlock()
	if m := st.Metrics(); m.Flows[0].Total != 2 {
		t.Errorf("tcp total %d, want 2", m.Flows[0].Total)
	}
	for deadline := time.Now().Add(5 * time.Second); len(st.Flows(nil)) > 0 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	if l := st.Flows(nil); len(l) != 0 {
		t.Errorf("flows left open: %+v", l)
	}
}

// TestFastPathCloseFlow: flows close resets a fast-path flow both ways.
func TestFastPathCloseFlow(t *testing.T) {
	needFastPath(t)
	res := make(chan error, 1)
	up := fastServer(t, func(c net.Conn) {
		_, err := io.ReadAll(c)
		res <- err
	})
	st, sh, p := newTestStackWith(t, Options{FastPath: true, MapDst: func(netip.AddrPort) netip.AddrPort { return up }})
	g := newGuestStack(t, sh, p)
	c, err := g.dial(t, netip.MustParseAddrPort("198.51.100.9:443"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("x"))
	var id uint64
	for deadline := time.Now().Add(5 * time.Second); id == 0 && time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if l := st.Flows(nil); len(l) == 1 && l[0].BytesUp == 1 {
			id = l[0].ID
		}
	}
	if id == 0 || !st.CloseFlow(id) {
		t.Fatalf("no flow to close: %+v", st.Flows(nil))
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || !strings.Contains(err.Error(), "reset") {
		t.Fatalf("guest read after close: %v, want a reset", err)
	}
	select {
	case err := <-res:
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("server read: %v, want ECONNRESET", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the server was not reset")
	}
}

// TestFastPathMaxConnections: the cap on connections holds on the fast
// path: one past it is reset at once.
func TestFastPathMaxConnections(t *testing.T) {
	needFastPath(t)
	up := fastServer(t, func(c net.Conn) { io.Copy(io.Discard, c) })
	st, sh, p := newTestStackWith(t, Options{FastPath: true, MaxConnections: 1, MapDst: func(netip.AddrPort) netip.AddrPort { return up }})
	g := newGuestStack(t, sh, p)
	c, err := g.dial(t, netip.MustParseAddrPort("198.51.100.9:80"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := g.dial(t, netip.MustParseAddrPort("198.51.100.9:81")); err == nil {
		t.Fatal("a second connection past --max-connections 1 was let through")
	}
	if m := st.Metrics(); m.Failures["tcp_over_cap"] != 1 {
		t.Errorf("tcp_over_cap %d, want 1", m.Failures["tcp_over_cap"])
	}
}

// TestFastPathLeavesReadFlows: a flow the agent reads (WantsTCP) and every
// flow while a rate is set go through the netstack, as before.
func TestFastPathLeavesReadFlows(t *testing.T) {
	needFastPath(t)
	up := fastServer(t, func(c net.Conn) { io.Copy(c, c) })
	handled := make(chan struct{}, 4)
	var reads atomic.Bool
	reads.Store(true)
	st, sh, p := newTestStackWith(t, Options{
		FastPath: true,
		MapDst:   func(netip.AddrPort) netip.AddrPort { return up },
		WantsTCP: func(*flow.Flow) bool { return reads.Load() },
		HandleTCP: func(_ context.Context, fl *flow.Flow, guest, host net.Conn) error {
			handled <- struct{}{}
			_, _, err := proxy.Relay(guest, host, &fl.Up, &fl.Down)
			return err
		},
	})
	g := newGuestStack(t, sh, p)
	echo := func(port uint16) {
		t.Helper()
		c, err := g.dial(t, netip.AddrPortFrom(netip.MustParseAddr("198.51.100.9"), port))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte("ping"))
		b := make([]byte, 4)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, b); err != nil {
			t.Fatal(err)
		}
	}
	echo(80)
	select {
	case <-handled:
	case <-time.After(5 * time.Second):
		t.Fatal("the flow the agent reads did not reach HandleTCP")
	}
	reads.Store(false)
	st.SetRates(1<<30, 0, 0)
	echo(81)
	if fs := st.fast.Stats(); fs.Opened != 0 {
		t.Errorf("the fast path took %d flows it must leave to the netstack", fs.Opened)
	}
}

// TestFastPathOnlyForAllowed: a flow an ask rule decides never takes the
// fast path (it is held in the forwarder until its answer), nor a denied
// one; an allowed flow the agent need not read does.
func TestFastPathOnlyForAllowed(t *testing.T) {
	needFastPath(t)
	st, _, _ := newTestStackWith(t, Options{FastPath: true})
	f := policy.Flow{Proto: policy.TCP}
	for _, tc := range []struct {
		a    policy.Action
		want bool
	}{{policy.Allow, true}, {policy.Ask, false}, {policy.Deny, false}, {policy.Terminate, false}} {
		if got := st.fastEligible(flow.Of(f, policy.Decision{Action: tc.a})); got != tc.want {
			t.Errorf("%v: fast path %v, want %v", tc.a, got, tc.want)
		}
	}
}
