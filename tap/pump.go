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
// RoutineWriteToTAP (rx wake → drain the rx ring → device).
type Pump struct {
	dev      Device
	sh       *rings.Shared
	maxFrame int
	log      *slog.Logger

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
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	p := &Pump{dev: dev, sh: sh, maxFrame: maxFrame, log: log, done: make(chan struct{})}
	p.wg.Add(2)
	go p.RoutineReadFromTAP()
	go p.RoutineWriteToTAP()
	return p
}

// RoutineReadFromTAP reads frames in batches and queues them for the stack,
// waking it once per batch. It never blocks on the ring: a full ring drops.
// Each frame is read into a small buffer, spilling over into a large one
// only when it is larger (a GSO segment): a flood of small packets holds
// small buffers only, and a large frame costs one copy of the small part.
func (p *Pump) RoutineReadFromTAP() {
	defer p.wg.Done()
	fr := p.sh.Frames
	batch, hl, small := p.dev.BatchSize(), p.dev.VNetHdrLen(), fr.SmallSize()
	smalls := make([]*rings.Frame, batch)
	larges := make([]*rings.Frame, batch)
	bufs := make([][]byte, batch)
	var spill [][]byte
	if fr.Size() > small {
		spill = make([][]byte, batch)
	}
	sizes := make([]int, batch)
	ready := make([]*rings.Frame, 0, batch)
	for i := range smalls {
		smalls[i] = fr.Get()
		if spill != nil {
			larges[i] = fr.GetLarge()
		}
	}
	defer func() {
		for i := range smalls {
			fr.Put(smalls[i])
			if larges[i] != nil {
				fr.Put(larges[i])
			}
		}
	}()
	for {
		for i := range smalls {
			// The virtio net header, if any, lands in the headroom and
			// the frame right after it, where B starts.
			bufs[i] = smalls[i].Buffer()[rings.Headroom-hl:]
			if spill != nil {
				spill[i] = larges[i].Buffer()[rings.Headroom+small:]
			}
		}
		n, err := p.dev.Read(bufs, spill, sizes)
		if err != nil {
			if !errors.Is(err, os.ErrClosed) && !p.closing() {
				p.log.Error("tap reader stopped", "err", err)
			}
			return
		}
		ready = ready[:0]
		for i := 0; i < n; i++ {
			size, room := sizes[i]-hl, len(bufs[i])
			if spill != nil {
				room += len(spill[i])
			}
			if size > p.maxFrame || sizes[i] >= room { // a full read may be cut short
				p.sh.Counters.Drop(rings.DropOversized)
				continue
			}
			if size < 14 {
				p.sh.Counters.Drop(rings.DropMalformed)
				continue
			}
			var f *rings.Frame
			if size <= small {
				f, smalls[i] = smalls[i], fr.Get()
			} else {
				// Join the small part to the rest in the large buffer.
				f, larges[i] = larges[i], fr.GetLarge()
				copy(f.Buffer()[rings.Headroom-hl:rings.Headroom+small], bufs[i])
			}
			f.SetLen(size)
			if hl > 0 {
				decodeVNetHdr(f.Head(hl), &f.GSO)
			}
			if t := p.capture.Load(); t != nil {
				(*t)(f.B)
			}
			p.sh.Counters.AddTx(size)
			ready = append(ready, f)
		}
		if len(ready) > 0 {
			p.deliver(ready)
			clear(ready) // the stack owns them now: keep none alive here
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
// than once; Wait joins the goroutines.
func (p *Pump) Close() error {
	var err error
	p.closeOnce.Do(func() {
		close(p.done)
		err = p.dev.Close()
	})
	return err
}

// Wait blocks until both goroutines have returned.
func (p *Pump) Wait() { p.wg.Wait() }
