// Package fielderr is the error type library packages use to say which
// setting was wrong. Fields are named as the configuration keys are
// (snake_case, "guest_ipv4"); the command line turns them into flag names.
package fielderr

import "fmt"

// Error is a bad value of one setting.
type Error struct {
	// Field is the setting's key, e.g. "guest_ipv4" or "publish".
	Field string
	// Value is the offending value as written (quoted if a string), or "".
	Value string
	Err   error
}

func (e *Error) Error() string {
	if e.Value != "" {
		return e.Field + " " + e.Value + ": " + e.Err.Error()
	}
	return e.Field + ": " + e.Err.Error()
}

func (e *Error) Unwrap() error { return e.Err }

// New returns an Error for field with a formatted message.
func New(field, format string, args ...any) error {
	return &Error{Field: field, Err: fmt.Errorf(format, args...)}
}

// Bad returns an Error for field's value with a formatted reason.
func Bad(field string, value any, format string, args ...any) error {
	v := fmt.Sprint(value)
	if s, ok := value.(string); ok {
		v = fmt.Sprintf("%q", s)
	}
	return &Error{Field: field, Value: v, Err: fmt.Errorf(format, args...)}
}

// Wrap returns an Error for field around err (nil stays nil).
func Wrap(field string, err error) error {
	if err == nil {
		return nil
	}
	return &Error{Field: field, Err: err}
}
