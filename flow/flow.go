// Package flow is one flow of the sandbox from its first packet to its last
// byte: what the policy decided on and what it decided, the meters that
// count (and pace) its bytes each way, and the reset that ends it; and the
// table of open flows that lists, closes and revokes them.
//
// The gateway makes a *Flow when a flow's first packet is decided and hands
// that one value to every part that serves, inspects, logs, meters or
// revokes it: the relays, the fast path, the interception handler, the
// decision log, the termination.
package flow

import (
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/msbtap/msbtap/policy"
)

// Flow is one flow. Its policy.Flow (id, direction, protocol, guest and
// destination, domain) and Decision are set before it is handed out and
// not changed after, but for the Decision that a refusal at dial time or
// an ask's answer puts in place before the flow opens.
type Flow struct {
	policy.Flow
	Decision policy.Decision
	// Started is when its first packet was decided.
	Started time.Time
	// Up counts (and paces) what the sandbox sends on it, Down what it
	// receives; for an ingress flow (a host client of a published port)
	// Up is what the client sends into the sandbox.
	Up, Down Meter

	table *Table
	// revokes is how many revocations its table had made when the flow
	// was decided (see Table.put).
	revokes uint64
	mu      sync.Mutex // mu protects reset and listed
	// reset ends the open flow: a reset both ways for TCP, the session's
	// end for UDP.
	reset  func()
	listed bool
}

// Allowed reports whether the flow's decision lets it through.
func (fl *Flow) Allowed() bool { return fl.Decision.Action == policy.Allow }

// Open puts the flow in its table, where it is listed, closed and revoked
// until Close; reset is how it is ended.
func (fl *Flow) Open(reset func()) {
	fl.mu.Lock()
	fl.reset, fl.listed = reset, true
	fl.mu.Unlock()
	if fl.table != nil && !fl.table.put(fl) {
		// The network was cut while the flow was on its way (its dial
		// under way, its ask answered): it ends as it opens.
		reset()
	}
}

// Close takes the flow out of its table: it is over.
func (fl *Flow) Close() {
	fl.mu.Lock()
	listed := fl.listed
	fl.listed = false
	fl.mu.Unlock()
	if listed && fl.table != nil {
		fl.table.remove(fl)
	}
}

// Reset ends an open flow (flows close, revocation, termination); it
// reports whether it was open.
func (fl *Flow) Reset() bool {
	fl.mu.Lock()
	r, listed := fl.reset, fl.listed
	fl.mu.Unlock()
	if !listed || r == nil {
		return false
	}
	r()
	return true
}

