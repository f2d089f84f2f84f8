package tap

import (
	"bytes"
	"runtime"
	"testing"
	"time"

	"github.com/msbtap/msbtap/rings"
	"github.com/msbtap/msbtap/tap/taptest"
)

func TestPumpMovesFramesBothWays(t *testing.T) {
	dev := taptest.New(64)
	sh := rings.NewShared(16, 1600)
	p := StartPump(dev, sh, 1518, nil)
	defer func() { p.Close(); p.Wait() }()

	frame := bytes.Repeat([]byte{0xab}, 60)
	dev.Inject(frame)
	select {
	case <-sh.TxWake.C():
	case <-time.After(2 * time.Second):
		t.Fatal("reader did not wake the stack")
	}
	f, ok := sh.PopTx()
	if !ok || !bytes.Equal(f.B, frame) {
		t.Fatalf("tx ring: got %v, want the injected frame", ok)
	}

	out := sh.Frames.Get()
	out.B = append(out.B, bytes.Repeat([]byte{0xcd}, 70)...)
	sh.PushRx(out)
	select {
	case got := <-dev.Written:
		if len(got) != 70 || got[0] != 0xcd {
			t.Fatalf("device got %x", got)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("writer did not deliver the rx frame")
	}
}

// TestPumpKeepsNoFrameAlive: once a frame is handed on (to the stack, or
// written to the device and put back), the pump holds no reference to it,
// so that the collector can return a burst's buffers. Both loops used to
// cut their batch slices to [:0], which kept the last batch reachable.
func TestPumpKeepsNoFrameAlive(t *testing.T) {
	dev := taptest.New(64)
	sh := rings.NewShared(16, 1600)
	p := StartPump(dev, sh, 1518, nil)
	defer func() { p.Close(); p.Wait() }()
	freed := make(chan string, 2)

	dev.Inject(bytes.Repeat([]byte{0xab}, 60))
	select {
	case <-sh.TxWake.C():
	case <-time.After(2 * time.Second):
		t.Fatal("reader did not wake the stack")
	}
	in, ok := sh.PopTx()
	if !ok {
		t.Fatal("no frame on the tx ring")
	}
	runtime.SetFinalizer(in, func(*rings.Frame) { freed <- "read" })
	in = nil // the stack dropped it without putting it back

	out := sh.Frames.Get()
	out.B = append(out.B, bytes.Repeat([]byte{0xcd}, 70)...)
	runtime.SetFinalizer(out, func(*rings.Frame) { freed <- "written" })
	sh.PushRx(out)
	out = nil
	select {
	case <-dev.Written:
	case <-time.After(2 * time.Second):
		t.Fatal("writer did not deliver the rx frame")
	}

	got := map[string]bool{}
	deadline := time.Now().Add(3 * time.Second)
	for len(got) < 2 && time.Now().Before(deadline) {
		runtime.GC() // twice over the loop: the pool's victim cache goes too
		select {
		case which := <-freed:
			got[which] = true
		case <-time.After(20 * time.Millisecond):
		}
	}
	if !got["written"] || !got["read"] {
		t.Errorf("frames collected: %v; want the written one and the read one", got)
	}
}

func TestPumpDropsOversizedAndRuntFrames(t *testing.T) {
	dev := taptest.New(64)
	sh := rings.NewShared(16, 1600)
	p := StartPump(dev, sh, 1518, nil)
	defer func() { p.Close(); p.Wait() }()
	dev.Inject(make([]byte, 1519))
	dev.Inject(make([]byte, 5000))
	dev.Inject(make([]byte, 10))
	dev.Inject(make([]byte, 60)) // a good one, to know the others were seen
	deadline := time.Now().Add(2 * time.Second)
	for sh.Counters.TxFrames() == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := sh.Counters.Drops(rings.DropOversized); got != 2 {
		t.Errorf("oversized drops: got %d, want 2", got)
	}
	if got := sh.Counters.Drops(rings.DropMalformed); got != 1 {
		t.Errorf("runt drops: got %d, want 1", got)
	}
	if got := sh.Counters.TxFrames(); got != 1 {
		t.Errorf("tx frames: got %d, want 1", got)
	}
}

// TestPumpFullRingDrops: with nobody draining, the reader drops and counts
// instead of blocking, and keeps reading.
func TestPumpFullRingDrops(t *testing.T) {
	dev := taptest.New(256)
	sh := rings.NewShared(8, 1600)
	p := StartPump(dev, sh, 1518, nil)
	defer func() { p.Close(); p.Wait() }()
	for i := 0; i < 100; i++ {
		dev.Inject(make([]byte, 60))
	}
	deadline := time.Now().Add(2 * time.Second)
	for sh.Counters.TxFrames() < 100 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := sh.Counters.Drops(rings.DropTxFull); got != 92 {
		t.Errorf("tx_full drops: got %d, want 92 (100 frames, ring of 8)", got)
	}
}

func TestPumpCloseIsIdempotent(t *testing.T) {
	dev := taptest.New(4)
	p := StartPump(dev, rings.NewShared(4, 1600), 1518, nil)
	if err := p.Close(); err != nil {
		t.Errorf("first Close: %v", err)
	}
	if err := p.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	waited := make(chan struct{})
	go func() { p.Wait(); p.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-time.After(5 * time.Second):
		t.Fatal("Wait did not return after Close")
	}
}

func TestVNetHdrRoundTrip(t *testing.T) {
	g := rings.GSO{NeedsCsum: true, CsumStart: 34, CsumOffset: 16, Type: rings.GSOTCPv4, Size: 1448, HdrLen: 66}
	var h [VNetHdrLen]byte
	encodeVNetHdr(h[:], &g)
	var back rings.GSO
	decodeVNetHdr(h[:], &back)
	if back != g {
		t.Fatalf("round trip: got %+v, want %+v", back, g)
	}
	h[1] |= vnetGSOECN
	decodeVNetHdr(h[:], &back)
	if back.Type != rings.GSOTCPv4 {
		t.Errorf("ECN bit not masked: type %d", back.Type)
	}
}

// TestPumpSmallFramesStaySmall: with GSO-sized buffers, a small frame is
// queued in a small buffer and a large one arrives whole, joined from the
// small buffer and the spill.
func TestPumpSmallFramesStaySmall(t *testing.T) {
	dev := taptest.New(64)
	sh := rings.NewShared(16, 65553+256)
	p := StartPump(dev, sh, 65553, nil)
	defer func() { p.Close(); p.Wait() }()
	small := bytes.Repeat([]byte{0xab}, 60)
	large := make([]byte, 9000)
	for i := range large {
		large[i] = byte(i * 7)
	}
	dev.Inject(small)
	dev.Inject(large)
	var got []*rings.Frame
	deadline := time.Now().Add(2 * time.Second)
	for len(got) < 2 && time.Now().Before(deadline) {
		if f, ok := sh.PopTx(); ok {
			got = append(got, f)
			continue
		}
		time.Sleep(5 * time.Millisecond)
	}
	if len(got) != 2 {
		t.Fatalf("got %d frames, want 2", len(got))
	}
	if !bytes.Equal(got[0].B, small) || got[0].Cap() != rings.SmallSize {
		t.Errorf("small frame: %d bytes in a buffer of %d, want %d in one of %d", len(got[0].B), got[0].Cap(), len(small), rings.SmallSize)
	}
	if !bytes.Equal(got[1].B, large) {
		t.Errorf("large frame not whole: %d bytes", len(got[1].B))
	}
}

// FuzzVNetHdr: any 10 bytes decode, and what decodes encodes back to the
// same bytes (flags and GSO type aside from the ECN bit).
func FuzzVNetHdr(f *testing.F) {
	f.Add([]byte{1, 1, 66, 0, 168, 5, 34, 0, 16, 0})
	f.Add(make([]byte, VNetHdrLen))
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) < VNetHdrLen {
			return
		}
		var g rings.GSO
		decodeVNetHdr(b[:VNetHdrLen], &g)
		var back [VNetHdrLen]byte
		encodeVNetHdr(back[:], &g)
		var again rings.GSO
		decodeVNetHdr(back[:], &again)
		if again != g {
			t.Fatalf("round trip: %+v became %+v", g, again)
		}
	})
}

