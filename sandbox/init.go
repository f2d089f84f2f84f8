package sandbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Init is the sandbox's PID 1: it reads the Spec from fd 3, mounts a
// private /proc (and /sys) in its new mount namespace, masks Spec.Hide,
// gives the command empty /run, /tmp, /var/tmp and /dev/shm with the
// spec's binds over them (Spec.Private), empties the
// capability bounding set and the ambient and inheritable sets, sets
// no_new_privs, starts the command as the spec's user, drops its own
// capabilities but CAP_KILL (to signal the command), forwards signals, and
// reaps until the command ends. It never returns.
//
// The bounding set keeps CAP_NET_RAW only (see keepBounding).
func Init() {
	code, err := initMain()
	if err != nil {
		fmt.Fprintf(os.Stderr, "msbtap: sandbox: %v\n", err)
		os.Exit(126)
	}
	os.Exit(code)
}

func initMain() (int, error) {
	// Capabilities, the bounding set and no_new_privs are per thread: set
	// them, and fork the command, on one thread.
	runtime.LockOSThread()
	var spec Spec
	f := os.NewFile(3, "spec")
	if err := json.NewDecoder(f).Decode(&spec); err != nil {
		return 0, fmt.Errorf("read the command: %w", err)
	}
	f.Close()
	// Our mounts stay in our namespace; the sandbox sees its own PIDs and
	// its own network in /proc and /sys.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_SLAVE, ""); err != nil {
		return 0, fmt.Errorf("make mounts private: %w", err)
	}
	if err := unix.Mount("proc", "/proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return 0, fmt.Errorf("mount /proc: %w", err)
	}
	_ = unix.Mount("sysfs", "/sys", "sysfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC|unix.MS_RDONLY, "")
	for _, p := range spec.Hide {
		if err := unix.Mount("/dev/null", p, "", unix.MS_BIND, ""); err != nil && !errors.Is(err, unix.ENOENT) {
			return 0, fmt.Errorf("hide %s from the sandbox: %w", p, err)
		}
	}
	if spec.Private {
		if err := privateMounts(spec); err != nil {
			return 0, err
		}
	} else if len(spec.Binds) > 0 {
		return 0, errors.New("binds without private directories")
	}
	// Nothing of the host's file system stays open here (a directory
	// under a private one would lead back to the host's).
	if err := os.Chdir("/"); err != nil {
		return 0, err
	}
	if spec.Dir == "" {
		spec.Dir = "/"
	}
	if _, err := os.Stat(spec.Dir); err != nil {
		return 126, fmt.Errorf("working directory %s: not in the sandbox (%v); start msbtap elsewhere, or share it with --bind", spec.Dir, err)
	}

	if err := dropBounding(keepBounding); err != nil {
		return 0, err
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return 0, fmt.Errorf("no_new_privs: %w", err)
	}
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil {
		return 0, fmt.Errorf("clear ambient capabilities: %w", err)
	}
	// Keep what starting the command as its user needs, and CAP_KILL.
	if err := setCaps(1<<unix.CAP_SETUID|1<<unix.CAP_SETGID|1<<unix.CAP_KILL, 0); err != nil {
		return 0, err
	}

	path, err := lookPath(spec.Argv[0], spec.Env)
	if err != nil {
		return 127, err
	}
	groups := make([]uint32, len(spec.Groups))
	for i, g := range spec.Groups {
		groups[i] = uint32(g)
	}
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs)
	pid, err := syscall.ForkExec(path, spec.Argv, &syscall.ProcAttr{
		Dir:   spec.Dir,
		Env:   spec.Env,
		Files: []uintptr{0, 1, 2},
		Sys: &syscall.SysProcAttr{
			Credential: &syscall.Credential{Uid: uint32(spec.UID), Gid: uint32(spec.GID), Groups: groups},
			Setpgid:    true,
		},
	})
	if err != nil {
		hint := ""
		if errors.Is(err, unix.EACCES) {
			hint = fmt.Sprintf(" (the working directory and the program must be open to uid %d: see --user)", spec.UID)
		}
		return 126, fmt.Errorf("start %s as uid %d in %s: %w%s", spec.Argv[0], spec.UID, spec.Dir, err, hint)
	}
	// The init needs nothing more but the right to signal the command.
	if err := setCaps(1<<unix.CAP_KILL, 0); err != nil {
		unix.Kill(-pid, unix.SIGKILL)
		return 0, err
	}
	for sig := range sigs {
		s := sig.(syscall.Signal)
		if s != syscall.SIGCHLD {
			if s != syscall.SIGURG && s != syscall.SIGPIPE { // the Go runtime's own
				_ = unix.Kill(-pid, s)
			}
			continue
		}
		for {
			var ws unix.WaitStatus
			got, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
			if err != nil || got <= 0 {
				break
			}
			if got != pid {
				continue // an orphan the init inherited
			}
			if ws.Signaled() {
				return 128 + int(ws.Signal()), nil
			}
			return ws.ExitStatus(), nil
		}
	}
	return 0, nil
}

// keepBounding stays in the command's bounding set: ping carries
// cap_net_raw as a file capability, and the kernel refuses to execute a
// file whose capabilities the bounding set would cut. It is never granted:
// with no_new_privs, file capabilities give nothing, and ping falls back to
// the ICMP datagram sockets the sandbox's ping_group_range allows.
const keepBounding = 1 << unix.CAP_NET_RAW

// dropBounding empties the capability bounding set, but for keep.
func dropBounding(keep uint64) error {
	last := unix.CAP_LAST_CAP
	if b, err := os.ReadFile("/proc/sys/kernel/cap_last_cap"); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			last = n
		}
	}
	for c := 0; c <= last; c++ {
		if keep&(1<<c) != 0 {
			continue
		}
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil && err != unix.EINVAL {
			return fmt.Errorf("drop capability %d from the bounding set: %w", c, err)
		}
	}
	return nil
}

// setCaps sets the calling thread's effective and permitted sets to keep
// and its inheritable set to inh (capabilities 0..63).
func setCaps(keep, inh uint64) error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	data := [2]unix.CapUserData{
		{Effective: uint32(keep), Permitted: uint32(keep), Inheritable: uint32(inh)},
		{Effective: uint32(keep >> 32), Permitted: uint32(keep >> 32), Inheritable: uint32(inh >> 32)},
	}
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return fmt.Errorf("set capabilities: %w", err)
	}
	return nil
}

// lookPath finds argv0 along the command's own PATH.
func lookPath(argv0 string, env []string) (string, error) {
	if strings.Contains(argv0, "/") {
		return argv0, nil
	}
	path := "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	for _, kv := range env {
		if p, ok := strings.CutPrefix(kv, "PATH="); ok {
			path = p
		}
	}
	for _, dir := range strings.Split(path, ":") {
		if dir == "" {
			dir = "."
		}
		p := dir + "/" + argv0
		if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: command not found", argv0)
}
