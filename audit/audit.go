// Package audit keeps the decision log: one JSON line per flow decision,
// repeats of the same decision folded into one line per short window, the
// file bounded by rotation, and neither a termination nor the first deny of
// a destination ever dropped.
package audit

import (
	"bufio"
	"container/list"
	"encoding/json"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/policy"
)

// Record is one line of the decision log.
type Record struct {
	Time      string `json:"time"`
	FlowID    uint64 `json:"flow_id,omitempty"`
	Direction string `json:"direction"`
	Proto     string `json:"proto"`
	Transport string `json:"transport,omitempty"` // of a DNS query: udp or tcp
	Src       string `json:"src"`
	Dst       string `json:"dst,omitempty"`
	Domain    string `json:"domain,omitempty"`
	Rule      int    `json:"rule"`
	RuleText  string `json:"rule_text"`
	Action    string `json:"action"`
	// Repeats counts the further decisions like this one (same direction,
	// protocol, destination address, rule and action) that the window
	// folded into this line, the last of them at Until.
	Repeats int    `json:"repeats,omitempty"`
	Until   string `json:"until,omitempty"`
	flow.L7
}

// Defaults of Options.
const (
	DefaultMaxBytes = 64 << 20
	DefaultWindow   = time.Second
	DefaultMaxKeys  = 4096
	// mustKeysFactor bounds the decisions that are never dropped (a
	// termination, the first deny of an address) to this many times
	// MaxKeys per window.
	mustKeysFactor = 4
	deniedMemory   = 65536 // addresses whose first deny was logged
)

// Options configure a Log.
type Options struct {
	// Path is the file to append to, "-" for standard output, or "" for
	// none (the records still go to subscribers).
	Path string
	// MaxBytes rotates the file once it would grow past this: it becomes
	// PATH.1 (replacing the previous one) and a new file starts, so the
	// log takes at most twice MaxBytes on disk (default 64 MiB).
	MaxBytes int64
	// Window is how long repeats of one decision are folded together
	// (default 1 s).
	Window time.Duration
	// MaxKeys bounds the distinct decisions kept per window (default
	// 4096); past it, decisions are dropped and counted, but for a
	// termination and the first deny of a destination address.
	MaxKeys int
	// Describe names a decision's rule.
	Describe func(policy.Decision) string
	// Domain returns the name a destination was resolved from, if any.
	Domain func(netip.Addr) string
	// Rotate, if set, rotates the file for a process that may no longer
	// create files itself (the agent once set up): it moves PATH to
	// PATH.1 and returns PATH opened anew, empty, for appending.
	Rotate func() (*os.File, error)
	Log    *slog.Logger
}

type key struct {
	dir    policy.Direction
	proto  policy.Proto
	dns    bool
	dst    netip.Addr
	rule   int
	action policy.Action
	l7     flow.L7
}

type pending struct {
	at    time.Time
	f     policy.Flow
	d     policy.Decision
	l7    flow.L7
	count int
	last  time.Time
}

// Log is an open decision log. Decision never blocks the packet path: it
// updates the window under a short lock, and a goroutine writes.
type Log struct {
	o Options
	w io.Writer
	r *rotating // nil for standard output

	mu     sync.Mutex // mu protects window, queue, denied and order
	window map[key]*pending
	queue  []*pending // first occurrences not yet written
	denied map[netip.Addr]*list.Element
	order  *list.List // denied addresses, oldest first

	dropped atomic.Uint64
	subsMu  sync.Mutex // subsMu protects subs
	subs    map[chan Record]struct{}
	lost    atomic.Uint64 // records a slow subscriber missed
	wake    chan struct{}
	done    chan struct{}
	stopped chan struct{}
	once    sync.Once
}

