package secrets

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/msbtap/msbtap/intercept"
)

// secret is one secret in force.
type secret struct {
	name        string
	value       []byte
	placeholder string
	hosts       []string
	headers     []string // inject into these headers only (canonical); nil with allHeaders
	allHeaders  bool
	basicAuth   bool
	query       bool
	body        bool
	action      Action
	subs, viols *atomic.Uint64
}

// Store is the secrets in force. It implements intercept.Rewriter.
type Store struct {
	getenv func(string) string

	mu      sync.RWMutex // mu protects byName and the secrets' fields
	byName  map[string]*secret
	holders map[string]string // name → placeholder, kept across reloads
	counts  map[string][2]*atomic.Uint64
	retired map[string][]*secret // earlier values, still scrubbed from responses
}

// New builds the store from specs, reading values through getenv (or
// from their files).
func New(specs []Spec, getenv func(string) string) (*Store, error) {
	s := &Store{getenv: getenv, byName: map[string]*secret{}, holders: map[string]string{}, counts: map[string][2]*atomic.Uint64{}, retired: map[string][]*secret{}}
	return s, s.Reload(specs)
}

// Reload puts specs in force: new values and hosts apply to new requests;
// a secret keeps its placeholder (the sandbox's environment has it).
func (s *Store) Reload(specs []Spec) error {
	next := map[string]*secret{}
	for _, sp := range specs {
		v, err := sp.value(s.getenv)
		if err != nil {
			return err
		}
		sec, err := s.build(sp, v)
		if err != nil {
			return err
		}
		next[sp.Name] = sec
	}
	// Old values are left to the collector, not cleared: a request in
	// flight may still be using them.
	s.mu.Lock()
	for name, old := range s.byName {
		if n := next[name]; n == nil || !bytes.Equal(n.value, old.value) || !slicesEqual(n.hosts, old.hosts) {
			s.retireLocked(old)
		}
	}
	s.byName = next
	s.mu.Unlock()
	return nil
}

func (s *Store) build(sp Spec, v []byte) (*secret, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ph, ok := s.holders[sp.Name]
	if !ok {
		var others []string
		for _, p := range s.holders {
			others = append(others, p)
		}
		var err error
		if ph, err = newPlaceholder(len(v), others); err != nil {
			return nil, err
		}
		s.holders[sp.Name] = ph
	}
	c, ok := s.counts[sp.Name]
	if !ok {
		c = [2]*atomic.Uint64{new(atomic.Uint64), new(atomic.Uint64)}
		s.counts[sp.Name] = c
	}
	sec := &secret{name: sp.Name, value: v, placeholder: ph, hosts: sp.Hosts, subs: c[0], viols: c[1]}
	sec.action, _ = parseAction(sp.OnViolation)
	inject := sp.Inject
	if len(inject) == 0 {
		inject = []string{"header", "basic_auth"}
	}
	for _, in := range inject {
		k, arg, _ := strings.Cut(in, ":")
		switch k {
		case "header":
			if arg == "" {
				sec.allHeaders = true
			} else {
				sec.headers = append(sec.headers, http.CanonicalHeaderKey(arg))
			}
		case "basic_auth":
			sec.basicAuth = true
		case "query":
			sec.query = true
		case "body":
			sec.body = true
		}
	}
	return sec, nil
}

// Set changes the value of secret name (declared at start); Remove takes
// it out of force: its placeholder is then a violation everywhere.
func (s *Store) Set(name string, v []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	sec, ok := s.byName[name]
	if !ok {
		return fmt.Errorf("no secret %q: secrets are declared with --secret or --secrets", name)
	}
	if len(v) == 0 {
		return fmt.Errorf("secret %q: empty value", name)
	}
	n := *sec
	n.value = slices.Clone(v)
	s.retireLocked(sec)
	s.byName[name] = &n
	return nil
}

