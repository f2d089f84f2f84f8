package policy

import (
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
// sandbox never looked up matches no domain rule.
type Pins struct {
	mu  sync.RWMutex // mu protects m
	m   map[netip.Addr]pinEntry
	max int
	now func() time.Time
}

type pinEntry struct {
	names   []string // never mutated after store: readers may keep it
	expires time.Time
}

// NewPins returns an empty table holding at most max addresses (0 means
// DefaultPins).
func NewPins(max int) *Pins {
	if max <= 0 {
		max = DefaultPins
	}
	return &Pins{m: make(map[netip.Addr]pinEntry), max: max, now: time.Now}
}

// Add records that name resolved to a for ttl.
func (p *Pins) Add(a netip.Addr, name string, ttl time.Duration) {
	if p == nil {
		return
	}
	a = a.Unmap()
	name = strings.ToLower(strings.TrimSuffix(name, "."))
	if ttl < MinPinTTL {
		ttl = MinPinTTL
	}
	if ttl > MaxPinTTL {
		ttl = MaxPinTTL
	}
	now := p.now()
	exp := now.Add(ttl)
	p.mu.Lock()
	defer p.mu.Unlock()
	old, ok := p.m[a]
	if ok && old.expires.After(now) {
		for _, n := range old.names {
			if n == name {
				if exp.After(old.expires) {
					p.m[a] = pinEntry{names: old.names, expires: exp}
				}
				return
			}
		}
		names := make([]string, 0, len(old.names)+1)
		names = append(names, name)
		names = append(names, old.names...)
		if len(names) > maxPinNames {
			names = names[:maxPinNames]
		}
		if old.expires.After(exp) {
			exp = old.expires
		}
		p.m[a] = pinEntry{names: names, expires: exp}
		return
	}
	if !ok && len(p.m) >= p.max {
		p.evictLocked(now)
	}
	p.m[a] = pinEntry{names: []string{name}, expires: exp}
}

// evictLocked makes room: expired entries first, then arbitrary ones.
func (p *Pins) evictLocked(now time.Time) {
	for a, e := range p.m {
		if !e.expires.After(now) {
			delete(p.m, a)
		}
	}
	for a := range p.m {
		if len(p.m) < p.max {
			return
		}
		delete(p.m, a)
	}
}

// Lookup returns the names a resolved from, or nil. The slice must not be
// modified.
func (p *Pins) Lookup(a netip.Addr) []string {
	if p == nil {
		return nil
	}
	p.mu.RLock()
	e, ok := p.m[a.Unmap()]
	p.mu.RUnlock()
	if !ok || !e.expires.After(p.now()) {
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
