package tcpfast

import (
	"context"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/link/ethernet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	gstack "gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/msbtap/msbtap/rings"
	"github.com/msbtap/msbtap/wire"
)

var (
	gwMAC    = [6]byte{2, 0x6d, 0x73, 0, 7, 1}
	guestMAC = [6]byte{2, 0x6d, 0x73, 0, 7, 2}
	guestV4  = netip.MustParsePrefix("100.96.0.30/30")
	gwV4     = netip.MustParseAddr("100.96.0.29")
	guestV6  = netip.MustParsePrefix("fd42:6d73:62:7::2/64")
	gwV6     = netip.MustParseAddr("fd42:6d73:62:7::1")
)

// fault decides what happens to each frame between the guest and the
// translator: dropped, duplicated, or held back behind the next one.
type fault struct {
	drop, dup, reorder float64 // probabilities
	rng                *rand.Rand
	held               []byte
	seen               int
	n                  atomic.Int64 // frames faulted
}

// apply returns the frames to pass on for b (b itself may be kept).
func (f *fault) apply(b []byte) [][]byte {
	if f == nil || f.rng == nil {
		return [][]byte{b}
	}
	out := [][]byte{}
	r := f.rng.Float64()
	if f.seen++; f.seen == 100 && f.n.Load() == 0 {
		r = 0 // the 100th frame is faulted if nothing was yet: every run tests something
		if f.drop == 0 {
			r = f.dup / 2
			if f.dup == 0 {
				r = f.reorder / 2
			}
		}
	}
	switch {
	case r < f.drop:
		f.n.Add(1)
	case r < f.drop+f.dup:
		f.n.Add(1)
		out = append(out, b, append([]byte(nil), b...))
	case r < f.drop+f.dup+f.reorder && f.held == nil:
		f.n.Add(1)
		f.held = append([]byte(nil), b...)
		return nil
	default:
		out = append(out, b)
	}
	if f.held != nil {
		out = append(out, f.held)
		f.held = nil
	}
	return out
}

// world is a gVisor netstack playing the guest, wired to a translator
// without a TAP: the guest's frames are handled as the TAP reader would,
// the translator's frames come back through the rx ring.
type world struct {
	t        *testing.T
	sh       *rings.Shared
	tr       *Translator
	g        *gstack.Stack
	dial     netip.AddrPort // where every flow connects
	up, down atomic.Uint64
	ended    atomic.Int64
	mu       sync.Mutex
	conns    []*Conn
	toTr     *fault // guest → translator
	toGuest  *fault // translator → guest
}

type worldOpts struct {
	mtu           int
	toTr, toGuest *fault
	guestRcvBuf   int
	offload       bool // frames to the guest may carry partial checksums (completed here, as a TAP guest would)
	maxConnecting int
}

