package safefile

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestOpenNoFollowRefusesALink: a symbolic link at the path is refused,
// never followed, by both opens; OpenRegularNoFollow refuses a FIFO too,
// and OpenNoFollow takes it.
func TestOpenNoFollowRefusesALink(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "target")
	os.WriteFile(target, []byte("keep"), 0o644)
	link := filepath.Join(dir, "link")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	for name, open := range map[string]func(string, int, os.FileMode) (*os.File, error){
		"OpenNoFollow": OpenNoFollow, "OpenRegularNoFollow": OpenRegularNoFollow,
	} {
		if f, err := open(link, os.O_WRONLY|os.O_TRUNC, 0o600); err == nil || !strings.Contains(err.Error(), "symbolic link") {
			t.Errorf("%s of a link: %v, want a refusal", name, err)
			if f != nil {
				f.Close()
			}
		}
	}
	if b, _ := os.ReadFile(target); string(b) != "keep" {
		t.Errorf("the link's target was written: %q", b)
	}
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	// O_RDWR: opening a FIFO so never waits for the other end.
	if f, err := OpenRegularNoFollow(fifo, os.O_RDWR, 0); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("OpenRegularNoFollow of a FIFO: %v", err)
		if f != nil {
			f.Close()
		}
	}
	f, err := OpenNoFollow(fifo, os.O_RDWR, 0)
	if err != nil {
		t.Fatalf("OpenNoFollow of a FIFO: %v", err)
	}
	f.Close()
}

// TestRotateRefusesALink: a symbolic link put at FILE is moved aside,
// never followed; the new FILE is a regular file of its own.
func TestRotateRefusesALink(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "target")
	os.WriteFile(target, []byte("keep"), 0o644)
	logf := filepath.Join(dir, "audit.log")
	if err := os.Symlink(target, logf); err != nil {
		t.Fatal(err)
	}
	f, err := Rotate(logf, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("x")
	f.Close()
	if b, _ := os.ReadFile(target); string(b) != "keep" {
		t.Errorf("the link's target was written: %q", b)
	}
	if st, err := os.Lstat(logf); err != nil || !st.Mode().IsRegular() || st.Mode().Perm() != 0o600 {
		t.Errorf("new FILE: %v %v", st, err)
	}
	if st, err := os.Lstat(logf + ".1"); err != nil || st.Mode()&os.ModeSymlink == 0 {
		t.Errorf("FILE.1 is not the link moved aside: %v %v", st, err)
	}
}

// TestReadPrivate: a private regular file of ours is read; one others may
// read, a FIFO (without waiting for a writer) and one over the bound are
// refused.
func TestReadPrivate(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good")
	os.WriteFile(good, []byte("s3cret"), 0o600)
	if b, err := ReadPrivate(good, 16); err != nil || string(b) != "s3cret" {
		t.Errorf("a private file: %q %v", b, err)
	}
	if _, err := ReadPrivate(good, 4); err == nil || !strings.Contains(err.Error(), "larger than 4 bytes") {
		t.Errorf("over the bound: %v", err)
	}
	open := filepath.Join(dir, "open")
	os.WriteFile(open, []byte("x"), 0o644)
	os.Chmod(open, 0o644)
	if _, err := ReadPrivate(open, 16); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("mode 0644: %v", err)
	}
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadPrivate(fifo, 16); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("a FIFO: %v", err)
	}
}

// TestRemoveIfUnchanged: the file stamped is removed; another file put at
// its path afterwards is left alone.
func TestRemoveIfUnchanged(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "pid")
	os.WriteFile(p, []byte("1\n"), 0o644)
	st, ok := StampOf(p)
	if !ok {
		t.Fatal("no stamp")
	}
	RemoveIfUnchanged(p, st)
	if _, err := os.Lstat(p); !os.IsNotExist(err) {
		t.Errorf("the stamped file is still there: %v", err)
	}
	// The kernel's change times tick coarsely: a new file with the inode
	// number just freed, made within a tick, would pass for the old one.
	time.Sleep(20 * time.Millisecond)
	os.WriteFile(p, []byte("2\n"), 0o644)
	RemoveIfUnchanged(p, st)
	if _, err := os.Lstat(p); err != nil {
		t.Errorf("another file at the path was removed: %v", err)
	}
	if _, ok := StampOf(""); ok {
		t.Error("a stamp of no path")
	}
	d := filepath.Join(dir, "bundle")
	os.MkdirAll(filepath.Join(d, "sub"), 0o755)
	st, _ = StampOf(d)
	RemoveIfUnchanged(d, st)
	if _, err := os.Lstat(d); !os.IsNotExist(err) {
		t.Errorf("the stamped directory is still there: %v", err)
	}
}
