package stack

import (
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/proxy"
)

// FlowInfo is one open flow, as the control socket lists it. Up is what
// the sandbox sent, Down what it received.
type FlowInfo struct {
	ID        uint64    `json:"id"`
	Direction string    `json:"direction"`
	Proto     string    `json:"proto"`
	Src       string    `json:"src"`
	Dst       string    `json:"dst"`
	Domain    string    `json:"domain,omitempty"`
	Rule      int       `json:"rule"`
	BytesUp   uint64    `json:"bytes_up"`
	BytesDown uint64    `json:"bytes_down"`
	Started   time.Time `json:"started"`
	AgeSecs   float64   `json:"age_seconds"`
}

// Flow is an open flow in the table: its meters count (and pace) its
// bytes each way; reset ends it (a TCP reset both ways, or the UDP
// session's end).
type Flow struct {
	f        policy.Flow
	rule     int
	started  time.Time
	Up, Down proxy.Meter
	reset    func()
	table    *flowTable
}

// Done takes the flow out of the table.
func (fl *Flow) Done() {
	fl.table.mu.Lock()
	delete(fl.table.m, fl.f.ID)
	fl.table.mu.Unlock()
}

// flowTable holds the open flows, for listing, closing and revocation.
type flowTable struct {
	up, down *proxy.Shaper // the sandbox-wide rates the flows draw from

	mu sync.Mutex // mu protects m
	m  map[uint64]*Flow
}

func newFlowTable(up, down *proxy.Shaper) *flowTable {
	return &flowTable{up: up, down: down, m: make(map[uint64]*Flow)}
}

// add puts a flow, decided by rule, in the table.
func (t *flowTable) add(f policy.Flow, rule int, reset func()) *Flow {
	fl := &Flow{f: f, rule: rule, started: time.Now(), reset: reset, table: t}
	fl.Up.Shaper, fl.Down.Shaper = t.up, t.down
	if f.Direction == policy.Ingress { // from the host client into the sandbox
		fl.Up.Shaper, fl.Down.Shaper = t.down, t.up
	}
	t.mu.Lock()
	t.m[f.ID] = fl
	t.mu.Unlock()
	return fl
}

func (t *flowTable) list(domain func(netip.Addr) string) []FlowInfo {
	t.mu.Lock()
	fs := make([]*Flow, 0, len(t.m))
	for _, fl := range t.m {
		fs = append(fs, fl)
	}
	t.mu.Unlock()
	now := time.Now()
	out := make([]FlowInfo, 0, len(fs))
	for _, fl := range fs {
		fi := FlowInfo{ID: fl.f.ID, Direction: fl.f.Direction.String(), Proto: fl.f.Proto.String(),
			Src: fl.f.Src.String(), Dst: fl.f.Dst.String(), Domain: fl.f.Domain, Rule: fl.rule,
			BytesUp: fl.Up.Bytes.Load(), BytesDown: fl.Down.Bytes.Load(), Started: fl.started, AgeSecs: now.Sub(fl.started).Seconds()}
		if fl.f.Direction == policy.Ingress {
			fi.BytesUp, fi.BytesDown = fi.BytesDown, fi.BytesUp
		}
		if fi.Domain == "" && domain != nil {
			fi.Domain = domain(fl.f.Dst.Addr())
		}
		out = append(out, fi)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// close resets flow id; it reports whether there was one.
func (t *flowTable) close(id uint64) bool {
	t.mu.Lock()
	fl := t.m[id]
	t.mu.Unlock()
	if fl == nil {
		return false
	}
	fl.reset()
	return true
}

// revoke resets every open flow that allowed no longer says yes to, and
// returns how many it reset.
func (t *flowTable) revoke(allowed func(policy.Flow) bool) int {
	t.mu.Lock()
	var cut []*Flow
	for _, fl := range t.m {
		if !allowed(fl.f) {
			cut = append(cut, fl)
		}
	}
	t.mu.Unlock()
	for _, fl := range cut {
		fl.reset()
	}
	return len(cut)
}

// flowIDs hands out flow ids, shared by decisions and the table.
type flowIDs struct{ n atomic.Uint64 }

func (i *flowIDs) next() uint64 { return i.n.Add(1) }
