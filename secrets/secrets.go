// Package secrets keeps credentials out of the sandbox: the sandbox holds
// a placeholder, and msbtap swaps in the real value on the wire, only in
// intercepted HTTPS requests to the hosts the secret is meant for. A
// placeholder seen anywhere else it could be injected (another host, plain
// HTTP, a DNS name, a server name) is a violation.
package secrets

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/msbtap/msbtap/internal/safefile"
)

// File is a secrets file (JSON):
//
//	{"secrets": [{"name": "OPENAI_API_KEY", "from_env": "OPENAI_API_KEY",
//	  "hosts": ["api.openai.com"], "inject": ["header", "basic_auth"],
//	  "on_violation": "block"}]}
type File struct {
	Secrets []Spec `json:"secrets"`
}

// Spec declares one secret.
type Spec struct {
	// Name is the environment variable the sandbox sees the placeholder
	// in (letters, digits, underscores).
	Name string `json:"name"`
	// FromEnv names msbtap's own environment variable holding the value;
	// FromFile a file holding it (a final newline is dropped). One of the
	// two.
	FromEnv  string `json:"from_env,omitempty"`
	FromFile string `json:"from_file,omitempty"`
	// Hosts may receive the value: exact names, or "*.suffix".
	Hosts []string `json:"hosts"`
	// Inject says where the placeholder is replaced (and, sent elsewhere,
	// is a violation): "header" (every header), "header:NAME" (that header
	// only), "basic_auth", "query", "body". Default: header and
	// basic_auth.
	Inject []string `json:"inject,omitempty"`
	// OnViolation: block (403), log (block and audit: the default),
	// terminate (stop the sandbox), allow (pass the placeholder as it is).
	OnViolation string `json:"on_violation,omitempty"`
}

// Action is what a violation does.
type Action int

const (
	Log Action = iota
	Block
	Terminate
	Allow
)

func (a Action) String() string { return [...]string{"log", "block", "terminate", "allow"}[a] }

func parseAction(s string) (Action, error) {
	switch s {
	case "", "log":
		return Log, nil
	case "block":
		return Block, nil
	case "terminate":
		return Terminate, nil
	case "allow":
		return Allow, nil
	}
	return Log, fmt.Errorf("%q: want block, log, terminate or allow", s)
}

var nameRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// Errors are every problem of a secrets file, each naming its secret.
type Errors []error

func (e Errors) Error() string {
	s := make([]string, len(e))
	for i, err := range e {
		s[i] = err.Error()
	}
	return strings.Join(s, "\n")
}

// ParseFile parses and validates a secrets file.
func ParseFile(b []byte) (*File, error) {
	var f File
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(&f); err != nil {
		return nil, fmt.Errorf("secrets file: %v", err)
	}
	var errs Errors
	seen := map[string]bool{}
	for i, s := range f.Secrets {
		for _, err := range s.check() {
			errs = append(errs, fmt.Errorf("secrets[%d].%v", i, err))
		}
		if seen[s.Name] {
			errs = append(errs, fmt.Errorf("secrets[%d].name: %q declared twice", i, s.Name))
		}
		seen[s.Name] = true
	}
	if len(errs) > 0 {
		return nil, errs
	}
	return &f, nil
}