// TestPumpWriteNow: frames written on the caller's thread reach the device
// (and the capture hook) when the rx ring is empty; with frames queued in
// the ring, WriteNow declines, so that nothing overtakes them.
func TestPumpWriteNow(t *testing.T) {
	dev := taptest.New(64)
	sh := rings.NewShared(16, 1600)
	p := StartPump(dev, sh, 1518, nil)
	defer func() { p.Close(); p.Wait() }()
	var seen int
	p.SetCapture(func([]byte) { seen++ })
	frame := func(b byte) *rings.Frame {
		f := sh.Frames.Get()
		f.B = append(f.B, bytes.Repeat([]byte{b}, 64)...)
		return f
	}
	if !p.WriteNow([]*rings.Frame{frame(1), frame(2)}) {
		t.Fatal("WriteNow declined with the writer idle and the ring empty")
	}
	for _, want := range []byte{1, 2} {
		select {
		case got := <-dev.Written:
			if got[0] != want {
				t.Fatalf("device got frame %d, want %d", got[0], want)
			}
		case <-time.After(2 * time.Second):
			t.Fatal("WriteNow's frames never reached the device")
		}
	}
	if seen != 2 || sh.Counters.RxFrames() != 2 {
		t.Errorf("capture saw %d frames, counters %d; want 2 and 2", seen, sh.Counters.RxFrames())
	}
	sh.PushRxNoWake(frame(3)) // queued, the writer not woken yet
	if p.WriteNow([]*rings.Frame{frame(4)}) {
		t.Fatal("WriteNow wrote past a frame queued in the ring")
	}
}
