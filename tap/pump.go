package tap

import (
	"errors"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"

	"github.com/msbtap/msbtap/rings"
)

// Pump moves frames between a Device and the shared rings with two
// goroutines: RoutineReadFromTAP (device → tx ring → wake the stack) and
// RoutineWriteToTAP (rx wake → drain the rx ring → device). The reads may
// be left to an event loop instead (NewPump, HandOverReads, ReadReady).
type Pump struct {
	dev      Device
	sh       *rings.Shared
	maxFrame int
	log      *slog.Logger

	rd      *readState // the reader's buffers (RoutineReadFromTAP or ReadReady)
	reading bool       // StartReader was called: the reader owns rd

	// capture, when set, sees every frame both ways (a packet capture).
	capture atomic.Pointer[func([]byte)]

	// wmu is held while frames are written to the device, by the writer
	// goroutine or by WriteNow; nowBufs is WriteNow's scratch.
	wmu     sync.Mutex
	nowBufs [][]byte

	done      chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup
}

// SetCapture makes f (the packet capture's hook) see every frame the pump
// moves, both ways, from now on (nil stops it). f must copy what it keeps
// and never block.
func (p *Pump) SetCapture(f func([]byte)) {
	if f == nil {
		p.capture.Store(nil)
		return
	}
	p.capture.Store(&f)
}

// StartPump starts moving frames. maxFrame is the largest frame accepted from
// the guest; larger ones are dropped and counted. The shared pool's buffers
// must be larger than maxFrame so that an oversized frame is recognised
// instead of silently truncated.
func StartPump(dev Device, sh *rings.Shared, maxFrame int, log *slog.Logger) *Pump {
	p := NewPump(dev, sh, maxFrame, log)
	p.StartReader()
	return p
}

// NewPump starts the writer only: the device's frames are read either by
// the pump's own reader (StartReader) or by an event loop that took them
// with HandOverReads and calls ReadReady (the TCP fast path's), never both.
func NewPump(dev Device, sh *rings.Shared, maxFrame int, log *slog.Logger) *Pump {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	p := &Pump{dev: dev, sh: sh, maxFrame: maxFrame, log: log, done: make(chan struct{})}
	p.rd = newReadState(p)
	p.wg.Add(1)
	go p.RoutineWriteToTAP()
	return p
}

// StartReader starts the pump's own reader goroutine.
func (p *Pump) StartReader() {
	p.reading = true
	p.rd.read = p.dev.Read
	p.wg.Add(1)
	go p.RoutineReadFromTAP()
}

// HandOverReads gives the device's reads to an event loop: it returns the
// descriptor to wait on (readable when frames wait), taken out of the Go
// runtime's poller, and the loop calls ReadReady. It reports false when
// the device cannot be read that way (a test device) or the reader runs:
// the caller must then StartReader.
func (p *Pump) HandOverReads() (int, bool) {
	d, ok := p.dev.(interface {
		Detach() (int, error)
		ReadNow(bufs, spill [][]byte, sizes []int) (int, error)
	})
	if !ok || p.reading {
		return -1, false
	}
	p.wmu.Lock() // no write under way while the descriptor changes
	defer p.wmu.Unlock()
	fd, err := d.Detach()
	if err != nil {
		p.log.Warn("tap: reads stay with the pump", "err", err)
		return -1, false
	}
	p.rd.read = d.ReadNow
	return fd, true
}

// ReadReady reads the frames that wait on the device, up to a batch,
// without blocking, and handles or queues them as the reader does. It
// reports how many it read; an error says the device is gone. Only the
// loop HandOverReads gave the reads to may call it.
func (p *Pump) ReadReady() (int, error) {
	if p.rd.read == nil {
		return 0, errors.New("tap: ReadReady without HandOverReads")
	}
	return p.rd.once()
}

// readState is the reader's batch of buffers, kept between reads: small
// buffers for every slot, and large ones a frame spills into.
type readState struct {
	p              *Pump
	read           func(bufs, spill [][]byte, sizes []int) (int, error) // Device.Read, or ReadNow for a loop
	hl, small      int
	smalls, larges []*rings.Frame
	bufs, spill    [][]byte
	sizes          []int
	ready          []*rings.Frame
}