// Open opens the log (the file with O_NOFOLLOW, mode 0600) and starts its
// writer.
func Open(o Options) (*Log, error) {
	if o.MaxBytes <= 0 {
		o.MaxBytes = DefaultMaxBytes
	}
	if o.Window <= 0 {
		o.Window = DefaultWindow
	}
	if o.MaxKeys <= 0 {
		o.MaxKeys = DefaultMaxKeys
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Describe == nil {
		o.Describe = func(policy.Decision) string { return "" }
	}
	l := &Log{o: o, window: make(map[key]*pending), denied: make(map[netip.Addr]*list.Element), order: list.New(),
		subs: make(map[chan Record]struct{}), wake: make(chan struct{}, 1), done: make(chan struct{}), stopped: make(chan struct{})}
	switch o.Path {
	case "":
		l.w = io.Discard
	case "-":
		l.w = os.Stdout
	default:
		r, err := openRotating(o.Path, o.MaxBytes, o.Rotate)
		if err != nil {
			return nil, err
		}
		l.r, l.w = r, r
	}
	go l.routineWrite()
	return l, nil
}

// Decision records a flow's decision. A nil Log ignores it.
func (l *Log) Decision(fl *flow.Flow) { l.Inspected(fl, fl.Decision, flow.L7{}) }

// Inspected records decision d on what flow fl carried (x): its domain,
// when the flow has none, is the name asked for inside. Repeats fold as
// for Decision, when x is the same too.
func (l *Log) Inspected(fl *flow.Flow, d policy.Decision, x flow.L7) {
	if l == nil {
		return
	}
	f := fl.Flow
	if f.Domain == "" {
		f.Domain = x.Name()
	}
	now := time.Now()
	dst := f.Dst.Addr().Unmap()
	k := key{f.Direction, f.Proto, f.DNS, dst, d.Rule, d.Action, x}
	if f.DNS {
		k.dst = netip.Addr{} // a query's "destination" is its name
	}
	l.mu.Lock()
	if p := l.window[k]; p != nil {
		p.count++
		p.last = now
		l.mu.Unlock()
		return
	}
	must := d.Action == policy.Terminate || (d.Action != policy.Allow && l.firstDenyLocked(dst))
	if n := len(l.window); n >= l.o.MaxKeys && (!must || n >= l.o.MaxKeys*mustKeysFactor) {
		l.mu.Unlock()
		l.dropped.Add(1)
		return
	}
	if d.Action != policy.Allow {
		l.rememberDenyLocked(dst)
	}
	p := &pending{at: now, f: f, d: d, l7: x, count: 1, last: now}
	l.window[k] = p
	l.queue = append(l.queue, p)
	l.mu.Unlock()
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

func (l *Log) firstDenyLocked(a netip.Addr) bool {
	_, seen := l.denied[a]
	return !seen
}

func (l *Log) rememberDenyLocked(a netip.Addr) {
	if el, ok := l.denied[a]; ok {
		l.order.MoveToBack(el)
		return
	}
	if l.order.Len() >= deniedMemory {
		oldest := l.order.Front()
		delete(l.denied, oldest.Value.(netip.Addr))
		l.order.Remove(oldest)
	}
	l.denied[a] = l.order.PushBack(a)
}

// Dropped returns the decisions not logged because a window was full.
func (l *Log) Dropped() uint64 {
	if l == nil {
		return 0
	}
	return l.dropped.Load()
}

// routineWrite writes first occurrences as they come and, at the end of
// each window, one line for each decision that repeated.
func (l *Log) routineWrite() {
	defer close(l.stopped)
	bw := bufio.NewWriter(l.w)
	enc := json.NewEncoder(bw)
	t := time.NewTicker(l.o.Window)
	defer t.Stop()
	write := func(p *pending, repeats int) {
		r := l.record(p, repeats)
		if err := enc.Encode(&r); err != nil {
			l.o.Log.Error("audit log write failed", "err", err)
		}
		l.publish(r)
	}
	for {
		var closing, windowEnd bool
		select {
		case <-l.wake:
		case <-t.C:
			windowEnd = true
		case <-l.done:
			closing = true
		}
		l.mu.Lock()
		queue := l.queue
		l.queue = nil
		l.mu.Unlock()
		for _, p := range queue {
			write(p, 0)
		}
		if closing || windowEnd {
			l.mu.Lock()
			var repeated []*pending
			for _, p := range l.window {
				if p.count > 1 {
					repeated = append(repeated, p)
				}
			}
			l.window = make(map[key]*pending)
			l.mu.Unlock()
			for _, p := range repeated {
				write(p, p.count-1)
			}
		}
		bw.Flush()
		if closing {
			return
		}
	}
}

func (l *Log) record(p *pending, repeats int) Record {
	f, d := p.f, p.d
	r := Record{
		Time:      p.at.UTC().Format(time.RFC3339Nano),
		FlowID:    f.ID,
		Direction: f.Direction.String(),
		Proto:     f.Proto.String(),
		Src:       flow.AddrText(f.Src),
		Dst:       flow.AddrText(f.Dst),
		Domain:    f.Domain,
		Rule:      d.Rule,
		RuleText:  l.o.Describe(d),
		Action:    d.Action.String(),
		Repeats:   repeats,
		L7:        p.l7,
	}
	if repeats > 0 {
		r.Until = p.last.UTC().Format(time.RFC3339Nano)
	}
	if f.DNS {
		r.Proto, r.Transport, r.Dst = "dns", f.Proto.String(), ""
	}
	if r.Domain == "" && f.Dst.IsValid() && l.o.Domain != nil {
		r.Domain = l.o.Domain(f.Dst.Addr())
	}
	return r
}

// Subscribe returns a channel that gets every record from now on, as it is
// written, and a function that ends the subscription. A subscriber that
// falls more than n records behind loses records (counted by Lost) rather
// than slow the log down.
func (l *Log) Subscribe(n int) (<-chan Record, func()) {
	ch := make(chan Record, n)
	l.subsMu.Lock()
	l.subs[ch] = struct{}{}
	l.subsMu.Unlock()
	var once sync.Once
	return ch, func() {
		once.Do(func() {
			l.subsMu.Lock()
			delete(l.subs, ch)
			l.subsMu.Unlock()
		})
	}
}

// Lost returns the records subscribers missed by falling behind.
func (l *Log) Lost() uint64 { return l.lost.Load() }

func (l *Log) publish(r Record) {
	l.subsMu.Lock()
	defer l.subsMu.Unlock()
	for ch := range l.subs {
		select {
		case ch <- r:
		default:
			l.lost.Add(1)
		}
	}
}

// Close writes what is pending and closes the file. Safe to call twice.
func (l *Log) Close() error {
	if l == nil {
		return nil
	}
	l.once.Do(func() {
		close(l.done)
		<-l.stopped
		if l.r != nil {
			l.r.Close()
		}
	})
	return nil
}