// Remove takes secret name out of force.
func (s *Store) Remove(name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	sec, ok := s.byName[name]
	if !ok {
		return fmt.Errorf("no secret %q", name)
	}
	s.retireLocked(sec)
	delete(s.byName, name)
	return nil
}

// Env is NAME=placeholder for each secret, for the sandbox.
func (s *Store) Env() []string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var env []string
	for _, sec := range s.byName {
		env = append(env, sec.name+"="+sec.placeholder)
	}
	sort.Strings(env)
	return env
}

// Hosts are every host some secret may go to.
func (s *Store) Hosts() []string {
	var out []string
	for _, sec := range s.snapshot() {
		out = append(out, sec.hosts...)
	}
	return out
}

// Counts returns, by secret name, the substitutions and violations so far.
func (s *Store) Counts() map[string][2]uint64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := map[string][2]uint64{}
	for n, c := range s.counts {
		out[n] = [2]uint64{c[0].Load(), c[1].Load()}
	}
	return out
}

func (s *Store) snapshot() []*secret {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]*secret, 0, len(s.byName))
	for _, sec := range s.byName {
		out = append(out, sec)
	}
	return out
}

// Active reports whether any secret is in force.
func (s *Store) Active() bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.byName) > 0
}

// Wants reports whether connections to host must be intercepted: some
// secret may go there.
func (s *Store) Wants(host string) bool {
	for _, sec := range s.snapshot() {
		if intercept.MatchesAny(sec.hosts, host) {
			return true
		}
	}
	return false
}

// found is a placeholder found where it may not go.
type found struct {
	sec   *secret
	where string
}

// verdict turns what was found into the request's fate: a refusal (nil
// for allow). log and terminate are reported by the refusal's own audit
// line; block refuses without one.
func (f found) verdict(host string) *intercept.Refusal {
	f.sec.viols.Add(1)
	reason := fmt.Sprintf("secret %s may not go to %s (%s)", f.sec.name, host, f.where)
	switch f.sec.action {
	case Allow:
		return nil
	case Block:
		return &intercept.Refusal{Reason: reason, Secret: f.sec.name, Quiet: true}
	}
	return &intercept.Refusal{Reason: reason, Secret: f.sec.name, Terminate: f.sec.action == Terminate}
}

// Request implements intercept.Rewriter: on a request to a host the
// secret may go to, over intercepted TLS, the placeholder becomes the
// value where the secret injects; sent anywhere else, where the secret
// would inject, it is a violation.
func (s *Store) Request(req *intercept.Request) *intercept.Refusal {
	r := req.HTTP
	for _, sec := range s.snapshot() {
		allowed := req.TLS && intercept.MatchesAny(sec.hosts, req.Host)
		var bad *found
		note := func(where string) {
			if bad == nil {
				bad = &found{sec, where}
			}
		}
		injected := false
		for k, vs := range r.Header {
			if k == "Authorization" && sec.basicAuth && !sec.allHeaders && !slices.Contains(sec.headers, k) {
				continue // basic auth below
			}
			if !sec.allHeaders && !slices.Contains(sec.headers, k) {
				continue
			}
			for i, v := range vs {
				if !sec.appearsIn(v) {
					continue
				}
				if !allowed {
					note("header " + k)
					continue
				}
				vs[i] = strings.ReplaceAll(v, sec.placeholder, string(sec.value))
				injected = true
			}
		}
		if sec.basicAuth {
			if u, p, ok := r.BasicAuth(); ok && (strings.Contains(u, sec.placeholder) || strings.Contains(p, sec.placeholder)) {
				if !allowed {
					note("basic auth")
				} else {
					r.SetBasicAuth(strings.ReplaceAll(u, sec.placeholder, string(sec.value)), strings.ReplaceAll(p, sec.placeholder, string(sec.value)))
					injected = true
				}
			}
		}
		if sec.query && r.URL.RawQuery != "" && sec.appearsIn(r.URL.RawQuery) {
			if !allowed {
				note("query")
			} else {
				r.URL.RawQuery = strings.ReplaceAll(r.URL.RawQuery, sec.placeholder, url.QueryEscape(string(sec.value)))
				injected = true
			}
		}
		if sec.body && r.Body != nil && r.Body != http.NoBody && r.Header.Get("Content-Encoding") == "" {
			if allowed {
				r.Body = newReplacer(r.Body, []byte(sec.placeholder), sec.value, func() error {
					sec.subs.Add(1)
					req.Report(sec.name, "injected into the body of a request to "+req.Host)
					return nil
				})
				if len(sec.value) != len(sec.placeholder) {
					r.ContentLength = -1
					r.Header.Del("Content-Length")
				}
			} else {
				r.Body = newDetector(r.Body, sec, req.Host)
			}
		}
		if bad != nil {
			if ref := bad.verdict(req.Host); ref != nil {
				return ref
			}
		}
		if injected {
			sec.subs.Add(1)
			req.Report(sec.name, "injected into a request to "+req.Host)
		}
	}
	return nil
}

