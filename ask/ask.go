// Package ask holds the flows an `ask` policy rule decides until someone
// answers: one question per destination (a name, or an address without
// one), however many flows wait on it, answered through the control
// socket, by an --ask-exec program, or by the timeout (a deny). An answer
// stands for a while for the destination's further flows, lookups and
// requests; "always" makes it a rule of the live policy.
package ask

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sort"
	"sync"
	"time"

	"github.com/msbtap/msbtap/policy"
)

// Defaults and bounds of Options.
const (
	DefaultTimeout = 30 * time.Second
	// DefaultGrace is how long an answer stands for its destination.
	DefaultGrace = time.Minute
	// DefaultMaxQuestions bounds the questions open at once; a flow that
	// would open one more is denied at once (and so counted).
	DefaultMaxQuestions = 64
	// DefaultMaxWaiting bounds the flows (held SYNs, held lookups) waiting
	// on the questions, all together; past it, flows are denied at once.
	DefaultMaxWaiting = 192
	// maxAnswers bounds the standing answers kept.
	maxAnswers = 4096
)

// Question is one destination a flow was held for, as `msbtap ctl pending`
// lists it and --ask-exec reads it.
type Question struct {
	ID uint64 `json:"id"`
	// Proto is tcp, udp, or dns for a held lookup.
	Proto string `json:"proto"`
	// Dst is the first held flow's destination (none for a lookup).
	Dst string `json:"dst,omitempty"`
	// Name is the destination's name (the lookup's, the SNI or Host, or
	// the name its address was resolved from), if known.
	Name string `json:"name,omitempty"`
	Src  string `json:"src"`
	// Waiting is the number of flows held on the question.
	Waiting int       `json:"waiting"`
	Since   time.Time `json:"since"`
	// Age is how long it has been open, as listed.
	Age string `json:"age,omitempty"`

	port uint16
	addr netip.Addr
}

// Answer is a decision on a question.
type Answer struct {
	Allow, Always bool
	// By says who answered: "ctl uid N", "ask-exec", "timeout".
	By string
}

// Options configure an Asker. Zero values take the defaults.
type Options struct {
	Timeout      time.Duration
	Grace        time.Duration
	MaxQuestions int
	MaxWaiting   int
	// Exec, if set, is asked each new question in a goroutine of its own
	// (the --ask-exec program); an error leaves the question open.
	Exec func(ctx context.Context, q Question) (Answer, error)
	// Always turns an "always" answer into a rule of the live policy.
	Always func(q Question, allow bool) error
	// Report is told of every answer, for the decision log.
	Report func(q Question, a Answer)
	Log    *slog.Logger
}

type key struct {
	name string
	addr netip.Addr
}

type question struct {
	q     Question
	k     key
	timer *time.Timer
	done  chan struct{}
	a     Answer // set before done closes
}

type standing struct {
	allow bool
	until time.Time
}

// Asker holds flows until their question is answered. It implements
// policy.Answers.
type Asker struct {
	o      Options
	ctx    context.Context
	cancel context.CancelFunc

	mu      sync.Mutex // mu protects the fields below
	byKey   map[key]*question
	byID    map[uint64]*question
	answers map[key]standing
	nextID  uint64
	waiting int
	refused uint64 // flows denied at once for the bounds
	closed  bool
	now     func() time.Time
}

