// Package settings turns the settings of msbtap run — strings, numbers
// and lists, from the command line or a --config file — into the agent's
// Config, validated. One table (All) describes every setting: its name,
// default, help text, how it sets the Config and how it is checked; the
// command line's flags, the --config keys and the man page are made from
// it. Errors name the setting (see fielderr); the command line names the
// flag.
package settings

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"

	"github.com/msbtap/msbtap/internal/fielderr"
	"github.com/msbtap/msbtap/plan"
	"github.com/msbtap/msbtap/process"
)

// Kind is the type of a setting's value.
type Kind int

// The kinds of settings, with the Go type of their values.
const (
	String Kind = iota // string
	Int                // int
	Bool               // bool
	Float              // float64
	List               // []string, repeatable on the command line
)

// String is the kind's Go type, as a message about a wrong value gives it.
func (k Kind) String() string {
	return [...]string{"string", "int", "bool", "float64", "[]string"}[k]
}

// Setting describes one setting of msbtap run.
type Setting struct {
	// Name is the flag's name (dns-upstream); Key is the --config key.
	Name string
	// Default is the value when the setting is not given, of the Go type
	// of its Kind; nil is that type's zero value.
	Default any
	// Usage is the help text; a `WORD` in it names the value.
	Usage string
	// Short is a hidden one-letter flag whose values a List setting takes
	// too (-p for --publish); it is a flag of its own, not an alias, so
	// that both can be given on one command line.
	Short string

	// value reads the setting from a Source and sets the Config.
	value valuer
	// ifGiven: value runs only when the setting was given (its Default
	// only shows in the help).
	ifGiven bool
	// object sets the Config from a JSON object a config file gives
	// instead of a string (an inline policy).
	object func(b *build, raw json.RawMessage) error
	// check runs once every setting is set, for the rules across
	// settings; given says whether this one was given.
	check func(b *build, given bool) error
}

// Kind is the type of the setting's value.
func (s *Setting) Kind() Kind { return s.value.kind() }

// Key is the setting's --config key, and the field its errors name: the
// name in snake_case.
func (s *Setting) Key() string { return strings.ReplaceAll(s.Name, "-", "_") }

// All is the table of settings, in the order the help lists them.
func All() []Setting { return slices.Clone(table) }

// Source holds the values of the settings as given: the command line's,
// else a config file's.
type Source interface {
	// Lookup stores the setting's value in v (a *string, *int, *bool,
	// *float64 or *[]string, as its Kind, holding the default) and
	// reports whether it was given.
	Lookup(s *Setting, v any) (given bool, err error)
	// Object is a JSON object a config file gives for a setting that
	// accepts one, kept whole.
	Object(s *Setting) (json.RawMessage, bool)
	// Args is the command to run.
	Args() []string
}

// ErrNothingToAttach: no namespace, no VM, no command.
var ErrNothingToAttach = errors.New("nothing to attach: give a network namespace, VM mode with a TAP name, or a command to run")

// NewLogger makes the agent's logger.
func NewLogger(w io.Writer, format string, level slog.Level) *slog.Logger {
	ho := &slog.HandlerOptions{Level: level}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, ho))
	}
	return slog.New(slog.NewTextHandler(w, ho))
}

// build is the Config being built, with what the settings give that the
// Config has no field for until they are all read.
type build struct {
	process.Config
	slot         int
	overrides    plan.Overrides
	controlOwner string
	logFormat    string
	logLevel     slog.Level
}

// Build turns the settings into the agent's Config, validated; the agent
// logs to logTo.
func Build(src Source, logTo io.Writer) (process.Config, error) {
	b := &build{}
	b.Command = src.Args()
	values := make([]any, len(table))
	given := make([]bool, len(table))
	for i := range table {
		s := &table[i]
		v, ok, err := read(b, src, s)
		if err != nil {
			return b.Config, err
		}
		values[i], given[i] = v, ok
	}
	if !b.VM && b.Netns == "" && len(b.Command) == 0 {
		return b.Config, ErrNothingToAttach
	}
	for i := range table {
		if s := &table[i]; s.check != nil {
			if err := s.check(b, given[i]); err != nil {
				return b.Config, named(s, values[i], err)
			}
		}
	}
	return b.Config, b.finish(logTo)
}

// read reads one setting and sets the Config from it; it returns the
// value, as errors about it show it.
func read(b *build, src Source, s *Setting) (v any, given bool, err error) {
	if s.object != nil {
		if raw, ok := src.Object(s); ok {
			return string(raw), true, named(s, nil, s.object(b, raw))
		}
	}
	return s.value.read(b, src, s)
}

// finish makes what needs several settings at once: the address plan and
// the logger.
func (b *build) finish(logTo io.Writer) error {
	p, err := plan.ForSlot(b.slot)
	if err != nil {
		return err
	}
	if b.Plan, err = p.Apply(b.overrides); err != nil {
		return err
	}
	b.Log = NewLogger(logTo, b.logFormat, b.logLevel)
	return nil
}

// valuer reads a setting of one kind and hands it to its setter; an
// error of the Source is returned as it is, the setter's is named.
type valuer interface {
	kind() Kind
	read(b *build, src Source, s *Setting) (v any, given bool, err error)
}

// setter is a setting's valuer for values of Go type T.
type setter[T any] struct {
	k   Kind
	set func(b *build, v T) error
}

func (t setter[T]) kind() Kind { return t.k }

func (t setter[T]) read(b *build, src Source, s *Setting) (any, bool, error) {
	var v T
	if s.Default != nil {
		v = s.Default.(T)
	}
	given, err := src.Lookup(s, &v)
	if err != nil || (s.ifGiven && !given) {
		return v, given, err
	}
	return v, given, named(s, v, t.set(b, v))
}

// The setters of each kind: set gets the value, given or the default.
func text(set func(b *build, v string) error) valuer   { return setter[string]{String, set} }
func integer(set func(b *build, v int) error) valuer   { return setter[int]{Int, set} }
func boolean(set func(b *build, v bool) error) valuer  { return setter[bool]{Bool, set} }
func float(set func(b *build, v float64) error) valuer { return setter[float64]{Float, set} }
func list(set func(b *build, v []string) error) valuer { return setter[[]string]{List, set} }

// bad is an error about value v of the setting being read or checked
// (for a list, one of its items); named fills in the setting.
func bad(v any, format string, args ...any) error { return fielderr.Bad("", v, format, args...) }

// unnamed is err about the setting being read, with no value shown.
func unnamed(err error) error {
	if err == nil {
		return nil
	}
	return &fielderr.Error{Err: err}
}

// named names setting s in err: an error of bad or unnamed gets its key; an
// error that names a field already (a library's) stays; any other is
// about the value v (the whole list, for a list: so v is not shown).
func named(s *Setting, v any, err error) error {
	var fe *fielderr.Error
	switch {
	case err == nil:
		return nil
	case errors.As(err, &fe) && fe.Field == "":
		fe.Field = s.Key()
		return err
	case fe != nil:
		return err
	case s.Kind() == List || v == nil:
		return fielderr.Wrap(s.Key(), err)
	}
	return fielderr.Bad(s.Key(), v, "%w", err)
}

// choice returns the value of name v among choices; the error lists them
// sorted, so a mistake always gets the same message.
func choice[T any](v string, choices map[string]T) (T, error) {
	if c, ok := choices[v]; ok {
		return c, nil
	}
	var zero T
	names := make([]string, 0, len(choices))
	for k := range choices {
		names = append(names, k)
	}
	slices.Sort(names)
	return zero, fmt.Errorf("want one of %s", strings.Join(names, ", "))
}