// Info is one open flow as the control socket lists it. Up is what the
// sandbox sent, Down what it received.
type Info struct {
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

// AddrText is a's text, or nothing for no address (a DNS query's
// destination, an echo's port).
func AddrText(a netip.AddrPort) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

// Info describes the flow now.
func (fl *Flow) Info(now time.Time) Info {
	fi := Info{ID: fl.ID, Direction: fl.Direction.String(), Proto: fl.Proto.String(),
		Src: fl.Src.String(), Dst: fl.Dst.String(), Domain: fl.Domain, Rule: fl.Decision.Rule,
		BytesUp: fl.Up.Bytes.Load(), BytesDown: fl.Down.Bytes.Load(), Started: fl.Started, AgeSecs: now.Sub(fl.Started).Seconds()}
	if fl.Direction == policy.Ingress {
		fi.BytesUp, fi.BytesDown = fi.BytesDown, fi.BytesUp
	}
	return fi
}

// L7 is what a look inside a flow found: how it was served and, for one
// request, what it asked for.
type L7 struct {
	// Mode is spliced, intercepted, proxied (plain HTTP, request by
	// request) or refused for a flow; request for one request.
	Mode   string `json:"mode,omitempty"`
	SNI    string `json:"sni,omitempty"`
	ALPN   string `json:"alpn,omitempty"`
	Method string `json:"method,omitempty"`
	Host   string `json:"host,omitempty"`
	Path   string `json:"path,omitempty"`
	// Secret names the secret a request carried (or tried to carry
	// elsewhere); Reason says why a request was refused.
	Secret string `json:"secret,omitempty"`
	Reason string `json:"reason,omitempty"`
}

// Name is the name the flow asked for inside (the TLS server name, else
// the HTTP host).
func (l L7) Name() string {
	if l.SNI != "" {
		return l.SNI
	}
	return l.Host
}

// Table holds a sandbox's open flows and hands out flow ids.
type Table struct {
	up, down *Shaper // the sandbox-wide rates the flows draw from
	ids      atomic.Uint64

	mu  sync.Mutex // mu protects m, cut, revokes and allowed
	m   map[uint64]*Flow
	cut bool
	// revokes counts the revocations (changed under mu, read without it
	// by New), allowed is the last one's test.
	revokes atomic.Uint64
	allowed func(*Flow) bool

	// free holds refused flows given back by Release: a flood of denied
	// SYNs costs no allocation each.
	free sync.Pool
}

// NewTable returns a table whose flows draw from up (what the sandbox
// sends) and down (what it receives); either may be nil.
func NewTable(up, down *Shaper) *Table {
	return &Table{up: up, down: down, m: make(map[uint64]*Flow)}
}

// New makes the flow f (its id given here) with its decision d; it is not
// in the table until Open.
func (t *Table) New(f policy.Flow, d policy.Decision) *Flow {
	f.ID = t.NextID()
	fl, _ := t.free.Get().(*Flow)
	if fl == nil {
		fl = new(Flow)
	}
	fl.Flow, fl.Decision, fl.Started, fl.table, fl.revokes = f, d, time.Now(), t, t.revokes.Load()
	fl.Up.Shaper, fl.Down.Shaper = t.up, t.down
	if f.Direction == policy.Ingress { // from the host client into the sandbox
		fl.Up.Shaper, fl.Down.Shaper = t.down, t.up
	}
	return fl
}

// Release gives back a flow that was refused and never opened, once
// nothing refers to it (the packet path, after reporting a denial: the
// decision's listeners copy what they keep). An opened flow is left alone.
func (t *Table) Release(fl *Flow) {
	fl.mu.Lock()
	opened := fl.listed || fl.reset != nil
	fl.mu.Unlock()
	if opened || fl.table != t {
		return
	}
	fl.Up.Bytes.Store(0)
	fl.Down.Bytes.Store(0)
	fl.Flow, fl.Decision = policy.Flow{}, policy.Decision{}
	t.free.Put(fl)
}

// Of makes a flow that is in no table, f as given (its id too): a decision
// made elsewhere (the DNS guard's) to report, or a flow in a test.
func Of(f policy.Flow, d policy.Decision) *Flow {
	return &Flow{Flow: f, Decision: d, Started: time.Now()}
}

// NextID hands out a flow id.
func (t *Table) NextID() uint64 { return t.ids.Add(1) }

// put lists fl; once the table is cut it refuses. A flow decided before a
// revocation that was not open for it (its dial or ask under way) is
// tested as the revocation tested the open ones, and refused if it fails.
func (t *Table) put(fl *Flow) bool {
	for {
		t.mu.Lock()
		if t.cut {
			t.mu.Unlock()
			return false
		}
		if fl.revokes == t.revokes.Load() {
			t.m[fl.ID] = fl
			t.mu.Unlock()
			return true
		}
		n, allowed := t.revokes.Load(), t.allowed
		t.mu.Unlock()
		if !allowed(fl) {
			return false
		}
		fl.revokes = n
	}
}

func (t *Table) remove(fl *Flow) {
	t.mu.Lock()
	if t.m[fl.ID] == fl {
		delete(t.m, fl.ID)
	}
	t.mu.Unlock()
}

// Len returns how many flows are open.
func (t *Table) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.m)
}

// open returns the open flows, in no order.
func (t *Table) open() []*Flow {
	t.mu.Lock()
	fs := make([]*Flow, 0, len(t.m))
	for _, fl := range t.m {
		fs = append(fs, fl)
	}
	t.mu.Unlock()
	return fs
}

// List describes the open flows by id; domain names a destination whose
// flow has no domain of its own (from the DNS pins).
func (t *Table) List(domain func(netip.Addr) string) []Info {
	now := time.Now()
	fs := t.open()
	out := make([]Info, 0, len(fs))
	for _, fl := range fs {
		fi := fl.Info(now)
		if fi.Domain == "" && domain != nil {
			fi.Domain = domain(fl.Dst.Addr())
		}
		out = append(out, fi)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Close resets open flow id; it reports whether there was one.
func (t *Table) Close(id uint64) bool {
	t.mu.Lock()
	fl := t.m[id]
	t.mu.Unlock()
	return fl != nil && fl.Reset()
}

// Cut resets every open flow, and every flow opened from now on as it
// opens (a termination): a flow decided before the cut whose dial or ask
// ends after it must not get through either. It returns how many it reset.
func (t *Table) Cut() int {
	t.mu.Lock()
	t.cut = true
	t.mu.Unlock()
	return t.Revoke(func(*Flow) bool { return false })
}

// Revoke resets every open flow allowed no longer says yes to, and returns
// how many it reset. A flow decided before it that opens after it (its
// dial or ask was under way) is tested as it opens (see put).
func (t *Table) Revoke(allowed func(*Flow) bool) int {
	t.mu.Lock()
	t.revokes.Add(1)
	t.allowed = allowed
	t.mu.Unlock()
	n := 0
	for _, fl := range t.open() {
		if !allowed(fl) && fl.Reset() {
			n++
		}
	}
	return n
}
