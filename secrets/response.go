package secrets

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strings"

	"github.com/msbtap/msbtap/intercept"
)

// retiredPerSecret is how many earlier values of a secret are still
// taken out of responses after a reload, a `secrets set` or a `secrets
// rm`: a host may echo a value it was sent before.
const retiredPerSecret = 4

// retire keeps old, a value going out of force, for the response side.
// s.mu must be held.
func (s *Store) retireLocked(old *secret) {
	if old == nil {
		return
	}
	r := s.retired[old.name]
	for _, x := range r {
		if bytes.Equal(x.value, old.value) && slicesEqual(x.hosts, old.hosts) {
			return
		}
	}
	r = append(r, old)
	if len(r) > retiredPerSecret {
		r = r[len(r)-retiredPerSecret:]
	}
	s.retired[old.name] = r
}

func slicesEqual(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// scrubber turns a secret's value back into its placeholder in what a
// secret's host sends to the sandbox. It implements intercept.Scrubber.
type scrubber struct {
	pairs []pair
	// values are the raw values and their placeholders, for the base64
	// check of headers.
	values []pair
}

// Scrubber implements intercept.ResponseScrubber: the responses of a
// host some secret may go to pass with every value of those secrets (the
// one in force and up to retiredPerSecret earlier ones), as it is,
// URL-encoded or JSON-escaped, turned into the secret's placeholder; in
// headers also inside base64 (an echoed basic auth). nil when no secret
// goes to host.
func (s *Store) Scrubber(host string) intercept.Scrubber {
	s.mu.RLock()
	var secs []*secret
	for _, sec := range s.byName {
		secs = append(secs, sec)
	}
	for _, r := range s.retired {
		secs = append(secs, r...)
	}
	s.mu.RUnlock()
	sc := &scrubber{}
	seen := map[string]bool{}
	for _, sec := range secs {
		if !intercept.MatchesAny(sec.hosts, host) {
			continue
		}
		ph := []byte(sec.placeholder)
		sc.values = append(sc.values, pair{sec.value, ph})
		for _, form := range encodedForms(sec.value) {
			if !seen[string(form)] {
				seen[string(form)] = true
				sc.pairs = append(sc.pairs, pair{form, ph})
			}
		}
		for _, p := range base64Cores(sec.value, ph) {
			if !seen[string(p.old)] {
				seen[string(p.old)] = true
				sc.pairs = append(sc.pairs, p)
			}
		}
	}
	if len(sc.pairs) == 0 {
		return nil
	}
	return sc
}

// encodedForms are the ways a value shows in a body or a header: as it
// is, URL-encoded (query and path), JSON-escaped.
func encodedForms(v []byte) [][]byte {
	forms := [][]byte{v}
	add := func(f []byte) {
		for _, x := range forms {
			if bytes.Equal(x, f) {
				return
			}
		}
		forms = append(forms, f)
	}
	add([]byte(url.QueryEscape(string(v))))
	add([]byte(url.PathEscape(string(v))))
	if j, err := json.Marshal(string(v)); err == nil {
		add(j[1 : len(j)-1])
	}
	return forms
}

// minCore is the shortest base64 core looked for: shorter ones could
// match by chance.
const minCore = 12

// base64Cores are the value inside base64 text (an echoed Authorization:
// Basic header in a JSON body, say), for each of the three ways it can
// fall on base64's 3-byte groups and for both alphabets: the characters
// made of the value's bits alone, paired with those of the placeholder
// at the same place. The one character at each end that mixes in the
// neighbours' bits is left as it is: at most 4 bits of the value's first
// and last bytes.
func base64Cores(v, ph []byte) []pair {
	var out []pair
	for o := 0; o < 3; o++ {
		for _, enc := range []*base64.Encoding{base64.RawStdEncoding, base64.RawURLEncoding} {
			c, cp := base64Core(enc, v, o), base64Core(enc, ph, o)
			if len(c) >= minCore {
				out = append(out, pair{c, cp})
			}
		}
	}
	return out
}

// base64Core encodes b as if o bytes came before it, and keeps the
// characters whose 6 bits all come from b.
func base64Core(enc *base64.Encoding, b []byte, o int) []byte {
	buf := make([]byte, o, o+len(b)+2)
	buf = append(buf, b...)
	chars := []byte(enc.EncodeToString(buf))
	first := (8*o + 5) / 6
	last := (8*o+8*len(b))/6 - 1
	if last < first {
		return nil
	}
	return chars[first : last+1]
}

// SameLength implements intercept.Scrubber: whether a body keeps its
// length (every form of every value as long as its placeholder).
func (sc *scrubber) SameLength() bool {
	for _, p := range sc.pairs {
		if len(p.old) != len(p.new) {
			return false
		}
	}
	return true
}

// Body implements intercept.Scrubber: the body, streamed through the
// replacer.
func (sc *scrubber) Body(r io.Reader) io.Reader {
	return newMultiReplacer(io.NopCloser(r), sc.pairs, func(int) error { return nil })
}

// Header implements intercept.Scrubber: names and values.
func (sc *scrubber) Header(h http.Header) {
	for k, vs := range h {
		for i, v := range vs {
			vs[i] = sc.text(v)
		}
		if nk := sc.name(k); nk != k {
			delete(h, k)
			h[nk] = append(h[nk], vs...)
		}
	}
}

// name scrubs a header's name, whose case the HTTP parsers changed.
func (sc *scrubber) name(k string) string {
	for _, p := range sc.pairs {
		lo := strings.ToLower(string(p.old))
		for from := 0; ; {
			i := strings.Index(strings.ToLower(k[from:]), lo)
			if i < 0 || len(lo) != len(p.old) {
				break
			}
			k = k[:from+i] + string(p.new) + k[from+i+len(lo):]
			from += i + len(p.new)
		}
	}
	return k
}

var b64encodings = []*base64.Encoding{base64.StdEncoding, base64.URLEncoding, base64.RawStdEncoding, base64.RawURLEncoding}

// text scrubs one header line's worth of text: base64 tokens first
// (Basic credentials, the parts of a JSON Web Token), decoded, scrubbed
// and encoded again, so that no bit of the value is left; then the
// value's other forms.
func (sc *scrubber) text(s string) string {
	toks := strings.FieldsFunc(s, func(r rune) bool { return r == ' ' || r == ',' || r == ';' || r == '.' || r == '"' })
	for _, tok := range toks {
		if len(tok) < 8 {
			continue
		}
		for _, enc := range b64encodings {
			b, err := enc.DecodeString(tok)
			if err != nil {
				continue
			}
			changed := false
			for _, p := range sc.values {
				if bytes.Contains(b, p.old) {
					b = bytes.ReplaceAll(b, p.old, p.new)
					changed = true
				}
			}
			if changed {
				s = strings.ReplaceAll(s, tok, enc.EncodeToString(b))
			}
			break
		}
	}
	for _, p := range sc.pairs {
		if strings.Contains(s, string(p.old)) {
			s = strings.ReplaceAll(s, string(p.old), string(p.new))
		}
	}
	return s
}
