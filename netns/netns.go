// Package netns opens, creates and enters network namespaces: the sandbox's
// namespace is found or made here, and work that must happen inside it runs
// on a thread this package moves there and back.
package netns

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Handle is an open network namespace; it keeps the namespace alive until
// closed.
type Handle = vnetns.NsHandle

// None is the Handle that names no namespace.
func None() Handle { return vnetns.None() }

// Resolve turns a namespace name into a path: a bare name is looked up
// under /run/netns (as `ip netns` names them), anything with a slash is a
// path.
func Resolve(s string) string {
	if strings.Contains(s, "/") {
		return s
	}
	return filepath.Join("/run/netns", s)
}

// Open opens the namespace at path, with an error that says what is wrong.
func Open(path string) (Handle, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return None(), fmt.Errorf("network namespace %s does not exist", path)
		}
		return None(), fmt.Errorf("network namespace %s: %w", path, err)
	}
	h, err := vnetns.GetFromPath(path)
	if err != nil {
		return None(), fmt.Errorf("open network namespace %s: %w", path, err)
	}
	if st.Type != unix.NSFS_MAGIC && st.Type != unix.PROC_SUPER_MAGIC {
		h.Close()
		return None(), fmt.Errorf("%s is not a network namespace", path)
	}
	return h, nil
}

// New creates a fresh, unnamed network namespace and returns a handle that
// keeps it alive. The calling goroutine's thread is left untouched.
func New() (Handle, error) {
	var h Handle
	err := Do(None(), func() error {
		var err error
		h, err = vnetns.New()
		if err != nil {
			return fmt.Errorf("create network namespace: %w", err)
		}
		return nil
	})
	return h, err
}

// Do runs fn on a dedicated OS thread that is in namespace ns (or, when ns
// is None, in a namespace fn itself switches to). The thread is returned to
// the agent's own namespace afterwards; if that fails, the thread is retired
// rather than reused in the wrong namespace.
func Do(ns Handle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := vnetns.Get()
		if err != nil {
			errc <- fmt.Errorf("get own network namespace: %w", err)
			return // the thread dies with this goroutine while locked
		}
		defer orig.Close()
		if ns.IsOpen() {
			if err := vnetns.Set(ns); err != nil {
				errc <- fmt.Errorf("enter network namespace: %w", err)
				return
			}
		}
		ferr := fn()
		if err := vnetns.Set(orig); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("return to own network namespace: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Same reports whether path still names the namespace ns (it may have been
// deleted, or replaced by another namespace of the same name).
func Same(path string, ns Handle) bool {
	var a, b unix.Stat_t
	if err := unix.Stat(path, &a); err != nil {
		return false
	}
	if err := unix.Fstat(int(ns), &b); err != nil {
		return false
	}
	return a.Dev == b.Dev && a.Ino == b.Ino
}

// SetSysctl writes value to /proc/sys/KEY inside namespace ns (KEY with
// dots or slashes: "net.ipv4.ping_group_range").
func SetSysctl(ns Handle, key, value string) error {
	path := filepath.Join("/proc/sys", strings.ReplaceAll(key, ".", "/"))
	return Do(ns, func() error {
		if err := os.WriteFile(path, []byte(value), 0); err != nil {
			return fmt.Errorf("sysctl %s=%s: %w", key, value, err)
		}
		return nil
	})
}
