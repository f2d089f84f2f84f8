package proxy

import (
	"container/list"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/internal/sockopt"
	"github.com/msbtap/msbtap/policy"
)

// ErrDenied means the policy refused a new flow.
var ErrDenied = errors.New("denied by policy")

// ErrLimit means a cap on concurrent flows was reached.
var ErrLimit = errors.New("too many concurrent flows")

// UDPOptions configure a UDP relay.
type UDPOptions struct {
	Replier Replier
	// Allow decides a new session, once, before any socket exists: the
	// flow it returns is the session's (opened in its table while the
	// session lives, its meters counting and pacing the datagrams), or, if
	// not allowed, the refusal Handle returns. Default: everything, in no
	// table.
	Allow func(src, dst netip.AddrPort) *flow.Flow
	// Hold, if set, is offered the datagram of a new flow Allow did not
	// allow: it may keep it (the flow is held for an answer, and Resume
	// opens the session later) and say so; Handle then returns no error.
	Hold func(fl *flow.Flow, payload []byte) bool
	// MapDst picks the host address to send to (default Identity).
	MapDst MapDst
	// IdleTimeout ends a session that has carried nothing for this long
	// (default 60 s); UnansweredTimeout ends sooner one that never got a
	// reply (default 5 s), so that a flood's sessions do not linger.
	IdleTimeout, UnansweredTimeout time.Duration
	// MaxSessions caps concurrent sessions (default 1024) and MaxPerSource
	// those of one guest socket (default a quarter of MaxSessions). A new
	// session past a cap replaces the oldest one that never got a reply:
	// its own socket's at the socket's cap, else that of the socket holding
	// the most sessions. So sockets spraying datagrams at many ports churn
	// their own sessions, not those of the guest's other flows.
	MaxSessions, MaxPerSource int
	// MaxPayload4 and MaxPayload6 are the largest reply payloads that fit
	// one packet of the MTU to the guest over IPv4 and IPv6; larger replies
	// are dropped and counted.
	MaxPayload4, MaxPayload6 int
	Log                      *slog.Logger
}

type udpKey struct{ src, dst netip.AddrPort }

// udpSource is what one guest socket holds in the table.
type udpSource struct {
	sessions   int
	unanswered list.List     // of *udpSession never answered, oldest first
	inCount    *list.Element // in UDP.byCount[sessions]
}

type udpSession struct {
	key      udpKey
	conn     *net.UDPConn
	raw      syscall.RawConn // for sends that never block
	lastSeen atomic.Int64    // unix nanos of the last datagram either way
	answered atomic.Bool     // a reply came back
	opened   int64           // unix nanos
	// waiting and srcWaiting are s in UDP.unanswered and in its source's
	// list until answered; under UDP.mu.
	waiting, srcWaiting *list.Element
	fl                  *flow.Flow
}

// UDP relays the guest's UDP datagrams through connected host sockets, one
// session per (guest source, destination), as microsandbox's network engine does.
type UDP struct {
	o UDPOptions

	mu         sync.Mutex // mu protects sessions, unanswered, sources and closed
	sessions   map[udpKey]*udpSession
	unanswered *list.List // of *udpSession never answered, oldest first
	sources    map[netip.AddrPort]*udpSource
	byCount    []list.List // of *udpSource, by their number of sessions
	maxCount   int         // the highest non-empty byCount
	closed     bool
	wg         sync.WaitGroup

	total, dropped, tooBig, evicted atomic.Uint64
}

