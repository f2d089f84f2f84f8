package secrets

import (
	"encoding/base64"
	"io"
	mrand "math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"testing/iotest"

	"go.uber.org/goleak"

	"github.com/msbtap/msbtap/intercept"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func store(t *testing.T, specs ...Spec) *Store {
	t.Helper()
	vals := map[string]string{"TOKEN": "s3cr3t-value-0123456789", "SHORT": "abc", "OTHER": "other-secret-value-xyz", "SLASHY": "ab/cd+ef=gh&0123456789"}
	s, err := New(specs, env(vals))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func placeholder(s *Store, name string) string {
	for _, kv := range s.Env() {
		if n, v, _ := strings.Cut(kv, "="); n == name {
			return v
		}
	}
	return ""
}

func TestPlaceholders(t *testing.T) {
	s := store(t, Spec{Name: "TOKEN", FromEnv: "TOKEN", Hosts: []string{"api.test"}},
		Spec{Name: "SHORT", FromEnv: "SHORT", Hosts: []string{"api.test"}})
	tok, short := placeholder(s, "TOKEN"), placeholder(s, "SHORT")
	if len(tok) != len("s3cr3t-value-0123456789") {
		t.Errorf("placeholder of %d characters for a value of %d", len(tok), len("s3cr3t-value-0123456789"))
	}
	if len(short) != minPlaceholder {
		t.Errorf("short value's placeholder: %d characters, want %d", len(short), minPlaceholder)
	}
	if strings.Contains(tok, short) || strings.Contains(short, tok) {
		t.Error("one placeholder is inside the other")
	}
	// Another run, other placeholders.
	if s2 := store(t, Spec{Name: "TOKEN", FromEnv: "TOKEN", Hosts: []string{"api.test"}}); placeholder(s2, "TOKEN") == tok {
		t.Error("two stores made the same placeholder")
	}
	// A reload keeps the placeholder.
	if err := s.Reload([]Spec{{Name: "TOKEN", FromEnv: "OTHER", Hosts: []string{"api.test"}}}); err != nil {
		t.Fatal(err)
	}
	if placeholder(s, "TOKEN") != tok {
		t.Error("a reload changed the placeholder")
	}
}

// request runs one request through the store as intercept would.
func request(s *Store, host string, tls bool, r *http.Request) (*intercept.Refusal, []string) {
	var reports []string
	ref := s.Request(&intercept.Request{Host: host, TLS: tls, HTTP: r, Report: func(sec, what string) { reports = append(reports, sec+": "+what) }})
	return ref, reports
}

func TestInjection(t *testing.T) {
	s := store(t, Spec{Name: "TOKEN", FromEnv: "TOKEN", Hosts: []string{"api.test", "*.api2.test"}, Inject: []string{"header", "basic_auth", "query", "body"}})
	ph, val := placeholder(s, "TOKEN"), "s3cr3t-value-0123456789"
	body := strings.Repeat("x", 100) + ph + strings.Repeat("y", 100)
	r := httptest.NewRequest("POST", "https://api.test/v1?key="+ph+"&a=b", iotest.HalfReader(strings.NewReader(body)))
	r.Header.Set("Authorization", "Bearer "+ph)
	r.Header.Set("X-Other", "no secret here")
	r.SetBasicAuth("user", ph)
	r.Header.Set("Authorization", "Bearer "+ph) // header wins over basic for this test's header check
	if ref, _ := request(s, "api.test", true, r); ref != nil {
		t.Fatalf("refused: %+v", ref)
	}
	if got := r.Header.Get("Authorization"); got != "Bearer "+val {
		t.Errorf("header: %q", got)
	}
	if !strings.Contains(r.URL.RawQuery, "key="+val) {
		t.Errorf("query: %q", r.URL.RawQuery)
	}
	b, _ := io.ReadAll(r.Body)
	if string(b) != strings.Repeat("x", 100)+val+strings.Repeat("y", 100) {
		t.Errorf("body: %q", b)
	}
	// Basic auth, decoded and re-encoded.
	r2 := httptest.NewRequest("GET", "https://x.api2.test/", nil)
	r2.SetBasicAuth("user", ph)
	request(s, "x.api2.test", true, r2)
	if u, p, _ := r2.BasicAuth(); u != "user" || p != val {
		t.Errorf("basic auth: %q %q", u, p)
	}
	if n := s.Counts()["TOKEN"][0]; n < 2 {
		t.Errorf("substitutions counted: %d", n)
	}
}

// A placeholder split across reads of the body is still found.
func TestBodySplitAcrossReads(t *testing.T) {
	s := store(t, Spec{Name: "TOKEN", FromEnv: "TOKEN", Hosts: []string{"api.test"}, Inject: []string{"body"}})
	ph := placeholder(s, "TOKEN")
	for cut := 1; cut < len(ph); cut += 5 {
		r := httptest.NewRequest("POST", "https://api.test/", io.MultiReader(iotest.OneByteReader(strings.NewReader("a"+ph[:cut])), strings.NewReader(ph[cut:]+"b")))
		request(s, "api.test", true, r)
		b, _ := io.ReadAll(r.Body)
		if string(b) != "as3cr3t-value-0123456789b" {
			t.Fatalf("cut at %d: %q", cut, b)
		}
	}
}

func TestViolations(t *testing.T) {
	for _, tc := range []struct {
		action string
		block  bool
		term   bool
	}{{"", true, false}, {"block", true, false}, {"terminate", true, true}, {"allow", false, false}} {
		s := store(t, Spec{Name: "TOKEN", FromEnv: "TOKEN", Hosts: []string{"api.test"}, OnViolation: tc.action})
		ph := placeholder(s, "TOKEN")
		for _, where := range []struct {
			host string
			tls  bool
			set  func(r *http.Request)
		}{
			{"evil.test", true, func(r *http.Request) { r.Header.Set("X-Key", ph) }},
			{"api.test", false, func(r *http.Request) { r.Header.Set("X-Key", ph) }}, // plain HTTP
			{"evil.test", true, func(r *http.Request) { r.SetBasicAuth("u", ph) }},
			{"evil.test", true, func(r *http.Request) {
				r.Header.Set("X-B64", base64.StdEncoding.EncodeToString([]byte("prefix "+ph)))
			}},
		} {
			r := httptest.NewRequest("GET", "http://"+where.host+"/", nil)
			where.set(r)
			ref, _ := request(s, where.host, where.tls, r)
			if (ref != nil) != tc.block || (ref != nil && (ref.Terminate != tc.term || ref.Secret != "TOKEN" || strings.Contains(ref.Reason, "s3cr3t"))) {
				t.Errorf("on_violation %q, %s tls=%v: %+v", tc.action, where.host, where.tls, ref)
			}
		}
	}
	// Not injected into bodies: a body that mentions it is no violation.
	s := store(t, Spec{Name: "TOKEN", FromEnv: "TOKEN", Hosts: []string{"api.test"}})
	r := httptest.NewRequest("POST", "https://evil.test/", strings.NewReader("transcript: "+placeholder(s, "TOKEN")))
	if ref, _ := request(s, "evil.test", true, r); ref != nil {
		t.Errorf("a body mention without body injection: %+v", ref)
	}
	// With body injection, a body to another host fails mid-stream, before
	// the placeholder is read out.
	s = store(t, Spec{Name: "TOKEN", FromEnv: "TOKEN", Hosts: []string{"api.test"}, Inject: []string{"body"}})
	ph := placeholder(s, "TOKEN")
	r = httptest.NewRequest("POST", "https://evil.test/", strings.NewReader(strings.Repeat("z", 50)+ph))
	request(s, "evil.test", true, r)
	b, err := io.ReadAll(r.Body)
	var v *Violation
	if !errorsAs(err, &v) || strings.Contains(string(b), ph) {
		t.Errorf("body to another host: %q %v", b, err)
	}
}

func errorsAs(err error, v **Violation) bool {
	x, ok := err.(*Violation)
	*v = x
	return ok
}

func TestScanNameAndFlow(t *testing.T) {
	s := store(t, Spec{Name: "TOKEN", FromEnv: "TOKEN", Hosts: []string{"api.test"}, OnViolation: "terminate"})
	ph := placeholder(s, "TOKEN")
	// DNS names: case folded, split across labels.
	name := strings.ToLower(ph[:8]) + "." + strings.ToLower(ph[8:]) + ".evil.test."
	if ref := s.ScanName(name); ref == nil || !ref.Terminate || ref.Secret != "TOKEN" {
		t.Errorf("DNS name: %+v", ref)
	}
	if ref := s.ScanName("api.test."); ref != nil {
		t.Errorf("clean name: %+v", ref)
	}
	if ref := s.ScanFlow("", []byte("SSH-2.0 "+ph)); ref == nil {
		t.Error("first bytes of a raw flow")
	}
}

func TestResponseHeadersHideTheValue(t *testing.T) {
	s := store(t, Spec{Name: "TOKEN", FromEnv: "TOKEN", Hosts: []string{"api.test"}})
	ph := placeholder(s, "TOKEN")
	if s.Scrubber("other.test") != nil {
		t.Error("a host no secret goes to gets a scrubber")
	}
	sc := s.Scrubber("api.test")
	basic := base64.StdEncoding.EncodeToString([]byte("me:s3cr3t-value-0123456789"))
	h := http.Header{"X-Echo": {"you sent s3cr3t-value-0123456789"}, "X-Auth": {"Basic " + basic},
		"X-S3cr3t-value-0123456789": {"in the name"}}
	sc.Header(h)
	if got := h.Get("X-Echo"); strings.Contains(got, "s3cr3t") || !strings.Contains(got, ph) {
		t.Errorf("echoed header: %q", got)
	}
	if got, want := h.Get("X-Auth"), "Basic "+base64.StdEncoding.EncodeToString([]byte("me:"+ph)); got != want {
		t.Errorf("echoed basic auth: %q, want %q", got, want)
	}
	for k := range h {
		if strings.Contains(strings.ToLower(k), "s3cr3t") {
			t.Errorf("a header name holds the value: %q", k)
		}
	}
}

// TestResponseBodyHidesTheValue: a body from a secret's host passes with
// the value, as it is or URL-encoded, turned into the placeholder, also
// when it is split across reads; a rotated value is still caught; the
// stream is not held back where no value can start.
func TestResponseBodyHidesTheValue(t *testing.T) {
	s := store(t, Spec{Name: "TOKEN", FromEnv: "TOKEN", Hosts: []string{"api.test"}})
	ph, val := placeholder(s, "TOKEN"), "s3cr3t-value-0123456789"
	body := "a " + val + " b " + val + " c"
	for cut := 0; cut <= len(body); cut += 3 {
		r := s.Scrubber("api.test").Body(io.MultiReader(iotest.OneByteReader(strings.NewReader(body[:cut])), strings.NewReader(body[cut:])))
		b, err := io.ReadAll(r)
		if err != nil || strings.Contains(string(b), "s3cr3t") || strings.Count(string(b), ph) != 2 {
			t.Fatalf("cut at %d: %q %v", cut, b, err)
		}
	}
	// A value with characters that URL encoding and JSON escape.
	s2 := store(t, Spec{Name: "SLASHY", FromEnv: "SLASHY", Hosts: []string{"api.test"}})
	ph2, v2 := placeholder(s2, "SLASHY"), "ab/cd+ef=gh&0123456789"
	body = `{"raw": "` + v2 + `", "query": "?k=` + url.QueryEscape(v2) + `", "path": "/` + url.PathEscape(v2) + `", "json": "ab/cd+ef=gh\u00260123456789"}`
	b, _ := io.ReadAll(s2.Scrubber("api.test").Body(strings.NewReader(body)))
	if strings.Contains(string(b), "0123456789") || strings.Count(string(b), ph2) != 4 {
		t.Errorf("encoded forms: %s", b)
	}
	// Rotation: the old value is still taken out.
	if err := s.Reload([]Spec{{Name: "TOKEN", FromEnv: "OTHER", Hosts: []string{"api.test"}}}); err != nil {
		t.Fatal(err)
	}
	b, _ = io.ReadAll(s.Scrubber("api.test").Body(strings.NewReader(val + " other-secret-value-xyz")))
	if strings.Contains(string(b), "s3cr3t") || strings.Contains(string(b), "other-secret") {
		t.Errorf("after a reload: %q", b)
	}
	// A stream that pauses gets what cannot start the value at once.
	pr, pw := io.Pipe()
	defer pw.Close()
	r := s.Scrubber("api.test").Body(pr)
	go pw.Write([]byte("data: 1\n\n"))
	buf := make([]byte, 64)
	n, err := r.Read(buf)
	if err != nil || string(buf[:n]) != "data: 1\n\n" {
		t.Errorf("a paused stream: %q %v", buf[:n], err)
	}
}

func TestFiles(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "s.json")
	os.WriteFile(p, []byte(`{"secrets": [{"name": "K", "from_env": "K", "hosts": ["a.test"], "inject": ["header:X-Key", "query"]}]}`), 0o644)
	if _, err := LoadFile(p); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("a world-readable file: %v", err)
	}
	os.Chmod(p, 0o600)
	if _, err := LoadFile(p); err != nil {
		t.Error(err)
	}
	for _, bad := range []string{
		`{"secrets": [{"name": "K-1", "from_env": "K", "hosts": ["a.test"]}]}`,
		`{"secrets": [{"name": "K", "hosts": ["a.test"]}]}`,
		`{"secrets": [{"name": "K", "from_env": "K", "hosts": []}]}`,
		`{"secrets": [{"name": "K", "from_env": "K", "hosts": ["a.test"], "inject": ["cookie"]}]}`,
		`{"secrets": [{"name": "K", "from_env": "K", "hosts": ["a.test"], "on_violation": "ignore"}]}`,
		`{"secrets": [{"name": "K", "from_env": "K", "hosts": ["a.test"]}, {"name": "K", "from_env": "K", "hosts": ["a.test"]}]}`,
	} {
		if _, err := ParseFile([]byte(bad)); err == nil || !strings.Contains(err.Error(), "secrets[") {
			t.Errorf("accepted or unclear: %s: %v", bad, err)
		}
	}
	if _, err := ParseFlag("TOKEN@api.test,*.api2.test"); err != nil {
		t.Error(err)
	}
	if _, err := ParseFlag("TOKEN"); err == nil {
		t.Error("a flag without hosts")
	}
}