// appearsIn reports whether the placeholder is in s: as it is,
// URL-encoded (the same, for its alphabet), or inside a base64 token.
func (sec *secret) appearsIn(s string) bool {
	if strings.Contains(s, sec.placeholder) {
		return true
	}
	for _, tok := range strings.FieldsFunc(s, func(r rune) bool { return r == ' ' || r == ',' || r == ';' }) {
		tok = strings.TrimRight(tok, "=")
		for _, enc := range []*base64.Encoding{base64.RawStdEncoding, base64.RawURLEncoding} {
			if b, err := enc.DecodeString(tok); err == nil && bytes.Contains(b, []byte(sec.placeholder)) {
				return true
			}
		}
	}
	if u, err := url.QueryUnescape(s); err == nil && u != s && strings.Contains(u, sec.placeholder) {
		return true
	}
	return false
}

// ScanName reports a placeholder inside a name (a DNS query, a TLS server
// name), case and dots ignored.
func (s *Store) ScanName(name string) *intercept.Refusal {
	n := strings.ToLower(strings.ReplaceAll(name, ".", ""))
	for _, x := range s.snapshot() {
		if strings.Contains(n, strings.ToLower(x.placeholder)) {
			return found{x, "a DNS name"}.verdict(name)
		}
	}
	return nil
}

// ScanFlow implements intercept.FlowScanner for a flow that is not
// proxied request by request: its server name and first bytes must hold
// no placeholder.
func (s *Store) ScanFlow(name string, first []byte) *intercept.Refusal {
	n := strings.ToLower(strings.ReplaceAll(name, ".", ""))
	for _, x := range s.snapshot() {
		if bytes.Contains(first, []byte(x.placeholder)) || strings.Contains(n, strings.ToLower(x.placeholder)) {
			return found{x, "a connection msbtap does not proxy"}.verdict(name)
		}
	}
	return nil
}

// replacer swaps every old for new in a stream, for one or more pairs
// of old and new, also across reads: it holds back only a tail that
// could start an old, so a stream that pauses (server-sent events, a
// chunk at a time) is passed on at once. onMatch (told which pair) may
// fail the stream instead (a placeholder where it may not go).
type replacer struct {
	r     io.ReadCloser
	pairs []pair
	// in holds what was read and not yet handed out; out is what Read
	// hands out next: in's own bytes (aliased: in[:aliased], the common
	// case of nothing replaced) or outBuf's.
	in, out []byte
	aliased int
	outBuf  []byte // out's backing array when something was replaced
	eof     bool
	onMatch func(i int) error
}

// pair is one string a replacer looks for and what it puts instead.
type pair struct{ old, new []byte }

// replacerRead is how much a replacer reads at a time: its buffers are
// about three times this, per stream.
const replacerRead = 16 << 10

func newReplacer(r io.ReadCloser, old, new []byte, onMatch func() error) *replacer {
	return newMultiReplacer(r, []pair{{old, new}}, func(int) error { return onMatch() })
}

