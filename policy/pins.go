package policy

import (
	"container/list"
	"net/netip"
	"strings"
	"sync"
	"time"
)

// Pin bounds.
const (
	MinPinTTL   = 30 * time.Second
	MaxPinTTL   = 24 * time.Hour
	DefaultPins = 65536
	maxPinNames = 8
)

// Pins records which names this sandbox's DNS answers mapped each address
// to, for as long as the answers' TTL (at least MinPinTTL), bounded in size.
// Domain rules match an address only through its pins: an address the
// sandbox never looked up matches no domain rule. When full, the entry
// stored longest ago goes, in constant time.
type Pins struct {
	mu    sync.RWMutex // mu protects m and order
	m     map[netip.Addr]*list.Element
	order *list.List // of *pinEntry, least recently stored first
	max   int
	now   func() time.Time
}

type pinEntry struct {
	addr    netip.Addr
	names   []string // never mutated after store: readers may keep it
	expires time.Time
}

// NewPins returns an empty table holding at most max addresses (0 means
// DefaultPins).
func NewPins(max int) *Pins {
	if max <= 0 {
		max = DefaultPins
	}
	return &Pins{m: make(map[netip.Addr]*list.Element), order: list.New(), max: max, now: time.Now}
}

// Add records that name resolved to a for ttl.
func (p *Pins) Add(a netip.Addr, name string, ttl time.Duration) {
	if p == nil {
		return
	}
	a = a.Unmap()
	name = strings.ToLower(strings.TrimSuffix(name, "."))
	ttl = min(max(ttl, MinPinTTL), MaxPinTTL)
	now := p.now()
	exp := now.Add(ttl)
	p.mu.Lock()
	defer p.mu.Unlock()
	if el, ok := p.m[a]; ok {
		old := el.Value.(*pinEntry)
		if old.expires.After(now) {
			names := old.names
			if !contains(names, name) {
				names = make([]string, 0, len(old.names)+1)
				names = append(names, name)
				names = append(names, old.names...)
				names = names[:min(len(names), maxPinNames)]
			}
			el.Value = &pinEntry{addr: a, names: names, expires: maxTime(exp, old.expires)}
		} else {
			el.Value = &pinEntry{addr: a, names: []string{name}, expires: exp}
		}
		p.order.MoveToBack(el)
		return
	}
	if len(p.m) >= p.max {
		oldest := p.order.Front()
		delete(p.m, oldest.Value.(*pinEntry).addr)
		p.order.Remove(oldest)
	}
	p.m[a] = p.order.PushBack(&pinEntry{addr: a, names: []string{name}, expires: exp})
}

func contains(names []string, n string) bool {
	for _, x := range names {
		if x == n {
			return true
		}
	}
	return false
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// Lookup returns the names a resolved from, or nil. The slice must not be
// modified.
func (p *Pins) Lookup(a netip.Addr) []string {
	if p == nil {
		return nil
	}
	p.mu.RLock()
	var e *pinEntry
	if el, ok := p.m[a.Unmap()]; ok {
		e = el.Value.(*pinEntry)
	}
	p.mu.RUnlock()
	if e == nil || !e.expires.After(p.now()) {
		return nil
	}
	return e.names
}

// Len returns the number of pinned addresses.
func (p *Pins) Len() int {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return len(p.m)
}