// TestFileOwners: a secrets file and a from_file value must belong to
// root, msbtap's user or the user who ran sudo, and be private; the
// error names the file and what is wrong.
func TestFileOwners(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root to give files to another owner")
	}
	t.Setenv("SUDO_UID", "")
	dir := t.TempDir()
	other := 40000 + int(mrand.Uint32()%20000) // a uid nobody has
	value := filepath.Join(dir, "value")
	os.WriteFile(value, []byte("v-"+strconv.Itoa(int(mrand.Uint32()))+"\n"), 0o600)
	p := filepath.Join(dir, "s.json")
	os.WriteFile(p, []byte(`{"secrets": [{"name": "K", "from_file": "`+value+`", "hosts": ["a.test"]}]}`), 0o600)
	load := func() error {
		f, err := LoadFile(p)
		if err != nil {
			return err
		}
		_, err = New(f.Secrets, env(nil))
		return err
	}
	if err := load(); err != nil {
		t.Fatalf("root's private files: %v", err)
	}
	for _, tc := range []struct {
		file string
		want string
	}{{p, p + ": owned by uid " + strconv.Itoa(other) + ", not by root; chown it"},
		{value, "secret K: from_file " + value + ": owned by uid " + strconv.Itoa(other)}} {
		os.Chown(tc.file, other, other)
		if err := load(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s owned by another user: %v, want %q", tc.file, err, tc.want)
		}
		// The user who ran sudo may own it.
		t.Setenv("SUDO_UID", strconv.Itoa(other))
		if err := load(); err != nil {
			t.Errorf("%s owned by SUDO_UID: %v", tc.file, err)
		}
		t.Setenv("SUDO_UID", strconv.Itoa(other+1))
		if err := load(); err == nil || !strings.Contains(err.Error(), "or the user who ran sudo (uid "+strconv.Itoa(other+1)+")") {
			t.Errorf("%s owned by another user than SUDO_UID: %v", tc.file, err)
		}
		t.Setenv("SUDO_UID", "")
		os.Chown(tc.file, 0, 0)
		// Readable or writable by others.
		for _, mode := range []os.FileMode{0o640, 0o602} {
			os.Chmod(tc.file, mode)
			if err := load(); err == nil || !strings.Contains(err.Error(), tc.file+": readable or writable by group or others") {
				t.Errorf("%s mode %v: %v", tc.file, mode, err)
			}
		}
		os.Chmod(tc.file, 0o600)
	}
	// A link to a file is the file; a directory is no file.
	link := filepath.Join(dir, "link.json")
	os.Symlink(p, link)
	if _, err := LoadFile(link); err != nil {
		t.Errorf("a link to a good file: %v", err)
	}
	os.Chown(p, other, other)
	if _, err := LoadFile(link); err == nil || !strings.Contains(err.Error(), "owned by uid") {
		t.Errorf("a link to another user's file: %v", err)
	}
	if _, err := LoadFile(dir); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("a directory: %v", err)
	}
}