func newReadState(p *Pump) *readState {
	fr := p.sh.Frames
	batch := p.dev.BatchSize()
	r := &readState{
		p: p, hl: p.dev.VNetHdrLen(), small: fr.SmallSize(),
		smalls: make([]*rings.Frame, batch), larges: make([]*rings.Frame, batch),
		bufs: make([][]byte, batch), sizes: make([]int, batch), ready: make([]*rings.Frame, 0, batch),
	}
	if fr.Size() > r.small {
		r.spill = make([][]byte, batch)
	}
	return r
}

// release gives the batch's buffers back to the pool.
func (r *readState) release() {
	fr := r.p.sh.Frames
	for i := range r.smalls {
		if r.smalls[i] != nil {
			fr.Put(r.smalls[i])
			r.smalls[i] = nil
		}
		if r.larges[i] != nil {
			fr.Put(r.larges[i])
			r.larges[i] = nil
		}
	}
}

// once reads one batch and hands its frames on.
func (r *readState) once() (int, error) {
	p, fr := r.p, r.p.sh.Frames
	for i := range r.smalls {
		if r.smalls[i] == nil {
			r.smalls[i] = fr.Get()
		}
		if r.spill != nil && r.larges[i] == nil {
			r.larges[i] = fr.GetLarge()
		}
		// The virtio net header, if any, lands in the headroom and
		// the frame right after it, where B starts.
		r.bufs[i] = r.smalls[i].Buffer()[rings.Headroom-r.hl:]
		if r.spill != nil {
			r.spill[i] = r.larges[i].Buffer()[rings.Headroom+r.small:]
		}
	}
	n, err := r.read(r.bufs, r.spill, r.sizes)
	if err != nil {
		return 0, err
	}
	ready := r.ready[:0]
	for i := 0; i < n; i++ {
		if f := r.take(i); f != nil {
			ready = append(ready, f)
		}
	}
	if len(ready) > 0 {
		p.deliver(ready)
		clear(ready) // the stack owns them now: keep none alive here
	}
	r.ready = ready[:0]
	return n, nil
}

// take checks frame i of a batch just read and returns it in a frame of
// its own (nil: dropped and counted), putting a fresh buffer in its slot.
func (r *readState) take(i int) *rings.Frame {
	p, fr := r.p, r.p.sh.Frames
	size, room := r.sizes[i]-r.hl, len(r.bufs[i])
	if r.spill != nil {
		room += len(r.spill[i])
	}
	if size > p.maxFrame || r.sizes[i] >= room { // a full read may be cut short
		p.sh.Counters.Drop(rings.DropOversized)
		return nil
	}
	if size < 14 {
		p.sh.Counters.Drop(rings.DropMalformed)
		return nil
	}
	var f *rings.Frame
	if size <= r.small {
		f, r.smalls[i] = r.smalls[i], fr.Get()
	} else {
		// Join the small part to the rest in the large buffer.
		f, r.larges[i] = r.larges[i], fr.GetLarge()
		copy(f.Buffer()[rings.Headroom-r.hl:rings.Headroom+r.small], r.bufs[i])
	}
	f.SetLen(size)
	if r.hl > 0 {
		decodeVNetHdr(f.Head(r.hl), &f.GSO)
	}
	if t := p.capture.Load(); t != nil {
		(*t)(f.B)
	}
	p.sh.Counters.AddTx(size)
	return f
}

// RoutineReadFromTAP reads frames in batches and queues them for the stack,
// waking it once per batch. It never blocks on the ring: a full ring drops.
// Each frame is read into a small buffer, spilling over into a large one
// only when it is larger (a GSO segment): a flood of small packets holds
// small buffers only, and a large frame costs one copy of the small part.
func (p *Pump) RoutineReadFromTAP() {
	defer p.wg.Done()
	defer p.rd.release()
	for {
		if _, err := p.rd.once(); err != nil {
			if !errors.Is(err, os.ErrClosed) && !p.closing() {
				p.log.Error("tap reader stopped", "err", err)
			}
			return
		}
	}
}