// NewUDP returns a UDP relay.
func NewUDP(o UDPOptions) *UDP {
	if o.MapDst == nil {
		o.MapDst = Identity
	}
	if o.IdleTimeout <= 0 {
		o.IdleTimeout = 60 * time.Second
	}
	if o.UnansweredTimeout <= 0 || o.UnansweredTimeout > o.IdleTimeout {
		o.UnansweredTimeout = min(5*time.Second, o.IdleTimeout)
	}
	if o.MaxSessions <= 0 {
		o.MaxSessions = 1024
	}
	if o.MaxPerSource <= 0 || o.MaxPerSource > o.MaxSessions {
		o.MaxPerSource = max(1, o.MaxSessions/4)
	}
	if o.MaxPayload4 <= 0 {
		o.MaxPayload4 = 1472
	}
	if o.MaxPayload6 <= 0 {
		o.MaxPayload6 = o.MaxPayload4 - 20
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Allow == nil {
		o.Allow = func(src, dst netip.AddrPort) *flow.Flow {
			return flow.Of(policy.Flow{Proto: policy.UDP, Src: src, Dst: dst}, policy.Decision{Action: policy.Allow})
		}
	}
	return &UDP{o: o, sessions: make(map[udpKey]*udpSession), unanswered: list.New(),
		sources: make(map[netip.AddrPort]*udpSource), byCount: make([]list.List, o.MaxPerSource+1)}
}

// Handle relays one datagram from the guest. It returns ErrDenied, with
// the refused flow, when the policy refused a new session, and ErrLimit
// when a session cap is reached (the datagram is dropped and counted); a
// new session's flow comes back too.
// It never blocks: a host socket that cannot take the datagram drops it.
func (u *UDP) Handle(src, dst netip.AddrPort, payload []byte) (*flow.Flow, error) {
	k := udpKey{src, dst}
	now := time.Now().UnixNano()
	u.mu.Lock()
	s := u.sessions[k]
	spraying := s == nil && u.sprayingLocked(src, now)
	u.mu.Unlock()
	if spraying {
		u.dropped.Add(1)
		return nil, ErrLimit
	}
	if s != nil {
		return nil, u.send(s, now, payload)
	}
	fl := u.o.Allow(src, dst)
	if !fl.Allowed() {
		if u.o.Hold != nil && u.o.Hold(fl, payload) {
			return fl, nil
		}
		return fl, ErrDenied
	}
	s, err := u.openAs(k, now, fl)
	if err != nil {
		return fl, err
	}
	return fl, u.send(s, now, payload)
}

// Resume opens the session of flow fl, which was held and is now allowed
// (without asking Allow again), and relays its datagram.
func (u *UDP) Resume(fl *flow.Flow, payload []byte) error {
	k := udpKey{fl.Src, fl.Dst}
	now := time.Now().UnixNano()
	u.mu.Lock()
	s := u.sessions[k]
	u.mu.Unlock()
	if s == nil {
		var err error
		if s, err = u.openAs(k, now, fl); err != nil {
			return err
		}
	}
	return u.send(s, now, payload)
}

// send relays one datagram on session s.
func (u *UDP) send(s *udpSession, now int64, payload []byte) error {
	s.lastSeen.Store(now)
	if !s.fl.Up.Shaper.Allow(len(payload)) {
		u.dropped.Add(1) // over the sandbox's rate: a datagram cannot wait
		return nil
	}
	s.fl.Up.Bytes.Add(uint64(len(payload)))
	var serr error
	_ = s.raw.Write(func(fd uintptr) bool {
		_, serr = unix.Write(int(fd), payload)
		return true // never wait: a full socket buffer drops like a lossy link
	})
	if serr != nil && !errors.Is(serr, unix.ECONNREFUSED) {
		u.dropped.Add(1)
	}
	return nil
}

// openAs opens the session of allowed flow fl.
func (u *UDP) openAs(k udpKey, now int64, fl *flow.Flow) (*udpSession, error) {
	u.mu.Lock()
	if u.closed {
		u.mu.Unlock()
		return nil, net.ErrClosed
	}
	if s := u.sessions[k]; s != nil {
		u.mu.Unlock()
		return s, nil
	}
	src := u.sources[k.src]
	if src == nil {
		src = &udpSource{}
	}
	if victim, full := u.victimLocked(src); full {
		if victim == nil {
			u.mu.Unlock()
			u.dropped.Add(1)
			return nil, ErrLimit
		}
		u.forgetLocked(victim)
		victim.conn.Close()
		u.evicted.Add(1)
	}
	to := u.o.MapDst(k.dst)
	conn, err := sockopt.DialUDP(to)
	if err != nil {
		u.mu.Unlock()
		u.dropped.Add(1)
		return nil, err
	}
	raw, err := conn.SyscallConn()
	if err != nil {
		conn.Close()
		u.mu.Unlock()
		return nil, err
	}
	s := &udpSession{key: k, conn: conn, raw: raw, opened: now, fl: fl}
	fl.Open(func() { conn.Close() })
	s.lastSeen.Store(time.Now().UnixNano())
	s.waiting, s.srcWaiting = u.unanswered.PushBack(s), src.unanswered.PushBack(s)
	u.countLocked(src, +1)
	u.sources[k.src] = src
	u.sessions[k] = s
	u.total.Add(1)
	u.wg.Add(1)
	u.mu.Unlock()
	go u.routineReply(s)
	return s, nil
}

// sprayTurnover is how long a socket at its cap keeps its unanswered
// sessions before new ones may replace them.
const sprayTurnover = time.Second

// sprayingLocked says whether src is at its cap with no unanswered session older
// than sprayTurnover: its new datagram is dropped before the policy, a
// socket and a goroutine are spent on it, so a socket spraying ports
// opens at most MaxPerSource sessions a second and costs the agent little
// more than reading its frames.
func (u *UDP) sprayingLocked(src netip.AddrPort, now int64) bool {
	s := u.sources[src]
	if s == nil || s.sessions < u.o.MaxPerSource {
		return false
	}
	e := s.unanswered.Front()
	return e != nil && now-e.Value.(*udpSession).opened < int64(sprayTurnover)
}

// victimLocked says whether a new session from src finds a cap reached,
// and then which unanswered session gives way (nil: none can).
func (u *UDP) victimLocked(src *udpSource) (victim *udpSession, full bool) {
	if src.sessions >= u.o.MaxPerSource {
		if e := src.unanswered.Front(); e != nil {
			return e.Value.(*udpSession), true
		}
		return nil, true
	}
	if len(u.sessions) < u.o.MaxSessions {
		return nil, false
	}
	if u.unanswered.Len() == 0 {
		return nil, true
	}
	for c := u.maxCount; c > 0; c-- {
		for e := u.byCount[c].Front(); e != nil; e = e.Next() {
			if w := e.Value.(*udpSource).unanswered.Front(); w != nil {
				return w.Value.(*udpSession), true
			}
		}
	}
	return nil, true
}

// countLocked moves src to its new number of sessions.
func (u *UDP) countLocked(src *udpSource, delta int) {
	if src.inCount != nil {
		u.byCount[src.sessions].Remove(src.inCount)
		src.inCount = nil
	}
	src.sessions += delta
	if src.sessions > 0 {
		src.inCount = u.byCount[src.sessions].PushBack(src)
	}
	u.maxCount = max(u.maxCount, src.sessions)
	for u.maxCount > 0 && u.byCount[u.maxCount].Len() == 0 {
		u.maxCount--
	}
}

// forgetLocked removes s from the session table and the unanswered lists.
func (u *UDP) forgetLocked(s *udpSession) {
	if u.sessions[s.key] != s {
		return
	}
	delete(u.sessions, s.key)
	src := u.sources[s.key.src]
	u.answeredLocked(s, src)
	if u.countLocked(src, -1); src.sessions == 0 {
		delete(u.sources, s.key.src)
	}
}

// answeredLocked takes s off the unanswered lists.
func (u *UDP) answeredLocked(s *udpSession, src *udpSource) {
	if s.waiting != nil {
		u.unanswered.Remove(s.waiting)
		src.unanswered.Remove(s.srcWaiting)
		s.waiting, s.srcWaiting = nil, nil
	}
}

// routineReply carries a session's replies back to the guest until the
// session has been idle for IdleTimeout (UnansweredTimeout while no reply
// came), it is evicted, or the relay closes.
func (u *UDP) routineReply(s *udpSession) {
	defer u.wg.Done()
	defer func() {
		u.mu.Lock()
		u.forgetLocked(s)
		u.mu.Unlock()
		s.conn.Close()
		s.fl.Close()
	}()
	limit := u.o.MaxPayload4
	if s.key.src.Addr().Is6() {
		limit = u.o.MaxPayload6
	}
	buf := make([]byte, limit+1)
	for {
		timeout := u.o.IdleTimeout
		if !s.answered.Load() {
			timeout = u.o.UnansweredTimeout
		}
		last := time.Unix(0, s.lastSeen.Load())
		if idle := time.Since(last); idle >= timeout {
			return
		}
		_ = s.conn.SetReadDeadline(last.Add(timeout))
		n, err := s.conn.Read(buf)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, unix.ECONNREFUSED) {
				continue
			}
			return // closed
		}
		if n > limit {
			u.tooBig.Add(1)
			continue
		}
		s.lastSeen.Store(time.Now().UnixNano())
		if !s.answered.Load() {
			s.answered.Store(true)
			u.mu.Lock()
			if u.sessions[s.key] == s {
				u.answeredLocked(s, u.sources[s.key.src])
			}
			u.mu.Unlock()
		}
		if !s.fl.Down.Shaper.Allow(n) {
			u.dropped.Add(1)
			continue
		}
		s.fl.Down.Bytes.Add(uint64(n))
		// Replies come from the address the guest sent to, not the mapped one.
		u.o.Replier.SendUDP(s.key.dst, s.key.src, buf[:n])
	}
}

// UDPStats are a UDP relay's counters.
type UDPStats struct {
	// Active sessions now, and Total ever opened.
	Active int
	Total  uint64
	// Dropped datagrams (session cap, socket errors), replies TooBig for a
	// frame to the guest, and sessions Evicted to make room.
	Dropped, TooBig, Evicted uint64
}

// Stats returns the relay's counters.
func (u *UDP) Stats() UDPStats {
	u.mu.Lock()
	active := len(u.sessions)
	u.mu.Unlock()
	return UDPStats{Active: active, Total: u.total.Load(), Dropped: u.dropped.Load(), TooBig: u.tooBig.Load(), Evicted: u.evicted.Load()}
}

// Close ends every session and waits for their goroutines.
func (u *UDP) Close() {
	u.mu.Lock()
	u.closed = true
	u.mu.Unlock()
	u.CloseSessions()
	u.wg.Wait()
}

// CloseSessions ends every open session at once (their sockets close);
// new ones may follow if the policy allows them.
func (u *UDP) CloseSessions() {
	u.mu.Lock()
	for _, s := range u.sessions {
		s.conn.Close()
	}
	u.mu.Unlock()
}
