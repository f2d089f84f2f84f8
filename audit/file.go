package audit

import (
	"fmt"
	"os"

	"github.com/msbtap/msbtap/internal/safefile"
)

// rotating is a file that starts over once it would pass max bytes: the
// full file becomes PATH.1 (replacing the last one).
type rotating struct {
	path   string
	reopen func() (*os.File, error) // rotates in another process; nil: here
	f      *os.File
	size   int64
	max    int64
}

func openRotating(path string, max int64, reopen func() (*os.File, error)) (*rotating, error) {
	f, err := safefile.OpenRegularNoFollow(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	st, _ := f.Stat()
	return &rotating{path: path, reopen: reopen, f: f, size: st.Size(), max: max}, nil
}

func (r *rotating) Write(b []byte) (int, error) {
	if r.size > 0 && r.size+int64(len(b)) > r.max {
		if err := r.rotate(); err != nil {
			return 0, err
		}
	}
	n, err := r.f.Write(b)
	r.size += int64(n)
	return n, err
}

func (r *rotating) rotate() error {
	if r.reopen != nil {
		f, err := r.reopen()
		if err != nil {
			return fmt.Errorf("rotate %s: %w", r.path, err)
		}
		r.f.Close()
		r.f, r.size = f, 0
		return nil
	}
	r.f.Close()
	f, err := safefile.Rotate(r.path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("rotate %s: %w", r.path, err)
	}
	r.f, r.size = f, 0
	return nil
}

func (r *rotating) Close() error { return r.f.Close() }