// deliver hands a batch of guest frames on. When nobody is handling guest
// frames, the reader handles them itself, run to completion (through the
// stack's classification and into the netstack), with whatever waits in
// the ring first; otherwise they queue in the ring for the poll loop.
func (p *Pump) deliver(frames []*rings.Frame) {
	sh := p.sh
	if h, ok := sh.AcquireTx(); ok {
		for {
			f, ok := sh.PopTx()
			if !ok {
				break
			}
			h(f)
		}
		for _, f := range frames {
			h(f)
		}
		if sh.ReleaseTx() {
			sh.TxWake.Wake()
		}
		return
	}
	for _, f := range frames {
		sh.PushTx(f) // on a full ring the frame goes back to the pool
	}
	sh.TxWake.Wake()
}

// RoutineWriteToTAP waits for the rx wake, drains the rx ring in batches and
// writes them to the device.
func (p *Pump) RoutineWriteToTAP() {
	defer p.wg.Done()
	batch, hl := p.dev.BatchSize(), p.dev.VNetHdrLen()
	frames := make([]*rings.Frame, 0, batch)
	bufs := make([][]byte, 0, batch)
	for {
		select {
		case <-p.done:
			p.drainRx()
			return
		case <-p.sh.RxWake.C():
		}
		for {
			frames, bufs = frames[:0], bufs[:0]
			p.wmu.Lock()
			for len(frames) < batch {
				f, ok := p.sh.PopRx()
				if !ok {
					break
				}
				frames = append(frames, f)
				if hl > 0 {
					encodeVNetHdr(f.Head(hl), &f.GSO)
				}
				if t := p.capture.Load(); t != nil {
					(*t)(f.B)
				}
				bufs = append(bufs, f.Full(hl))
			}
			if len(frames) == 0 {
				p.wmu.Unlock()
				break
			}
			n, err := p.dev.Write(bufs)
			for i, f := range frames {
				if i < n {
					p.sh.Counters.AddRx(len(f.B))
				} else {
					p.sh.Counters.Drop(rings.DropOther)
				}
				p.sh.Frames.Put(f)
			}
			p.wmu.Unlock()
			// Forget the batch: a slice cut to [:0] would still hold its
			// frames, up to a batch of 64 KiB buffers after a burst.
			clear(frames)
			clear(bufs)
			if err != nil {
				if !errors.Is(err, os.ErrClosed) && !p.closing() {
					p.log.Error("tap writer stopped", "err", err)
				}
				<-p.done
				p.drainRx()
				return
			}
		}
	}
}

// WriteNow writes frames to the device on the caller's thread, when the
// writer is idle and the rx ring empty (so frames keep their order); it
// reports false, taking nothing, otherwise. The frames go back to the pool.
// The TCP fast path's loop answers this way without waking the writer.
func (p *Pump) WriteNow(frames []*rings.Frame) bool {
	if !p.wmu.TryLock() {
		return false
	}
	defer p.wmu.Unlock()
	if p.sh.Rx.Len() > 0 || p.closing() {
		return false
	}
	hl := p.dev.VNetHdrLen()
	bufs := p.nowBufs[:0]
	for _, f := range frames {
		if hl > 0 {
			encodeVNetHdr(f.Head(hl), &f.GSO)
		}
		if t := p.capture.Load(); t != nil {
			(*t)(f.B)
		}
		bufs = append(bufs, f.Full(hl))
	}
	n, _ := p.dev.Write(bufs) // an error stops the writer goroutine too
	for i, f := range frames {
		if i < n {
			p.sh.Counters.AddRx(len(f.B))
		} else {
			p.sh.Counters.Drop(rings.DropOther)
		}
		p.sh.Frames.Put(f)
	}
	clear(bufs)
	p.nowBufs = bufs[:0]
	return true
}

func (p *Pump) closing() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *Pump) drainRx() {
	for {
		f, ok := p.sh.PopRx()
		if !ok {
			return
		}
		p.sh.Frames.Put(f)
	}
}

// Close stops both goroutines and closes the device. It is safe to call more
// than once; Wait joins the goroutines. A loop that reads with ReadReady
// must have stopped before.
func (p *Pump) Close() error {
	var err error
	p.closeOnce.Do(func() {
		close(p.done)
		err = p.dev.Close()
		if !p.reading {
			p.rd.release()
		}
	})
	return err
}

// Wait blocks until both goroutines have returned.
func (p *Pump) Wait() { p.wg.Wait() }