func newWorld(t *testing.T, dial netip.AddrPort, o worldOpts) *world {
	t.Helper()
	if o.mtu == 0 {
		o.mtu = 1500
	}
	sizes := wire.SizesFor(o.mtu, o.offload)
	w := &world{t: t, sh: rings.NewShared(0, sizes.Buffer), dial: dial, toTr: o.toTr, toGuest: o.toGuest}
	seed := uint64(time.Now().UnixNano())
	t.Logf("fault seed %d", seed)
	for i, f := range []*fault{o.toTr, o.toGuest} {
		if f != nil {
			f.rng = rand.New(rand.NewPCG(seed, uint64(i)))
		}
	}
	tr, err := New(Options{Shared: w.sh, GatewayMAC: gwMAC, GuestMAC: func() [6]byte { return guestMAC }, MTU: o.mtu, Offload: o.offload, MaxConnecting: o.maxConnecting})
	if err != nil {
		t.Skipf("fast path unavailable here: %v", err)
	}
	w.tr = tr
	ch := channel.New(1024, uint32(o.mtu), tcpip.LinkAddress(guestMAC[:]))
	s := gstack.New(gstack.Options{
		NetworkProtocols:   []gstack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []gstack.TransportProtocolFactory{tcp.NewProtocol},
	})
	w.g = s
	if o.guestRcvBuf > 0 {
		rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: o.guestRcvBuf, Max: o.guestRcvBuf}
		mod := tcpip.TCPModerateReceiveBufferOption(false)
		s.SetTransportProtocolOption(tcp.ProtocolNumber, &rcv)
		s.SetTransportProtocolOption(tcp.ProtocolNumber, &mod)
	}
	if err := s.CreateNIC(1, ethernet.New(ch)); err != nil {
		t.Fatal(err)
	}
	for _, a := range []netip.Prefix{guestV4, guestV6} {
		proto := ipv4.ProtocolNumber
		if a.Addr().Is6() {
			proto = ipv6.ProtocolNumber
		}
		pa := tcpip.ProtocolAddress{Protocol: proto, AddressWithPrefix: tcpip.AddressWithPrefix{Address: wire.TCPIPAddr(a.Addr()), PrefixLen: a.Bits()}}
		if err := s.AddProtocolAddress(1, pa, gstack.AddressProperties{}); err != nil {
			t.Fatal(err)
		}
	}
	s.AddStaticNeighbor(1, ipv4.ProtocolNumber, wire.TCPIPAddr(gwV4), tcpip.LinkAddress(gwMAC[:]))
	s.AddStaticNeighbor(1, ipv6.ProtocolNumber, wire.TCPIPAddr(gwV6), tcpip.LinkAddress(gwMAC[:]))
	any4, _ := tcpip.NewSubnet(tcpip.AddrFrom4([4]byte{}), tcpip.MaskFromBytes(make([]byte, 4)))
	any6, _ := tcpip.NewSubnet(tcpip.AddrFrom16([16]byte{}), tcpip.MaskFromBytes(make([]byte, 16)))
	s.SetRouteTable([]tcpip.Route{
		{Destination: any4, Gateway: wire.TCPIPAddr(gwV4), NIC: 1},
		{Destination: any6, Gateway: wire.TCPIPAddr(gwV6), NIC: 1},
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	go func() { // guest → translator, as the TAP reader does
		defer func() { done <- struct{}{} }()
		for {
			pkt := ch.ReadContext(ctx)
			if pkt == nil {
				return
			}
			var b []byte
			for _, v := range pkt.AsSlices() {
				b = append(b, v...)
			}
			pkt.DecRef()
			for _, fr := range w.faulted(w.toTr, b) {
				w.fromGuest(fr)
			}
		}
	}()
	go func() { // translator → guest
		defer func() { done <- struct{}{} }()
		for {
			select {
			case <-ctx.Done():
				return
			case <-w.sh.RxWake.C():
			}
			for {
				f, ok := w.sh.PopRx()
				if !ok {
					break
				}
				b := append([]byte(nil), f.B...)
				if f.GSO.Type != rings.GSONone {
					w.t.Errorf("a GSO frame of %d bytes for a guest of MTU %d", len(b), o.mtu)
				}
				if f.GSO.NeedsCsum {
					st, off := int(f.GSO.CsumStart), int(f.GSO.CsumStart+f.GSO.CsumOffset)
					binary.BigEndian.PutUint16(b[off:], ^checksum.Checksum(b[st:], 0))
				}
				w.sh.Frames.Put(f)
				for _, fr := range w.faulted(w.toGuest, b) {
					pkt := gstack.NewPacketBuffer(gstack.PacketBufferOptions{Payload: buffer.MakeWithData(fr)})
					ch.InjectInbound(header.EthernetProtocolAll, pkt)
					pkt.DecRef()
				}
			}
		}
	}()
	t.Cleanup(func() {
		tr.Close()
		cancel()
		<-done
		<-done
		s.Close()
		s.Wait()
	})
	return w
}

// faulted applies f to frames that are not SYNs.
func (w *world) faulted(f *fault, b []byte) [][]byte {
	if f == nil || isSYN(b) {
		return [][]byte{b}
	}
	return f.apply(b)
}

func isSYN(b []byte) bool {
	if len(b) < wire.EthHdrLen {
		return false
	}
	p, ok := wire.Parse(b[wire.EthHdrLen:], header.Ethernet(b).Type() == header.IPv6ProtocolNumber)
	if !ok || p.Proto != wire.ProtoTCP {
		return false
	}
	seg, ok := wire.ParseTCP(p.L4)
	return ok && seg.Flags&wire.TCPFlagSYN != 0
}

// fromGuest is the seam in miniature: a known connection's segment to the
// translator, a SYN opens one, anything else is dropped.
func (w *world) fromGuest(b []byte) {
	if len(b) < wire.EthHdrLen {
		return
	}
	v6 := header.Ethernet(b).Type() == header.IPv6ProtocolNumber
	p, ok := wire.Parse(b[wire.EthHdrLen:], v6)
	if !ok || p.Proto != wire.ProtoTCP || !p.TransportChecksumOK() {
		return
	}
	seg, ok := wire.ParseTCP(p.L4)
	if !ok {
		return
	}
	if w.tr.Handle(&p, seg) || !seg.IsSYN() {
		return
	}
	c, err := w.tr.Open(&p, seg, Flow{Dial: w.dial, Up: &w.up, Down: &w.down, Done: func() { w.ended.Add(1) }})
	if err == nil {
		w.mu.Lock()
		w.conns = append(w.conns, c)
		w.mu.Unlock()
	}
}

func (w *world) dialGuest(dst netip.AddrPort) (*gonet.TCPConn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	proto := ipv4.ProtocolNumber
	if dst.Addr().Is6() {
		proto = ipv6.ProtocolNumber
	}
	return gonet.DialContextTCP(ctx, w.g, tcpip.FullAddress{NIC: 1, Addr: wire.TCPIPAddr(dst.Addr()), Port: dst.Port()}, proto)
}

// dialKeepalive dials with keepalive probes after 1 s idle, every 1 s, 2
// unanswered ending the connection.
func (w *world) dialKeepalive(dst netip.AddrPort) (*gonet.TCPConn, error) {
	var wq waiter.Queue
	ep, terr := w.g.NewEndpoint(tcp.ProtocolNumber, ipv4.ProtocolNumber, &wq)
	if terr != nil {
		return nil, errors.New(terr.String())
	}
	ep.SocketOptions().SetKeepAlive(true)
	idle := tcpip.KeepaliveIdleOption(time.Second)
	intvl := tcpip.KeepaliveIntervalOption(time.Second)
	ep.SetSockOpt(&idle)
	ep.SetSockOpt(&intvl)
	ep.SetSockOptInt(tcpip.KeepaliveCountOption, 2)
	entry, ch := waiter.NewChannelEntry(waiter.WritableEvents)
	wq.EventRegister(&entry)
	defer wq.EventUnregister(&entry)
	terr = ep.Connect(tcpip.FullAddress{NIC: 1, Addr: wire.TCPIPAddr(dst.Addr()), Port: dst.Port()})
	if _, ok := terr.(*tcpip.ErrConnectStarted); ok {
		select {
		case <-ch:
		case <-time.After(10 * time.Second):
			ep.Close()
			return nil, errors.New("connect timed out")
		}
		terr = ep.LastError()
	}
	if terr != nil {
		ep.Close()
		return nil, errors.New(terr.String())
	}
	return gonet.NewTCPConn(&wq, ep), nil
}

// waitEnded waits until n connections are over in the translator.
func (w *world) waitEnded(n int64) {
	w.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for w.ended.Load() < n {
		if time.Now().After(deadline) {
			w.t.Fatalf("%d connections ended in the translator, want %d (active %d)", w.ended.Load(), n, w.tr.Active())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// listen starts a loopback server running serve on each connection.
func listen(t *testing.T, network string, serve func(c *net.TCPConn)) netip.AddrPort {
	t.Helper()
	addr := "127.0.0.1:0"
	if network == "tcp6" {
		addr = "[::1]:0"
	}
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Skipf("no %s loopback: %v", network, err)
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
			go func() {
				defer wg.Done()
				defer c.Close()
				serve(c.(*net.TCPConn))
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}
