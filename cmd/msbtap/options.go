package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/msbtap/msbtap/internal/fielderr"
	"github.com/msbtap/msbtap/settings"
)

// runFlags are msbtap run's flags: --config, then one for each setting
// (and the hidden short ones).
func runFlags() []cli.Flag {
	flags := []cli.Flag{&cli.StringFlag{Name: "config", Usage: "read settings from JSON `FILE` (keys are the flag names in snake_case; flags win)"}}
	var short []cli.Flag
	for _, s := range settings.All() {
		flags = append(flags, settingFlag(&s))
		if s.Short != "" {
			short = append(short, &cli.StringSliceFlag{Name: s.Short, Hidden: true})
		}
	}
	return append(flags, short...)
}

// settingFlag is the flag of a setting.
func settingFlag(s *settings.Setting) cli.Flag {
	switch s.Kind() {
	case settings.Int:
		v, _ := s.Default.(int)
		return &cli.IntFlag{Name: s.Name, Value: v, Usage: s.Usage}
	case settings.Bool:
		v, _ := s.Default.(bool)
		return &cli.BoolFlag{Name: s.Name, Value: v, Usage: s.Usage}
	case settings.Float:
		v, _ := s.Default.(float64)
		return &cli.Float64Flag{Name: s.Name, Value: v, Usage: s.Usage}
	case settings.List:
		return &cli.StringSliceFlag{Name: s.Name, Usage: s.Usage}
	}
	v, _ := s.Default.(string)
	return &cli.StringFlag{Name: s.Name, Value: v, Usage: s.Usage}
}

// runOptions are the settings as given: on the command line, else in
// the --config file.
type runOptions struct {
	c       *cli.Context
	cfg     map[string]json.RawMessage
	cfgPath string
}

func loadSettings(c *cli.Context) (*runOptions, error) {
	s := &runOptions{c: c}
	path := c.String("config")
	if path == "" {
		return s, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--config: %w", err)
	}
	if err := json.NewDecoder(bytes.NewReader(b)).Decode(&s.cfg); err != nil {
		return nil, fmt.Errorf("--config %s: %v", path, err)
	}
	known := map[string]bool{}
	for _, st := range settings.All() {
		known[st.Key()] = true
	}
	for k := range s.cfg {
		if !known[k] {
			return nil, fmt.Errorf("--config %s: unknown key %q (keys are the run flags in snake_case, e.g. dns_upstream)", path, k)
		}
	}
	s.cfgPath = path
	return s, nil
}

// Lookup implements settings.Source: the command line's value, else
// the config file's; a Short flag's values add to the setting's.
func (s *runOptions) Lookup(st *settings.Setting, v any) (bool, error) {
	given := false
	switch raw, inCfg := s.cfg[st.Key()]; {
	case s.c.IsSet(st.Name):
		given = true
		fromFlag(s.c, st.Name, v)
	case inCfg:
		given = true
		if json.Unmarshal(raw, v) != nil {
			return true, fmt.Errorf("--config %s: %s: want %s", s.cfgPath, st.Key(), st.Kind())
		}
	}
	if l, ok := v.(*[]string); ok && st.Short != "" && s.c.IsSet(st.Short) {
		given = true
		*l = append(*l, s.c.StringSlice(st.Short)...)
	}
	return given, nil
}

// fromFlag stores flag name's value in v, of the flag's type.
func fromFlag(c *cli.Context, name string, v any) {
	switch v := v.(type) {
	case *string:
		*v = c.String(name)
	case *int:
		*v = c.Int(name)
	case *bool:
		*v = c.Bool(name)
	case *float64:
		*v = c.Float64(name)
	case *[]string:
		*v = c.StringSlice(name)
	}
}

// Object implements settings.Source: the config file's value when it is
// not a string, and the flag is not given.
func (s *runOptions) Object(st *settings.Setting) (json.RawMessage, bool) {
	raw, ok := s.cfg[st.Key()]
	var name string
	if !ok || s.c.IsSet(st.Name) || json.Unmarshal(raw, &name) == nil {
		return nil, false
	}
	return raw, true
}

// Args implements settings.Source.
func (s *runOptions) Args() []string { return s.c.Args().Slice() }

// flagError names the flag (or config key) in a library's field error.
func (s *runOptions) flagError(err error) error {
	return asFlagError(err, func(field string) string {
		if _, fromCfg := s.cfg[field]; fromCfg && !s.c.IsSet(strings.ReplaceAll(field, "_", "-")) {
			return fmt.Sprintf("%s (in --config %s)", field, s.cfgPath)
		}
		return ""
	})
}

// asFlagError turns the field a library's error names into its flag (or
// what name gives, when it gives one).
func asFlagError(err error, name func(field string) string) error {
	var fe *fielderr.Error
	if err == nil || !errors.As(err, &fe) {
		return err
	}
	n := "--" + strings.ReplaceAll(fe.Field, "_", "-")
	if name != nil {
		if m := name(fe.Field); m != "" {
			n = m
		}
	}
	msg := strings.Replace(err.Error(), fe.Field, n, 1)
	var ee *exitError
	if errors.As(err, &ee) {
		return withStatus(ee.code, errors.New(msg))
	}
	return errors.New(msg)
}
