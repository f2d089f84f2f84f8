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
	"io"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
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
// readPrivate).
func LoadFile(path string) (*File, error) {
	b, err := readPrivate(path)
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
	b, err := readPrivate(s.FromFile)
	if err != nil {
		return nil, fmt.Errorf("secret %s: from_file %w", s.Name, err)
	}
	b = bytes.TrimSuffix(b, []byte("\n"))
	if len(b) == 0 {
		return nil, fmt.Errorf("secret %s: %s is empty", s.Name, s.FromFile)
	}
	return b, nil
}

// maxFile bounds what is read of a secrets file or a value's file.
const maxFile = 1 << 20

// ReadPrivate is readPrivate, for the keeper's re-reads (as root, on
// SIGHUP), which must make the same checks as the start.
func ReadPrivate(path string) ([]byte, error) { return readPrivate(path) }

// readPrivate reads a secrets file or a secret's value file. msbtap reads
// them as root, before it drops its privileges, so a file must be one the
// user who started it could have written: a regular file owned by root,
// by msbtap's own user or by the user who ran sudo (SUDO_UID), that no
// group and no other user may read or write. A symbolic link is followed;
// the file it names is checked, through the descriptor read from (opened
// without blocking, so a FIFO put in its place is refused, not waited on).
func readPrivate(path string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: not a regular file (%v)", path, st.Mode().Type())
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		owners, who := allowedOwners()
		if !slices.Contains(owners, int(sys.Uid)) {
			return nil, fmt.Errorf("%s: owned by uid %d, not by %s; chown it", path, sys.Uid, who)
		}
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("%s: readable or writable by group or others (mode %v); chmod 600 it", path, perm)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxFile+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(b) > maxFile {
		return nil, fmt.Errorf("%s: larger than %d bytes", path, maxFile)
	}
	return b, nil
}

// allowedOwners are the uids a private file may belong to: root,
// msbtap's own, and the user who ran sudo; who says so in words.
func allowedOwners() ([]int, string) {
	owners := []int{0}
	who := "root"
	if u := os.Geteuid(); u != 0 {
		owners = append(owners, u)
		who += fmt.Sprintf(" or msbtap's user (uid %d)", u)
	}
	if su := os.Getenv("SUDO_UID"); su != "" {
		if u, err := strconv.Atoi(su); err == nil && u > 0 && !slices.Contains(owners, u) {
			owners = append(owners, u)
			who += fmt.Sprintf(" or the user who ran sudo (uid %d)", u)
		}
	}
	return owners, who
}

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
