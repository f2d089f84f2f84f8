// Package safefile opens, rotates, reads and removes the files msbtap
// handles as root or on a user's behalf without letting a hostile path
// redirect it: no symbolic link followed in the last component where it
// writes, only regular files, private files only of a trusted owner and
// mode, and a file removed only if it is still the one seen before.
package safefile

import (
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// OpenNoFollow opens path with flag (creating it with mode perm) without
// following a symbolic link in its last component: a hostile link cannot
// make msbtap write elsewhere. Any kind of file is accepted (a capture may
// go to a FIFO).
func OpenNoFollow(path string, flag int, perm os.FileMode) (*os.File, error) {
	f, err := os.OpenFile(path, flag|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, perm)
	if err != nil {
		if pe, ok := err.(*os.PathError); ok && pe.Err == syscall.ELOOP {
			return nil, fmt.Errorf("%s: is a symbolic link; refusing to follow it", path)
		}
		return nil, err
	}
	return f, nil
}

// OpenRegularNoFollow is OpenNoFollow, and refuses anything but a regular
// file: the decision log, the pid file, the files the agent writes for
// the command.
func OpenRegularNoFollow(path string, flag int, perm os.FileMode) (*os.File, error) {
	f, err := OpenNoFollow(path, flag, perm)
	if err != nil {
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

// Rotate moves path to path.1 (replacing the last one; a missing path is
// no error) and opens path anew with OpenRegularNoFollow, mode perm.
func Rotate(path string, flag int, perm os.FileMode) (*os.File, error) {
	if err := os.Rename(path, path+".1"); err != nil && !os.IsNotExist(err) {
		return nil, err
	}
	return OpenRegularNoFollow(path, flag, perm)
}

// ReadPrivate reads a file holding secrets, which msbtap reads as root
// (before it drops its privileges, and in its keeper): the file must be one
// the user who started msbtap could have written, a regular file owned by
// root, by msbtap's own user or by the user who ran sudo (SUDO_UID), that
// no group and no other user may read or write, of at most max bytes. A
// symbolic link is followed; the file it names is checked, through the
// descriptor read from (opened without blocking, so a FIFO put in its
// place is refused, not waited on).
func ReadPrivate(path string, max int) ([]byte, error) {
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
		owners, who := privateOwners()
		if !slices.Contains(owners, int(sys.Uid)) {
			return nil, fmt.Errorf("%s: owned by uid %d, not by %s; chown it", path, sys.Uid, who)
		}
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("%s: readable or writable by group or others (mode %v); chmod 600 it", path, perm)
	}
	b, err := io.ReadAll(io.LimitReader(f, int64(max)+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(b) > max {
		return nil, fmt.Errorf("%s: larger than %d bytes", path, max)
	}
	return b, nil
}

// privateOwners are the uids a private file may belong to: root,
// msbtap's own, and the user who ran sudo; who says so in words.
func privateOwners() ([]int, string) {
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

// Stamp identifies a file as it was when seen: its device, inode, type
// and change time (an inode number can be reused at once; its type and
// change time tell a new file from the old).
type Stamp struct{ st unix.Stat_t }

// StampOf returns the stamp of path itself (a symbolic link is not
// followed); ok is false when path cannot be examined.
func StampOf(path string) (s Stamp, ok bool) {
	return s, path != "" && unix.Lstat(path, &s.st) == nil
}

// RemoveIfUnchanged removes path (a directory with all it holds) if it is
// still the file was stamped; another file now at path is left alone.
func RemoveIfUnchanged(path string, was Stamp) {
	var st unix.Stat_t
	if unix.Lstat(path, &st) != nil || st.Dev != was.st.Dev || st.Ino != was.st.Ino || st.Mode&unix.S_IFMT != was.st.Mode&unix.S_IFMT ||
		st.Ctim != was.st.Ctim {
		return
	}
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		os.RemoveAll(path)
	} else {
		os.Remove(path)
	}
}
