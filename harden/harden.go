// Package harden takes away from the running agent what its data path does
// not need: every capability but a few it names, with no_new_privs, and a
// seccomp allow-list of the system calls the agent makes, on every thread.
package harden

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	seccomp "github.com/elastic/go-seccomp-bpf"
	"golang.org/x/sys/unix"
)

// Options say what the agent keeps.
type Options struct {
	// Keep are the capabilities (unix.CAP_*) the agent keeps: effective and
	// permitted; the bounding set keeps them too, the inheritable and
	// ambient sets are emptied.
	Keep []uintptr
	// Seccomp loads the allow-list: any other system call fails with
	// EPERM (the agent is not killed; the call is refused).
	Seccomp bool
}

// ErrCgo means the binary links cgo: Go can then not change capabilities
// on every thread of the process.
var ErrCgo = errors.New("this msbtap was built with cgo, so it cannot drop capabilities on every thread; build it with CGO_ENABLED=0 (make build does)")

// Apply drops capabilities, sets no_new_privs and, if asked, loads the
// seccomp filter, on every thread of the process. It cannot be undone.
func Apply(o Options) error {
	var keep uint64
	for _, c := range o.Keep {
		keep |= 1 << c
	}
	// The bounding set first (that needs CAP_SETPCAP, still held).
	for c := 0; c <= lastCap(); c++ {
		if keep&(1<<c) != 0 {
			continue
		}
		if err := allThreads(unix.SYS_PRCTL, unix.PR_CAPBSET_DROP, uintptr(c), 0); err != nil && err != unix.EINVAL {
			if err == unix.ENOTSUP {
				return ErrCgo
			}
			return fmt.Errorf("drop capability %d from the bounding set: %w", c, err)
		}
	}
	if err := allThreads(unix.SYS_PRCTL, unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0); err != nil {
		return fmt.Errorf("clear ambient capabilities: %w", err)
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	data := [2]unix.CapUserData{
		{Effective: uint32(keep), Permitted: uint32(keep)},
		{Effective: uint32(keep >> 32), Permitted: uint32(keep >> 32)},
	}
	if err := allThreads(unix.SYS_CAPSET, uintptr(unsafe.Pointer(&hdr)), uintptr(unsafe.Pointer(&data[0])), 0); err != nil {
		return fmt.Errorf("set capabilities: %w", err)
	}
	if !o.Seccomp {
		if err := allThreads(unix.SYS_PRCTL, unix.PR_SET_NO_NEW_PRIVS, 1, 0); err != nil {
			return fmt.Errorf("no_new_privs: %w", err)
		}
		return nil
	}
	// The filter reaches every thread (TSYNC), and so does no_new_privs.
	err := seccomp.LoadFilter(seccomp.Filter{
		NoNewPrivs: true,
		Flag:       seccomp.FilterFlagTSync,
		Policy: seccomp.Policy{
			DefaultAction: seccomp.ActionErrno,
			Syscalls:      []seccomp.SyscallGroup{{Action: seccomp.ActionAllow, Names: Allowed}},
		},
	})
	if err != nil {
		return fmt.Errorf("load the seccomp filter: %w", err)
	}
	return nil
}

func allThreads(trap, a1, a2, a3 uintptr) error {
	_, _, e := syscall.AllThreadsSyscall(trap, a1, a2, a3)
	if e != 0 {
		return e
	}
	return nil
}

func lastCap() int {
	if b, err := os.ReadFile("/proc/sys/kernel/cap_last_cap"); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			return n
		}
	}
	return unix.CAP_LAST_CAP
}

// Allowed is the seccomp allow-list: what the Go runtime, the relays, the
// netstack, netlink (route and address queries) and the agent's files and
// signals need once set-up is done. Mounting, namespaces (setns, unshare),
// ptrace, module and kernel calls, BPF, keyrings and running programs
// (execve: the sandbox's init and the --on-terminate runner are started
// before the filter) are not on it.
var Allowed = []string{
	// files and descriptors
	"read", "write", "readv", "writev", "pread64", "pwrite64", "close", "openat", "newfstatat", "fstat",
	"statx", "lseek", "fcntl", "ioctl", "dup", "dup3", "pipe2", "getdents64", "unlinkat", "renameat",
	"renameat2", "statfs", "fstatfs", "readlinkat", "faccessat", "faccessat2", "fsync", "fdatasync",
	"ftruncate", "fchmod", "getcwd",
	// memory
	"mmap", "munmap", "mprotect", "madvise", "brk", "mremap", "mincore", "membarrier",
	// signals, threads, processes
	"rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "tgkill", "tkill", "kill",
	"gettid", "getpid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid",
	"getgroups", "capget", "prctl", "arch_prctl", "futex", "nanosleep", "clock_nanosleep",
	"clock_gettime", "clock_getres", "gettimeofday", "sched_yield", "sched_getaffinity", "getrandom",
	"uname", "sysinfo", "getrlimit", "prlimit64", "rseq", "set_robust_list", "set_tid_address",
	"restart_syscall", "exit", "exit_group", "clone", "clone3", "wait4", "waitid", "pidfd_open",
	"setitimer", "getitimer", "timer_create", "timer_settime", "timer_gettime", "timer_delete", // the CPU profiler (--pprof)
	"pidfd_send_signal",
	// polling
	"epoll_create1", "epoll_ctl", "epoll_pwait", "epoll_pwait2", "epoll_wait", "eventfd2", "poll", "ppoll",
	"pselect6",
	// sockets
	"socket", "socketpair", "connect", "accept", "accept4", "bind", "listen", "getsockname",
	"getpeername", "setsockopt", "getsockopt", "sendto", "recvfrom", "sendmsg", "recvmsg",
	"sendmmsg", "recvmmsg", "shutdown",
}
