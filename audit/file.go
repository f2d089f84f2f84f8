package audit

import (
	"fmt"
	"os"
	"syscall"
)

// OpenPrivate opens path for appending (creating it with mode perm) without
// following a symbolic link in its last component, and refuses anything but
// a regular file: a hostile link cannot make msbtap write elsewhere.
func OpenPrivate(path string, flag int, perm os.FileMode) (*os.File, error) {
	f, err := os.OpenFile(path, flag|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, perm)
	if err != nil {
		if pe, ok := err.(*os.PathError); ok && pe.Err == syscall.ELOOP {
			return nil, fmt.Errorf("%s: is a symbolic link; refusing to follow it", path)
		}
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("%s: not a regular file", path)
	}
	return f, nil
}

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
	f, err := OpenPrivate(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
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
	if err := os.Rename(r.path, r.path+".1"); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("rotate %s: %w", r.path, err)
	}
	f, err := OpenPrivate(r.path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("rotate %s: %w", r.path, err)
	}
	r.f, r.size = f, 0
	return nil
}

func (r *rotating) Close() error { return r.f.Close() }
