package tap

import (
	"bytes"
	"encoding/binary"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/internal/testkit/testenv"
	"github.com/msbtap/msbtap/netns"
	"github.com/msbtap/msbtap/plan"
	"github.com/msbtap/msbtap/rings"
	"github.com/msbtap/msbtap/wire"
)

// attach creates a namespace with a configured TAP and a running pump.
func attach(t *testing.T, offload bool) (*testenv.NS, *rings.Shared, plan.Plan) {
	testenv.RequireRoot(t)
	ns := testenv.NewNS(t, "tap")
	h, err := netns.Open(ns.Path())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	p, _ := plan.ForSlot(7)
	p.MTU = 1400
	dev, err := CreateInNetns(h, "eth0", offload)
	if err != nil {
		t.Fatal(err)
	}
	if err := ConfigureGuest(h, dev.Name(), p); err != nil {
		dev.Close()
		t.Fatal(err)
	}
	sh := rings.NewShared(64, wire.SizesFor(p.MTU, offload).Buffer)
	pump := StartPump(dev, sh, wire.SizesFor(p.MTU, offload).MaxFrame, nil)
	t.Cleanup(func() { pump.Close(); pump.Wait() })
	return ns, sh, p
}

func TestAttachConfiguresNamespace(t *testing.T) {
	ns, _, p := attach(t, false)
	h, err := netns.Open(ns.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	link, err := nl.LinkByName("eth0")
	if err != nil {
		t.Fatalf("no eth0 in the namespace: %v", err)
	}
	a := link.Attrs()
	if a.MTU != 1400 {
		t.Errorf("MTU: got %d, want 1400", a.MTU)
	}
	if a.HardwareAddr.String() != p.GuestMAC.String() {
		t.Errorf("MAC: got %s, want %s", a.HardwareAddr, p.GuestMAC)
	}
	if a.Flags&net.FlagUp == 0 {
		t.Error("eth0 is not up")
	}
	addrs, _ := nl.AddrList(link, netlink.FAMILY_ALL)
	var got []string
	for _, ad := range addrs {
		got = append(got, ad.IPNet.String())
	}
	for _, want := range []string{p.GuestIPv4.String(), p.GuestIPv6.String()} {
		if !strings.Contains(strings.Join(got, " "), want) {
			t.Errorf("addresses %v lack %s", got, want)
		}
	}
	for fam, gw := range map[int]string{netlink.FAMILY_V4: p.GatewayV4.String(), netlink.FAMILY_V6: p.GatewayV6.String()} {
		routes, _ := nl.RouteList(link, fam)
		found := false
		for _, r := range routes {
			if (r.Dst == nil || r.Dst.IP.IsUnspecified()) && r.Gw.String() == gw {
				found = true
			}
		}
		if !found {
			t.Errorf("no default route via %s: %v", gw, routes)
		}
	}
	if out := ns.MustRun(t, "ip", "link", "show", "lo"); !strings.Contains(out, "UP") {
		t.Errorf("lo is not up: %s", out)
	}
}

// TestFrameReachesTxRing: an ARP request the namespace sends for the
// gateway arrives in the tx ring.
func TestFrameReachesTxRing(t *testing.T) {
	for _, off := range []bool{false, true} {
		t.Run(map[bool]string{false: "plain", true: "vnet"}[off], func(t *testing.T) { testFrameReachesTxRing(t, off) })
	}
}

func testFrameReachesTxRing(t *testing.T, offload bool) {
	ns, sh, p := attach(t, offload)
	go ns.Run("ping", "-c", "1", "-W", "1", p.GatewayV4.String())
	deadline := time.After(5 * time.Second)
	for {
		select {
		case <-sh.TxWake.C():
		case <-deadline:
			t.Fatal("no ARP request for the gateway reached the tx ring")
		}
		for {
			f, ok := sh.Tx.Pop()
			if !ok {
				break
			}
			b := f.B
			if len(b) >= 42 && binary.BigEndian.Uint16(b[12:14]) == 0x0806 &&
				binary.BigEndian.Uint16(b[20:22]) == 1 && net.IP(b[38:42]).String() == p.GatewayV4.String() {
				if !bytes.Equal(b[6:12], p.GuestMAC) {
					t.Errorf("ARP source MAC %x, want %s", b[6:12], p.GuestMAC)
				}
				if sh.Counters.TxFrames() == 0 || sh.Counters.TxBytes() == 0 {
					t.Error("tx counters did not move")
				}
				return
			}
			sh.Frames.Put(f)
		}
	}
}

// TestRxRingReachesNamespace: a frame pushed into the rx ring is received
// by an AF_PACKET socket inside the namespace.
func TestRxRingReachesNamespace(t *testing.T) {
	for _, off := range []bool{false, true} {
		t.Run(map[bool]string{false: "plain", true: "vnet"}[off], func(t *testing.T) { testRxRingReachesNamespace(t, off) })
	}
}

func testRxRingReachesNamespace(t *testing.T, offload bool) {
	ns, sh, p := attach(t, offload)
	h, err := netns.Open(ns.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	const etherType = 0x88b5 // IEEE local experimental
	var fd int
	err = netns.Do(h, func() error {
		var err error
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(etherType)))
		if err != nil {
			return err
		}
		ifi, err := net.InterfaceByName("eth0")
		if err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(etherType), Ifindex: ifi.Index})
	})
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	tv := unix.Timeval{Sec: 5}
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)

	payload := []byte("msbtap rx ring test frame")
	f := sh.Frames.Get()
	f.B = append(f.B, p.GuestMAC...)
	f.B = append(f.B, p.GatewayMAC...)
	f.B = binary.BigEndian.AppendUint16(f.B, etherType)
	f.B = append(f.B, payload...)
	if !sh.PushRx(f) {
		t.Fatal("rx ring refused the frame")
	}
	buf := make([]byte, 2048)
	n, _, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		t.Fatalf("no frame inside the namespace: %v", err)
	}
	if !bytes.Contains(buf[:n], payload) {
		t.Fatalf("received %x, want it to carry %q", buf[:n], payload)
	}
	deadline := time.Now().Add(2 * time.Second)
	for sh.Counters.RxFrames() == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if sh.Counters.RxFrames() == 0 {
		t.Error("rx counters did not move")
	}
}

func TestCreateRefusesExistingName(t *testing.T) {
	testenv.RequireRoot(t)
	ns := testenv.NewNS(t, "dup")
	ns.MustRun(t, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer")
	h, err := netns.Open(ns.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if _, err := CreateInNetns(h, "eth0", false); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("got %v, want an 'already exists' error", err)
	}
}

func TestOpenNetnsMissing(t *testing.T) {
	_, err := netns.Open("/run/netns/msbtap-no-such-namespace")
	if err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Fatalf("got %v, want 'does not exist'", err)
	}
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