// TestResponseBodyHidesBase64: a body that carries the value inside
// base64 (an echoed basic auth, whatever comes before it) decodes to the
// placeholder, not the value.
func TestResponseBodyHidesBase64(t *testing.T) {
	s := store(t, Spec{Name: "TOKEN", FromEnv: "TOKEN", Hosts: []string{"api.test"}})
	ph, val := placeholder(s, "TOKEN"), "s3cr3t-value-0123456789"
	for _, prefix := range []string{"", "u:", "me:", "user:"} {
		for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.URLEncoding} {
			b64 := enc.EncodeToString([]byte(prefix + val))
			body := `{"headers": {"Authorization": ["Basic ` + b64 + `"]}}`
			out, _ := io.ReadAll(s.Scrubber("api.test").Body(strings.NewReader(body)))
			got := string(out)
			i := strings.Index(got, "Basic ")
			tok := got[i+6 : strings.Index(got[i:], `"]`)+i]
			dec, err := enc.DecodeString(tok)
			if err != nil || strings.Contains(string(dec), "value-0123") || !strings.Contains(string(dec), ph[2:len(ph)-2]) {
				t.Errorf("prefix %q: the body's base64 decodes to %q (%v)", prefix, dec, err)
			}
		}
	}
}

// chunky returns b in pieces of random sizes.
type chunky struct {
	b []byte
	r *mrand.Rand
}

