// Package sandbox runs the command msbtap starts: in the sandbox's network
// namespace, in a PID and mount namespace of its own (a private /proc,
// and empty /run, /tmp, /var/tmp and /dev/shm: no host Unix socket), as an
// unprivileged user (nobody unless told) with empty capability sets and
// no_new_privs, in an environment built from an allow-list (Environ), so
// that it can neither reach the host's namespaces and services nor outlive
// a termination. A small init (msbtap itself, re-executed) is PID 1 there:
// it sets the process up, starts the command, forwards signals and reaps.
package sandbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"strconv"
	"strings"
	"syscall"

	"github.com/msbtap/msbtap/netns"
)

// InitArg is the hidden first argument that makes msbtap run as the
// sandbox's init; main hands control to Init when it sees it.
const InitArg = "__msbtap-sandbox-init"

// Spec is the command to run and whom as.
type Spec struct {
	Argv   []string
	Env    []string
	Dir    string
	UID    int
	GID    int
	Groups []int
	// Hide are host files the sandbox must not reach (the control
	// socket): /dev/null is mounted over each in the sandbox's mount
	// namespace, so connecting or opening finds nothing there.
	Hide []string
	// Private gives the command empty PrivateDirs of its own; Binds are
	// host paths it sees at the same path over them (and read-only where
	// they say so).
	Private bool   `json:",omitempty"`
	Binds   []Bind `json:",omitempty"`
}

// Credentials resolves who runs the command: spec "USER[:GROUP]" (names or
// numbers) if given, else the user who ran sudo (SUDO_UID, SUDO_GID), else
// root. The user's supplementary groups come along.
func Credentials(spec string) (uid, gid int, groups []int, err error) {
	name, group, hasGroup := strings.Cut(spec, ":")
	switch {
	case name != "":
		u, err := lookupUser(name)
		if err != nil {
			return 0, 0, nil, err
		}
		uid, _ = strconv.Atoi(u.Uid)
		gid, _ = strconv.Atoi(u.Gid)
		groups = groupIDs(u)
	case os.Getenv("SUDO_UID") != "":
		if uid, err = strconv.Atoi(os.Getenv("SUDO_UID")); err != nil {
			return 0, 0, nil, fmt.Errorf("SUDO_UID %q: not a user id", os.Getenv("SUDO_UID"))
		}
		if gid, err = strconv.Atoi(os.Getenv("SUDO_GID")); err != nil {
			return 0, 0, nil, fmt.Errorf("SUDO_GID %q: not a group id", os.Getenv("SUDO_GID"))
		}
		if u, err := user.LookupId(strconv.Itoa(uid)); err == nil {
			groups = groupIDs(u)
		}
	default:
		uid, gid = 0, 0
	}
	if hasGroup {
		g, err := user.LookupGroup(group)
		if err != nil {
			g, err = user.LookupGroupId(group)
		}
		if err != nil {
			return 0, 0, nil, fmt.Errorf("group %q: no such group", group)
		}
		gid, _ = strconv.Atoi(g.Gid)
		groups = nil
	}
	if len(groups) == 0 {
		groups = []int{gid}
	}
	return uid, gid, groups, nil
}

// NobodyID is the id of nobody and nogroup when the user database has
// neither.
const NobodyID = 65534

// CommandCredentials resolves who runs the command: spec "USER[:GROUP]"
// if given (root only so: --user root), else the user who ran sudo unless
// that is root, else nobody:nogroup. Root without capabilities still owns
// the host's /etc, so a command never runs as root by default.
func CommandCredentials(spec string) (uid, gid int, groups []int, err error) {
	if spec != "" {
		return Credentials(spec)
	}
	if s := os.Getenv("SUDO_UID"); s != "" && s != "0" {
		if uid, gid, groups, err = Credentials(""); err != nil || uid != 0 {
			return uid, gid, groups, err
		}
	}
	uid, gid = NobodyID, NobodyID
	if u, err := user.Lookup("nobody"); err == nil {
		uid, _ = strconv.Atoi(u.Uid)
		gid, _ = strconv.Atoi(u.Gid)
	}
	if g, err := user.LookupGroup("nogroup"); err == nil {
		gid, _ = strconv.Atoi(g.Gid)
	}
	return uid, gid, []int{gid}, nil
}

func lookupUser(name string) (*user.User, error) {
	if u, err := user.Lookup(name); err == nil {
		return u, nil
	}
	if u, err := user.LookupId(name); err == nil {
		return u, nil
	}
	if _, err := strconv.Atoi(name); err == nil {
		// A numeric id with no entry in the user database is fine.
		return &user.User{Uid: name, Gid: name}, nil
	}
	return nil, fmt.Errorf("user %q: no such user", name)
}

func groupIDs(u *user.User) []int {
	ids, err := u.GroupIds()
	if err != nil {
		return nil
	}
	out := make([]int, 0, len(ids))
	for _, s := range ids {
		if n, err := strconv.Atoi(s); err == nil {
			out = append(out, n)
		}
	}
	return out
}

// Process is the sandbox's init, PID 1 of the command's PID namespace.
// Killing it kills everything in the sandbox.
type Process struct {
	*exec.Cmd
}

// Start starts the init in namespace ns (or msbtap's own when ns is None:
// the VMM of VM mode), which starts the command. The init's exit status is
// the command's (128+N when signal N killed it).
func Start(ns netns.Handle, spec Spec) (*Process, error) {
	if len(spec.Argv) == 0 {
		return nil, errors.New("no command")
	}
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find msbtap's own binary: %w", err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer r.Close()
	cmd := exec.Command(self, InitArg)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.ExtraFiles = []*os.File{r} // fd 3: the spec
	cmd.Env = []string{}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWPID | syscall.CLONE_NEWNS,
		Setpgid:    true,
		Pdeathsig:  syscall.SIGKILL,
	}
	start := cmd.Start
	if ns.IsOpen() {
		// Forked from a thread inside the sandbox's namespace, the init
		// starts there.
		start = func() error { return netns.Do(ns, cmd.Start) }
	}
	if err := start(); err != nil {
		w.Close()
		return nil, fmt.Errorf("start %s: %w", spec.Argv[0], err)
	}
	err = json.NewEncoder(w).Encode(spec)
	w.Close()
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		return nil, fmt.Errorf("hand the command to the sandbox's init: %w", err)
	}
	return &Process{cmd}, nil
}
