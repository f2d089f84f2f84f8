package dnsproxy

import (
	"container/list"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// Cache bounds: an answer is kept for its smallest TTL, at most
// maxCacheTTL; a negative answer (NXDOMAIN, or NOERROR with no data) for
// its SOA's minimum, at most maxNegativeTTL.
const (
	defaultCacheSize = 4096
	maxCacheTTL      = 5 * time.Minute
	maxNegativeTTL   = 30 * time.Second
)

// sweepEvery is how often, while it holds entries, the cache drops the
// expired ones. Without it a flood of random names left a full table of
// dead answers behind, each pinning a span of the heap the flood had
// otherwise freed (an agent's RSS a minute after a DNS flood: 1.9× idle).
var sweepEvery = 10 * time.Second

// dnsCache keeps upstream answers for their TTL, bounded in entries (the
// least recently used go first), so that repeated lookups are answered at
// once, during a flood too. Negative answers have a smaller table of their
// own: a flood of random names fills that one and never pushes out the
// names the sandbox really uses. Every answer still goes through the
// policy's filter on its way to the guest.
type dnsCache struct {
	mu       sync.Mutex // mu protects what follows
	pos, neg cacheTable
	sweep    *time.Timer // pending while the cache holds entries
	closed   bool
}

// cacheTable is one LRU table.
type cacheTable struct {
	max   int
	m     map[cacheKey]*list.Element
	order *list.List // of *cacheEntry, least recently used first
	peak  int        // most entries m held since it was made
}

// cacheKey is a question as the agent asks it upstream: the name in
// lower case and the type (its flags are the same for every query).
type cacheKey struct {
	name  string
	qtype uint16
}

type cacheEntry struct {
	key     cacheKey
	msg     *dns.Msg
	stored  time.Time
	expires time.Time
}

func newDNSCache(size int) *dnsCache {
	if size == 0 {
		size = defaultCacheSize
	}
	if size < 0 {
		return nil
	}
	return &dnsCache{
		pos: cacheTable{max: size, m: make(map[cacheKey]*list.Element), order: list.New()},
		neg: cacheTable{max: max(size/4, 1), m: make(map[cacheKey]*list.Element), order: list.New()},
	}
}

// find returns the live entry for k in either table, dropping an expired
// one.
func (c *dnsCache) findLocked(k cacheKey, now time.Time) *cacheEntry {
	for _, t := range []*cacheTable{&c.pos, &c.neg} {
		el, ok := t.m[k]
		if !ok {
			continue
		}
		e := el.Value.(*cacheEntry)
		if !now.Before(e.expires) {
			t.order.Remove(el)
			delete(t.m, k)
			return nil
		}
		t.order.MoveToBack(el)
		return e
	}
	return nil
}

func keyOf(q *dns.Msg) cacheKey {
	return cacheKey{name: strings.ToLower(q.Question[0].Name), qtype: q.Question[0].Qtype}
}

// get returns a copy of the cached answer to q with its TTLs counted down,
// or nil.
func (c *dnsCache) get(q *dns.Msg) *dns.Msg {
	if c == nil {
		return nil
	}
	now := time.Now()
	c.mu.Lock()
	e := c.findLocked(keyOf(q), now)
	c.mu.Unlock()
	if e == nil {
		return nil
	}
	m := e.msg.Copy()
	m.Id = q.Id
	age := uint32(now.Sub(e.stored) / time.Second)
	for _, sec := range [][]dns.RR{m.Answer, m.Ns, m.Extra} {
		for _, rr := range sec {
			if h := rr.Header(); h.Rrtype != dns.TypeOPT {
				h.Ttl -= min(age, h.Ttl)
			}
		}
	}
	return m
}

// has reports whether an unexpired answer to q is cached.
func (c *dnsCache) has(q *dns.Msg) bool {
	if c == nil {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.findLocked(keyOf(q), time.Now()) != nil
}

// put keeps a, the upstream's answer to q, if it may be cached.
func (c *dnsCache) put(q, a *dns.Msg) {
	if c == nil || a.Truncated {
		return
	}
	ttl, negative, ok := cacheTTL(a)
	if !ok || ttl <= 0 {
		return
	}
	now := time.Now()
	k := keyOf(q)
	e := &cacheEntry{key: k, msg: a.Copy(), stored: now, expires: now.Add(ttl)}
	c.mu.Lock()
	defer c.mu.Unlock()
	t, other := &c.pos, &c.neg
	if negative {
		t, other = &c.neg, &c.pos
	}
	if el, ok := other.m[k]; ok { // the name changed sides
		other.order.Remove(el)
		delete(other.m, k)
	}
	if el, ok := t.m[k]; ok {
		el.Value = e
		t.order.MoveToBack(el)
		return
	}
	if t.order.Len() >= t.max {
		oldest := t.order.Front()
		delete(t.m, oldest.Value.(*cacheEntry).key)
		t.order.Remove(oldest)
	}
	t.m[k] = t.order.PushBack(e)
	t.peak = max(t.peak, len(t.m))
	if c.sweep == nil && !c.closed {
		c.sweep = time.AfterFunc(sweepEvery, c.sweepExpired)
	}
}

// sweepExpired drops the expired entries of both tables and runs again
// while entries are left. A table that has shrunk to a quarter of its
// peak gets a new map: Go's maps never give back what they grew to.
func (c *dnsCache) sweepExpired() {
	now := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sweep = nil
	if c.closed {
		return
	}
	for _, t := range []*cacheTable{&c.pos, &c.neg} {
		for el := t.order.Front(); el != nil; {
			next := el.Next()
			if e := el.Value.(*cacheEntry); !now.Before(e.expires) {
				t.order.Remove(el)
				delete(t.m, e.key)
			}
			el = next
		}
		if len(t.m) <= t.peak/4 {
			m := make(map[cacheKey]*list.Element, len(t.m))
			for k, el := range t.m {
				m[k] = el
			}
			t.m, t.peak = m, len(m)
		}
	}
	if c.pos.order.Len()+c.neg.order.Len() > 0 {
		c.sweep = time.AfterFunc(sweepEvery, c.sweepExpired)
	}
}

// close stops the sweeps.
func (c *dnsCache) close() {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	if c.sweep != nil {
		c.sweep.Stop()
		c.sweep = nil
	}
}

// cacheTTL is how long a may be kept: the smallest TTL of its answer and
// authority records, bounded; negative answers by their SOA.
func cacheTTL(a *dns.Msg) (ttl time.Duration, negative, ok bool) {
	d, ok := cacheTTLOf(a)
	return d, ok && (a.Rcode != dns.RcodeSuccess || len(a.Answer) == 0), ok
}

func cacheTTLOf(a *dns.Msg) (time.Duration, bool) {
	switch {
	case a.Rcode == dns.RcodeSuccess && len(a.Answer) > 0:
		ttl := uint32(maxCacheTTL / time.Second)
		for _, sec := range [][]dns.RR{a.Answer, a.Ns} {
			for _, rr := range sec {
				ttl = min(ttl, rr.Header().Ttl)
			}
		}
		return time.Duration(ttl) * time.Second, true
	case a.Rcode == dns.RcodeNameError || a.Rcode == dns.RcodeSuccess:
		ttl := uint32(maxNegativeTTL / time.Second)
		for _, rr := range a.Ns {
			if soa, ok := rr.(*dns.SOA); ok {
				ttl = min(ttl, soa.Minttl, soa.Hdr.Ttl)
			}
		}
		return time.Duration(ttl) * time.Second, true
	}
	return 0, false // SERVFAIL, REFUSED and the like: never kept
}

func (c *dnsCache) len() int {
	if c == nil {
		return 0
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pos.order.Len() + c.neg.order.Len()
}