func (c *chunky) Read(p []byte) (int, error) {
	if len(c.b) == 0 {
		return 0, io.EOF
	}
	n := min(len(p), len(c.b), 1+c.r.IntN(40))
	copy(p, c.b[:n])
	c.b = c.b[n:]
	return n, nil
}

// TestReplacerMatchesReplaceAll: the streaming replacer gives what
// replacing in the whole text would, whatever the read sizes, for texts
// made to hold the strings, their prefixes and overlaps.
func TestReplacerMatchesReplaceAll(t *testing.T) {
	r := mrand.New(mrand.NewPCG(mrand.Uint64(), 1))
	pairs := []pair{{[]byte("abcab"), []byte("XY")}, {[]byte("bca"), []byte("LONGER!")}, {[]byte("zz"), []byte("zz")}}
	atoms := []string{"a", "b", "c", "z", "ab", "abc", "abca", "abcab", "bca", "x"}
	for i := 0; i < 2000; i++ {
		var sb strings.Builder
		for j := r.IntN(30); j > 0; j-- {
			sb.WriteString(atoms[r.IntN(len(atoms))])
		}
		text := sb.String()
		got, err := io.ReadAll(newMultiReplacer(io.NopCloser(&chunky{[]byte(text), r}), pairs, func(int) error { return nil }))
		if want := referenceReplace(text, pairs); err != nil || string(got) != want {
			t.Fatalf("%q: got %q, want %q (%v)", text, got, want, err)
		}
	}
}

// referenceReplace replaces left to right, at each place the first of
// the earliest matches, the longest on a tie, as the replacer does.
func referenceReplace(s string, pairs []pair) string {
	var out strings.Builder
	for len(s) > 0 {
		at, which := -1, -1
		for i, p := range pairs {
			j := strings.Index(s, string(p.old))
			if j >= 0 && (at < 0 || j < at || (j == at && len(p.old) > len(pairs[which].old))) {
				at, which = j, i
			}
		}
		if at < 0 {
			out.WriteString(s)
			break
		}
		out.WriteString(s[:at])
		out.Write(pairs[which].new)
		s = s[at+len(pairs[which].old):]
	}
	return out.String()
}