// New returns an Asker.
func New(o Options) *Asker {
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	if o.Grace <= 0 {
		o.Grace = DefaultGrace
	}
	if o.MaxQuestions <= 0 {
		o.MaxQuestions = DefaultMaxQuestions
	}
	if o.MaxWaiting <= 0 {
		o.MaxWaiting = DefaultMaxWaiting
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	a := &Asker{o: o, byKey: map[key]*question{}, byID: map[uint64]*question{}, answers: map[key]standing{}, now: time.Now}
	a.ctx, a.cancel = context.WithCancel(context.Background())
	return a
}

// ErrNoQuestion: no open question has that id.
var ErrNoQuestion = errors.New("no open question with that id")

// Answer implements policy.Answers: the standing answer for name, or for
// addr when name is "".
func (a *Asker) Answer(name string, addr netip.Addr) (policy.Action, bool) {
	k := key{name: name}
	if name == "" {
		k = key{addr: addr.Unmap()}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	s, ok := a.answers[k]
	if !ok {
		return 0, false
	}
	if !a.now().Before(s.until) {
		delete(a.answers, k)
		return 0, false
	}
	if s.allow {
		return policy.Allow, true
	}
	return policy.Deny, true
}

// Ask holds the calling flow until its destination's question is
// answered (or ctx ends, or the Asker closes: a deny) and reports whether
// it may go. proto is "tcp" or "dns"; name is the destination's name, if
// known; dst the flow's destination (zero for a lookup).
func (a *Asker) Ask(ctx context.Context, proto, name string, src, dst netip.AddrPort) bool {
	k := key{name: name}
	if name == "" {
		k = key{addr: dst.Addr().Unmap()}
	}
	a.mu.Lock()
	if s, ok := a.answers[k]; ok && a.now().Before(s.until) {
		a.mu.Unlock()
		return s.allow
	}
	q := a.byKey[k]
	if a.closed || a.waiting >= a.o.MaxWaiting || (q == nil && len(a.byKey) >= a.o.MaxQuestions) {
		a.refused++
		a.mu.Unlock()
		return false
	}
	if q == nil {
		a.nextID++
		q = &question{k: k, done: make(chan struct{}), q: Question{ID: a.nextID, Proto: proto, Name: name,
			Src: src.String(), Since: a.now(), port: dst.Port(), addr: dst.Addr().Unmap()}}
		if dst.IsValid() {
			q.q.Dst = dst.String()
		}
		a.byKey[k], a.byID[q.q.ID] = q, q
		id := q.q.ID
		q.timer = time.AfterFunc(a.o.Timeout, func() { a.decide(id, Answer{By: "timeout"}) })
		if a.o.Exec != nil {
			go a.exec(q.q)
		}
	}
	q.q.Waiting++
	a.waiting++
	a.mu.Unlock()

	allow := false
	select {
	case <-q.done:
		allow = q.a.Allow
	case <-ctx.Done():
	case <-a.ctx.Done():
	}
	a.mu.Lock()
	a.waiting--
	if a.byID[q.q.ID] == q {
		q.q.Waiting--
	}
	a.mu.Unlock()
	return allow
}

// exec asks the --ask-exec program; an answer closes the question.
func (a *Asker) exec(q Question) {
	ctx, cancel := context.WithTimeout(a.ctx, a.o.Timeout)
	defer cancel()
	ans, err := a.o.Exec(ctx, q)
	if err != nil {
		a.o.Log.Warn("--ask-exec gave no answer; the question stays open", "id", q.ID, "name", q.Name, "dst", q.Dst, "err", err)
		return
	}
	ans.By = "ask-exec"
	if err := a.decide(q.ID, ans); err != nil && !errors.Is(err, ErrNoQuestion) {
		a.o.Log.Warn("--ask-exec answer", "id", q.ID, "err", err)
	}
}

// Decide answers question id: its flows go (or are refused), the answer
// stands for the destination for a while, and with Always it becomes a
// rule of the live policy.
func (a *Asker) Decide(id uint64, ans Answer) error { return a.decide(id, ans) }

func (a *Asker) decide(id uint64, ans Answer) error {
	a.mu.Lock()
	q := a.byID[id]
	if q == nil {
		a.mu.Unlock()
		return fmt.Errorf("%w: %d", ErrNoQuestion, id)
	}
	delete(a.byID, id)
	delete(a.byKey, q.k)
	q.timer.Stop()
	if len(a.answers) >= maxAnswers {
		now := a.now()
		for k, s := range a.answers {
			if !now.Before(s.until) || len(a.answers) >= maxAnswers {
				delete(a.answers, k)
			}
		}
	}
	a.answers[q.k] = standing{allow: ans.Allow, until: a.now().Add(a.o.Grace)}
	q.a = ans
	info := q.q
	a.mu.Unlock()

	// The rule is in force, and the answer logged, before the held flows
	// go on.
	var err error
	if ans.Always && a.o.Always != nil {
		if err = a.o.Always(info, ans.Allow); err != nil {
			a.o.Log.Error("ask: the answer could not become a rule", "id", id, "err", err)
		}
	}
	if a.o.Report != nil {
		a.o.Report(info, ans)
	}
	close(q.done)
	return err
}

// Pending lists the open questions, oldest first.
func (a *Asker) Pending() []Question {
	a.mu.Lock()
	now := a.now()
	out := make([]Question, 0, len(a.byID))
	for _, q := range a.byID {
		c := q.q
		c.Age = now.Sub(c.Since).Round(100 * time.Millisecond).String()
		out = append(out, c)
	}
	a.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Refused counts the flows denied at once because the bounds were reached.
func (a *Asker) Refused() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.refused
}

// Close denies every open question and every flow that would ask from
// now on.
func (a *Asker) Close() {
	a.cancel()
	a.mu.Lock()
	a.closed = true
	ids := make([]uint64, 0, len(a.byID))
	for id := range a.byID {
		ids = append(ids, id)
	}
	a.mu.Unlock()
	for _, id := range ids {
		a.decide(id, Answer{By: "shutdown"})
	}
}

// Rule is the rule an "always" answer to q adds: for a name, a domain rule
// (for a lookup, a dns rule: the name resolves; for a connection, its
// protocol and port); for an address, a cidr rule likewise. A deny covers
// every protocol and port of the destination.
func Rule(q Question, allow bool) policy.FileRule {
	r := policy.FileRule{Action: "deny"}
	if q.Name != "" {
		r.Destination = &policy.Target{Domain: q.Name}
	} else {
		r.Destination = &policy.Target{CIDR: q.addr.String()}
	}
	if allow {
		r.Action = "allow"
		r.Protocols = []string{q.Proto}
		if (q.Proto == "tcp" || q.Proto == "udp") && q.port != 0 {
			r.Ports = []policy.PortRange{{Start: q.port, End: q.port}}
		}
	}
	return r
}