// LoadFile reads a secrets file, which must be private (see
// safefile.ReadPrivate).
func LoadFile(path string) (*File, error) {
	b, err := safefile.ReadPrivate(path, MaxFileSize)
	if err != nil {
		return nil, err
	}
	f, err := ParseFile(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return f, nil
}

// ParseFlag parses --secret NAME@HOST[,HOST…]: the value comes from
// msbtap's environment variable NAME.
func ParseFlag(s string) (Spec, error) {
	name, hosts, ok := strings.Cut(s, "@")
	if !ok || hosts == "" {
		return Spec{}, fmt.Errorf("%q: want NAME@HOST[,HOST…]", s)
	}
	sp := Spec{Name: name, FromEnv: name, Hosts: strings.Split(hosts, ",")}
	if errs := sp.check(); len(errs) > 0 {
		return Spec{}, fmt.Errorf("%q: %v", s, errs[0])
	}
	return sp, nil
}

func (s Spec) check() []error {
	var errs []error
	bad := func(f string, a ...any) { errs = append(errs, fmt.Errorf(f, a...)) }
	if !nameRE.MatchString(s.Name) {
		bad("name: %q: want letters, digits and underscores", s.Name)
	}
	if (s.FromEnv == "") == (s.FromFile == "") {
		bad("from_env, from_file: want exactly one")
	}
	if len(s.Hosts) == 0 {
		bad("hosts: at least one host may receive the value")
	}
	for j, h := range s.Hosts {
		n := strings.TrimPrefix(h, "*.")
		if n == "" || strings.ContainsAny(n, "*/: @") || strings.Contains(n, "..") {
			bad("hosts[%d]: %q: want a name, or *.suffix", j, h)
		}
	}
	for j, in := range s.Inject {
		switch k, arg, _ := strings.Cut(in, ":"); {
		case (k == "header" && arg != "") || ((k == "header" || k == "basic_auth" || k == "query" || k == "body") && arg == ""):
		default:
			bad("inject[%d]: %q: want header, header:NAME, basic_auth, query or body", j, in)
		}
	}
	if _, err := parseAction(s.OnViolation); err != nil {
		bad("on_violation: %v", err)
	}
	return errs
}

// value reads the secret's value.
func (s Spec) value(getenv func(string) string) ([]byte, error) {
	if s.FromEnv != "" {
		v := getenv(s.FromEnv)
		if v == "" {
			return nil, fmt.Errorf("secret %s: environment variable %s is empty or unset", s.Name, s.FromEnv)
		}
		return []byte(v), nil
	}
	b, err := safefile.ReadPrivate(s.FromFile, MaxFileSize)
	if err != nil {
		return nil, fmt.Errorf("secret %s: from_file %w", s.Name, err)
	}
	b = bytes.TrimSuffix(b, []byte("\n"))
	if len(b) == 0 {
		return nil, fmt.Errorf("secret %s: %s is empty", s.Name, s.FromFile)
	}
	return b, nil
}

// MaxFileSize bounds what is read of a secrets file or a value's file, at
// start and in the keeper's re-reads alike.
const MaxFileSize = 1 << 20

// CheckFiles reads every from_file value, as msbtap run would (checked
// like the secrets file), and returns what fails.
func (f *File) CheckFiles() error {
	var errs Errors
	for i, s := range f.Secrets {
		if s.FromFile == "" {
			continue
		}
		if _, err := s.value(nil); err != nil {
			errs = append(errs, fmt.Errorf("secrets[%d]: %w", i, err))
		}
	}
	if len(errs) > 0 {
		return errs
	}
	return nil
}

// minPlaceholder is the shortest placeholder: a shorter value gets a
// longer one (and a body it is swapped into, a new length).
const minPlaceholder = 16

const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

// newPlaceholder makes an unguessable placeholder of n characters (letters
// and digits: the same raw and URL-encoded) that is no substring of any
// of others, nor they of it, case ignored.
func newPlaceholder(n int, others []string) (string, error) {
	n = max(n, minPlaceholder)
	for try := 0; try < 100; try++ {
		b := make([]byte, 0, n)
		var r [64]byte
		for len(b) < n {
			if _, err := rand.Read(r[:]); err != nil {
				return "", err
			}
			for _, x := range r {
				if x < 248 && len(b) < n { // 248 = 4*62: no bias
					b = append(b, alphabet[int(x)%len(alphabet)])
				}
			}
		}
		p := string(b)
		if !slices.ContainsFunc(others, func(o string) bool {
			lo, lp := strings.ToLower(o), strings.ToLower(p)
			return strings.Contains(lo, lp) || strings.Contains(lp, lo)
		}) {
			return p, nil
		}
	}
	return "", errors.New("no placeholder found that overlaps no other")
}
