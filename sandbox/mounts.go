package sandbox

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
)

// PrivateDirs get an empty tmpfs of their own in the command's mount
// namespace (with Spec.Private): the host's path-based Unix sockets live
// there (tmux and screen servers, D-Bus, /run/user, docker.sock, ssh-agent),
// and each of them runs code outside the sandbox's network namespace.
// /var/run is usually a symbolic link to /run, and then gets nothing more.
var PrivateDirs = []string{"/run", "/var/run", "/tmp", "/var/tmp", "/dev/shm"}

// Bind is a host path the command sees at the same path, over the private
// directories.
type Bind struct {
	Path     string
	ReadOnly bool `json:",omitempty"`
}

// CheckBind checks a --bind path on the host: absolute, existing.
func CheckBind(p string) (string, error) {
	if !filepath.IsAbs(p) {
		abs, err := filepath.Abs(p)
		if err != nil {
			return "", err
		}
		p = abs
	}
	p = filepath.Clean(p)
	if p == "/" {
		return "", errors.New("the whole file system is the host's already")
	}
	if _, err := os.Stat(p); err != nil {
		return "", err
	}
	return p, nil
}

// hostFiles are files of /etc that are often symbolic links into /run
// (systemd-resolved's resolv.conf): the command keeps seeing their
// targets, read-only.
var hostFiles = []string{"/etc/resolv.conf", "/etc/hosts"}

// tree is a bind's copy of a host path, taken before the private
// directories hide it.
type tree struct {
	fd   int
	bind Bind
	dir  bool
}

// privateMounts gives the command empty /run, /tmp, /var/tmp and
// /dev/shm, then mounts spec's binds over them at their own paths. The
// binds are copied (open_tree) before the tmpfs mounts hide their
// sources, with what is mounted under them: a path hidden by Spec.Hide
// stays hidden inside a bind.
func privateMounts(spec Spec) error {
	binds := append([]Bind(nil), spec.Binds...)
	for _, f := range hostFiles {
		if t, err := filepath.EvalSymlinks(f); err == nil && t != f && underAny(t, PrivateDirs) {
			binds = append(binds, Bind{Path: t, ReadOnly: true})
		}
	}
	if d := workDirBind(spec.Dir, binds); d != "" {
		binds = append(binds, Bind{Path: d})
	}
	// A bind inside another goes on top of it, whatever the order given.
	sort.SliceStable(binds, func(i, j int) bool {
		return strings.Count(binds[i].Path, "/") < strings.Count(binds[j].Path, "/")
	})
	trees := make([]tree, 0, len(binds))
	defer func() {
		for _, t := range trees {
			unix.Close(t.fd)
		}
	}()
	for _, b := range binds {
		st, err := os.Stat(b.Path)
		if err != nil {
			return fmt.Errorf("bind %s: %w", b.Path, err)
		}
		fd, err := unix.OpenTree(unix.AT_FDCWD, b.Path, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC|unix.AT_RECURSIVE)
		if err != nil {
			return fmt.Errorf("bind %s: copy the mount: %w", b.Path, err)
		}
		trees = append(trees, tree{fd: fd, bind: b, dir: st.IsDir()})
		if b.ReadOnly {
			attr := unix.MountAttr{Attr_set: unix.MOUNT_ATTR_RDONLY}
			if err := unix.MountSetattr(fd, "", unix.AT_EMPTY_PATH|unix.AT_RECURSIVE, &attr); err != nil {
				return fmt.Errorf("bind %s read-only: %w", b.Path, err)
			}
		}
	}

	// Resolve every directory first: /dev/shm may be a link into /run,
	// which is about to change.
	var dirs []string
	seen := map[string]bool{}
	for _, d := range PrivateDirs {
		r, err := filepath.EvalSymlinks(d)
		if err != nil {
			continue // no such directory here
		}
		if !seen[r] {
			seen[r] = true
			dirs = append(dirs, r)
		}
	}
	for _, d := range dirs {
		mode := "1777"
		if d == "/run" {
			mode = "0755"
		}
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("private %s: %w", d, err)
		}
		if err := unix.Mount("tmpfs", d, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode="+mode); err != nil {
			return fmt.Errorf("private %s: %w", d, err)
		}
		if d == "/run" {
			// /var/lock is a link to /run/lock, which everyone may use.
			if err := os.Mkdir("/run/lock", 0o755); err == nil {
				_ = unix.Chmod("/run/lock", 0o1777) // os.Chmod has no plain sticky bit
			}
		}
	}

	for _, t := range trees {
		if err := mountPoint(t.bind.Path, t.dir); err != nil {
			return fmt.Errorf("bind %s: %w", t.bind.Path, err)
		}
		if err := unix.MoveMount(t.fd, "", unix.AT_FDCWD, t.bind.Path, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
			return fmt.Errorf("bind %s: %w", t.bind.Path, err)
		}
	}
	return nil
}

// mountPoint makes p (a directory, or an empty file) where a private
// tmpfs left nothing.
func mountPoint(p string, dir bool) error {
	if _, err := os.Stat(p); err == nil {
		return nil
	}
	if dir {
		return os.MkdirAll(p, 0o755)
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	return f.Close()
}

// workDirBind is the working directory the command is started in when it
// lies below a private directory (a checkout in /tmp, say) and no bind
// shares it yet: the command keeps it, as it keeps every directory outside
// the private ones. A private directory itself (/tmp, /run) is never shared
// this way: that is what it hides.
func workDirBind(dir string, binds []Bind) string {
	if dir == "" {
		return ""
	}
	if r, err := filepath.EvalSymlinks(dir); err == nil {
		dir = r
	}
	if !underAny(dir, PrivateDirs) {
		return ""
	}
	for _, d := range PrivateDirs {
		if r, err := filepath.EvalSymlinks(d); err == nil {
			d = r
		}
		if dir == d {
			return ""
		}
	}
	for _, b := range binds {
		if dir == b.Path || strings.HasPrefix(dir, b.Path+"/") {
			return ""
		}
	}
	return dir
}

func underAny(p string, dirs []string) bool {
	for _, d := range dirs {
		if r, err := filepath.EvalSymlinks(d); err == nil {
			d = r
		}
		if p == d || strings.HasPrefix(p, d+"/") {
			return true
		}
	}
	return false
}