func newMultiReplacer(r io.ReadCloser, pairs []pair, onMatch func(int) error) *replacer {
	return &replacer{r: r, pairs: pairs, onMatch: onMatch}
}

// next finds the first old in b: its pair and index, or -1.
func (p *replacer) next(b []byte) (int, int) {
	at, which := -1, -1
	for i, pr := range p.pairs {
		j := bytes.Index(b, pr.old)
		if j >= 0 && (at < 0 || j < at || (j == at && len(pr.old) > len(p.pairs[which].old))) {
			at, which = j, i
		}
	}
	return which, at
}

// heldTail is the length of the longest end of b that is the start of
// some old (shorter than it): those bytes wait for the next read.
func (p *replacer) heldTail(b []byte) int {
	keep := 0
	for _, pr := range p.pairs {
		for k := min(len(b), len(pr.old)-1); k > keep; k-- {
			if b[len(b)-k] == pr.old[0] && bytes.HasPrefix(pr.old, b[len(b)-k:]) {
				keep = k
				break
			}
		}
	}
	return keep
}

func (p *replacer) Read(b []byte) (int, error) {
	for len(p.out) == 0 {
		if p.aliased > 0 { // out was in[:aliased]: only the tail stays
			p.in = p.in[:copy(p.in, p.in[p.aliased:])]
			p.aliased = 0
		}
		if p.eof && len(p.in) == 0 {
			p.in, p.outBuf = nil, nil
			return 0, io.EOF
		}
		if !p.eof {
			if cap(p.in)-len(p.in) < replacerRead/2 {
				grown := make([]byte, len(p.in), len(p.in)+replacerRead)
				copy(grown, p.in)
				p.in = grown
			}
			n, err := p.r.Read(p.in[len(p.in):cap(p.in)])
			p.in = p.in[:len(p.in)+n]
			if errors.Is(err, io.EOF) {
				p.eof = true
			} else if err != nil {
				return 0, err
			}
		}
		in := p.in
		i, at := p.next(in)
		if i < 0 {
			// Nothing to replace: hand out in itself, but a tail that
			// could start an old.
			cut := len(in)
			if !p.eof {
				cut -= p.heldTail(in)
			}
			p.out, p.aliased = in[:cut], cut
			continue
		}
		p.out = p.outBuf[:0]
		for ; i >= 0; i, at = p.next(in) {
			// An old that starts earlier, or here and is longer, may
			// still come whole with the next read: wait for it.
			if !p.eof && len(in)-p.heldTail(in) <= at {
				break
			}
			if err := p.onMatch(i); err != nil {
				return 0, err
			}
			p.out = append(p.out, in[:at]...)
			p.out = append(p.out, p.pairs[i].new...)
			in = in[at+len(p.pairs[i].old):]
		}
		cut := len(in)
		if !p.eof {
			cut -= p.heldTail(in)
		}
		p.out = append(p.out, in[:cut]...)
		p.outBuf = p.out
		p.in = p.in[:copy(p.in, in[cut:])]
	}
	n := copy(b, p.out)
	p.out = p.out[n:]
	return n, nil
}

func (p *replacer) Close() error { return p.r.Close() }

// Violation is the error a request body ends with when it carried a
// placeholder where it may not go: the request is aborted before the
// placeholder leaves.
type Violation struct{ ref *intercept.Refusal }

func (v *Violation) Error() string { return v.ref.Reason }

// Refusal makes a Violation an intercept refusal.
func (v *Violation) Refusal() *intercept.Refusal { return v.ref }

// newDetector passes a body on unchanged and fails it at a placeholder
// (unless the secret's action is allow).
func newDetector(r io.ReadCloser, sec *secret, host string) io.ReadCloser {
	ph := []byte(sec.placeholder)
	return newReplacer(r, ph, ph, func() error {
		if ref := (found{sec, "body"}).verdict(host); ref != nil {
			return &Violation{ref}
		}
		return nil
	})
}
