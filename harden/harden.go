// Package harden takes away from the running agent what its data path does
// not need: root itself (it becomes an unprivileged uid and gid, with no
// supplementary groups), every capability but a few it names, with
// no_new_privs, and a seccomp allow-list of the system calls the agent
// makes, some filtered by argument, on every thread.
package harden

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"github.com/elastic/go-seccomp-bpf/arch"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
	"kernel.org/pub/linux/libs/security/libcap/psx"
)

// Options say what the process becomes and keeps.
type Options struct {
	// Keep are the capabilities (unix.CAP_*) kept, effective and
	// permitted; the inheritable and ambient sets are emptied.
	Keep []uintptr
	// UID and GID (> 0 both) are the unprivileged user and group the
	// process runs as from then on (real, effective and saved; the
	// supplementary groups are cleared). The capabilities in Keep survive
	// the change. 0 leaves the process root: it then also empties its
	// bounding set but for Keep, unless Seccomp (see Apply).
	UID, GID int
	// Seccomp loads the allow-list: any other system call fails with
	// EPERM (the process is not killed; the call is refused).
	Seccomp bool
	// Signal are the processes (negative: process groups) kill(2) may
	// target besides the process itself, when Seccomp is on.
	Signal []int
	// Files leaves on the list what creating, renaming and removing files
	// takes (open with O_CREAT, rename, unlink, fchmod); without it the
	// process can only open existing files. The agent leaves its file
	// work to a keeper process, which sets it.
	Files bool
}

// ErrCgo means the binary links cgo without a way to change credentials on
// every thread of the process (psx links in, so it should not happen).
var ErrCgo = errors.New("this msbtap was built with cgo and cannot change credentials on every thread; build it with CGO_ENABLED=0 (make build does)")

// Apply changes the credentials and, if asked, loads the seccomp filter, on
// every thread of the process. It cannot be undone.
//
// A parent-death signal set at the start (a supervisor's) survives the
// change of user, which the kernel would clear.
//
// It costs a handful of all-thread system calls, whatever the number of
// capabilities. The bounding set is emptied only for a process that stays
// root without the seccomp list (one all-thread call per capability): the
// kernel reads it only at execve, which the list refuses, and for a
// process that is not root, has no inheritable or ambient capabilities
// and has no_new_privs, no program it runs gets more than the permitted
// set anyway (under no_new_privs an exec is capped at it). Dropping 40
// capabilities one stop-the-world at a time would buy nothing there.
func Apply(o Options) error {
	var keep uint64
	for _, c := range o.Keep {
		keep |= 1 << c
	}
	if (o.UID > 0) != (o.GID > 0) {
		return fmt.Errorf("give both an unprivileged uid and gid (uid %d, gid %d)", o.UID, o.GID)
	}
	if o.UID == 0 && !o.Seccomp {
		// Still root, and free to run programs: the bounding set is what
		// stops one from getting every capability back. (Under the
		// seccomp list execve fails, and the bounding set, which only
		// execve reads, cannot matter.)
		for c := 0; c <= lastCap(); c++ {
			if keep&(1<<c) != 0 {
				continue
			}
			if err := allThreads(unix.SYS_PRCTL, unix.PR_CAPBSET_DROP, uintptr(c), 0); err != nil && err != unix.EINVAL {
				return fmt.Errorf("drop capability %d from the bounding set: %w", c, err)
			}
		}
	} else {
		// Keep the permitted set across the change of uid (the effective
		// set is emptied by it and restored by capset below).
		if err := allThreads(unix.SYS_PRCTL, unix.PR_SET_KEEPCAPS, 1, 0); err != nil {
			return fmt.Errorf("keep capabilities across the change of user: %w", err)
		}
		if err := setIDs(o.UID, o.GID); err != nil {
			return err
		}
		if err := restoreParentDeathSignal(); err != nil {
			return err
		}
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	data := [2]unix.CapUserData{
		{Effective: uint32(keep), Permitted: uint32(keep)},
		{Effective: uint32(keep >> 32), Permitted: uint32(keep >> 32)},
	}
	// An empty inheritable set empties the ambient one too.
	if err := allThreads(unix.SYS_CAPSET, uintptr(unsafe.Pointer(&hdr)), uintptr(unsafe.Pointer(&data[0])), 0); err != nil {
		return fmt.Errorf("set capabilities: %w", err)
	}
	if !o.Seccomp {
		if err := allThreads(unix.SYS_PRCTL, unix.PR_SET_NO_NEW_PRIVS, 1, 0); err != nil {
			return fmt.Errorf("no_new_privs: %w", err)
		}
		return nil
	}
	// The filter reaches every thread (TSYNC), and so does no_new_privs
	// (set on this thread, copied to the others by TSYNC).
	if err := loadFilter(o); err != nil {
		return fmt.Errorf("load the seccomp filter: %w", err)
	}
	return nil
}

// setIDs clears the supplementary groups and sets the gid, then the uid,
// on every thread (Go's syscall package does each on all threads: through
// AllThreadsSyscall without cgo, the C library's broadcast with it).
func setIDs(uid, gid int) error {
	if err := syscall.Setgroups(nil); err != nil {
		return fmt.Errorf("clear the supplementary groups: %w", err)
	}
	if err := syscall.Setresgid(gid, gid, gid); err != nil {
		return fmt.Errorf("set gid %d: %w", gid, err)
	}
	if err := syscall.Setresuid(uid, uid, uid); err != nil {
		return fmt.Errorf("set uid %d: %w", uid, err)
	}
	return nil
}

// The parent-death signal the process was started with (a supervisor's
// Pdeathsig) and its parent then, read on the main thread (package
// variables are initialised there, before main), which is the thread that
// holds it.
var startPdeathsig, startPPID = parentDeathSignal(), os.Getppid()

func parentDeathSignal() int {
	var sig int32
	unix.Prctl(unix.PR_GET_PDEATHSIG, uintptr(unsafe.Pointer(&sig)), 0, 0, 0)
	return int(sig)
}

// restoreParentDeathSignal sets the start's parent-death signal again: the
// kernel clears it when a thread's credentials change, and a supervisor
// that dies would otherwise leave its agent running. If the parent died
// meanwhile, the signal is raised now.
func restoreParentDeathSignal() error {
	if startPdeathsig == 0 {
		return nil
	}
	if err := allThreads(unix.SYS_PRCTL, unix.PR_SET_PDEATHSIG, uintptr(startPdeathsig), 0); err != nil {
		return fmt.Errorf("parent-death signal: %w", err)
	}
	if os.Getppid() != startPPID {
		syscall.Kill(os.Getpid(), syscall.Signal(startPdeathsig))
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

// allowed is the seccomp allow-list of calls taken whatever their
// arguments: what the Go runtime, the relays, the netstack, netlink (route
// and address queries) and the agent's open files need once set-up is
// done. Mounting, namespaces (setns, unshare, clone with CLONE_NEW*; clone3
// answers ENOSYS), ptrace, module and kernel
// calls, BPF, keyrings, running programs (execve: the sandbox's init and
// the --on-terminate runner are started before the filter), the setuid
// and capset families, chmod, chown, mknod and links are not on it;
// socket, openat, prctl, kill and tgkill are allowed by argument (see
// rules), and file creation, renames and removals only with
// Options.Files (fileCalls).
var allowed = []string{
	// files and descriptors
	"read", "write", "readv", "writev", "pread64", "pwrite64", "close", "newfstatat", "fstat",
	"statx", "lseek", "fcntl", "ioctl", "dup", "dup3", "pipe2", "getdents64",
	"statfs", "fstatfs", "readlinkat", "faccessat", "faccessat2", "fsync", "fdatasync",
	"ftruncate", "getcwd",
	// memory
	"mmap", "munmap", "mprotect", "madvise", "brk", "mremap", "mincore", "membarrier",
	// signals, threads, processes
	"rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack",
	"gettid", "getpid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid",
	"getgroups", "capget", "arch_prctl", "futex", "nanosleep", "clock_nanosleep",
	"clock_gettime", "clock_getres", "gettimeofday", "sched_yield", "sched_getaffinity", "getrandom",
	"uname", "sysinfo", "getrlimit", "prlimit64", "rseq", "set_robust_list", "set_tid_address",
	"restart_syscall", "exit", "exit_group", "wait4", "waitid",
	"setitimer", "getitimer", "timer_create", "timer_settime", "timer_gettime", "timer_delete", // the CPU profiler (--pprof)
	// polling
	"epoll_create1", "epoll_ctl", "epoll_pwait", "epoll_pwait2", "epoll_wait", "eventfd2", "poll", "ppoll",
	"pselect6",
	// sockets (socket itself by argument)
	"socketpair", "connect", "accept", "accept4", "bind", "listen", "getsockname",
	"getpeername", "setsockopt", "getsockopt", "sendto", "recvfrom", "sendmsg", "recvmsg",
	"sendmmsg", "recvmmsg", "shutdown",
}

// fileCalls are the calls Options.Files adds: open with O_CREAT (openat is
// then unfiltered), renames, removals and fchmod.
var fileCalls = []string{"unlinkat", "renameat", "renameat2", "fchmod"}

// prctls are the prctl options allowed: reading the process's own state
// and naming a thread. PR_SET_DUMPABLE (which would make the process's
// memory readable and ptrace-able by its uid again), PR_SET_PTRACER,
// PR_SET_MM, PR_SET_SECUREBITS, PR_SET_KEEPCAPS, PR_CAP_AMBIENT and every
// other setter fail.
var prctls = []uint64{unix.PR_GET_DUMPABLE, unix.PR_GET_KEEPCAPS, unix.PR_GET_NO_NEW_PRIVS,
	unix.PR_GET_SECCOMP, unix.PR_GET_SECUREBITS, unix.PR_CAPBSET_READ, unix.PR_GET_NAME, unix.PR_SET_NAME,
	unix.PR_GET_TIMERSLACK, unix.PR_GET_PDEATHSIG}

// A rule allows one system call when every condition holds (none: always).
type rule struct {
	name  string
	conds []cond
}

// cond tests the low 32 bits of argument arg: equal to val, or (mask) none
// of val's bits set. Every argument filtered here is a C int, of which
// the kernel reads only those bits.
type cond struct {
	arg  int
	val  uint32
	mask bool
}

// rules are the filter's rules for o.
func rules(o Options) []rule {
	var rs []rule
	add := func(name string, cs ...cond) { rs = append(rs, rule{name, cs}) }
	eq := func(arg int, v uint64) cond { return cond{arg: arg, val: uint32(v)} }
	for _, op := range prctls {
		add("prctl", eq(0, op))
	}
	// Sockets: TCP and UDP over IPv4 and IPv6, ICMP echo (datagram or
	// raw), route netlink. Not packet sockets, raw sockets of any other
	// protocol (forged TCP or UDP from the host), other netlink families
	// or Unix sockets (the host's services).
	// The protocol is checked too: a stream or datagram socket of another
	// one (SCTP, MPTCP, L2TP, UDP-Lite) loads kernel modules the agent has
	// no use for.
	for _, flags := range []uint64{0, unix.SOCK_NONBLOCK, unix.SOCK_CLOEXEC, unix.SOCK_NONBLOCK | unix.SOCK_CLOEXEC} {
		for _, dom := range []uint64{unix.AF_INET, unix.AF_INET6} {
			for _, proto := range []uint64{0, unix.IPPROTO_TCP} {
				add("socket", eq(0, dom), eq(1, unix.SOCK_STREAM|flags), eq(2, proto))
			}
			for _, proto := range []uint64{0, unix.IPPROTO_UDP} {
				add("socket", eq(0, dom), eq(1, unix.SOCK_DGRAM|flags), eq(2, proto))
			}
		}
		// ICMP echo through datagram ("ping") sockets.
		add("socket", eq(0, unix.AF_INET), eq(1, unix.SOCK_DGRAM|flags), eq(2, unix.IPPROTO_ICMP))
		add("socket", eq(0, unix.AF_INET6), eq(1, unix.SOCK_DGRAM|flags), eq(2, unix.IPPROTO_ICMPV6))
		add("socket", eq(0, unix.AF_INET), eq(1, unix.SOCK_RAW|flags), eq(2, unix.IPPROTO_ICMP))
		add("socket", eq(0, unix.AF_INET6), eq(1, unix.SOCK_RAW|flags), eq(2, unix.IPPROTO_ICMPV6))
		add("socket", eq(0, unix.AF_NETLINK), eq(1, unix.SOCK_RAW|flags), eq(2, unix.NETLINK_ROUTE))
		add("socket", eq(0, unix.AF_NETLINK), eq(1, unix.SOCK_DGRAM|flags), eq(2, unix.NETLINK_ROUTE))
	}
	// Threads (and children) but no new namespaces: clone without any
	// CLONE_NEW* flag. clone3 keeps its flags in memory a filter cannot
	// read, so it is refused: Go's runtime makes its threads with clone.
	add("clone", cond{arg: 0, val: unix.CLONE_NEWNS | unix.CLONE_NEWCGROUP | unix.CLONE_NEWUTS | unix.CLONE_NEWIPC |
		unix.CLONE_NEWUSER | unix.CLONE_NEWPID | unix.CLONE_NEWNET, mask: true})
	// Signals: the process's own threads, itself, and the targets named.
	self := uint64(os.Getpid())
	add("tgkill", eq(0, self))
	add("kill", eq(0, self))
	for _, p := range o.Signal {
		add("kill", eq(0, uint64(int64(p))))
	}
	if o.Files {
		for _, n := range append([]string{"openat"}, fileCalls...) {
			add(n)
		}
	} else {
		add("openat", cond{arg: 2, val: unix.O_CREAT | unix.O_TMPFILE&^unix.O_DIRECTORY, mask: true})
	}
	for _, n := range allowed {
		add(n)
	}
	return rs
}

// Offsets in struct seccomp_data.
const (
	offNr   = 0
	offArch = 4
	offArgs = 16
)

// program assembles the filter: the architecture checked, then each rule
// as a block of its own that loads the call's number, compares, tests its
// conditions and allows, or falls through to the next block; the default
// refuses with EPERM. No jump leaves its block, so none is long (BPF's
// conditional jumps reach 255 instructions), and the kernel's per-call
// cache still skips the program for calls allowed whatever their
// arguments.
func program(o Options) ([]bpf.Instruction, error) {
	auditArch, ok := auditArches[runtime.GOARCH]
	if !ok {
		return nil, fmt.Errorf("no seccomp support for %s", runtime.GOARCH)
	}
	info, err := arch.GetInfo("")
	if err != nil {
		return nil, err
	}
	errno := bpf.RetConstant{Val: unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM)}
	allow := bpf.RetConstant{Val: unix.SECCOMP_RET_ALLOW}
	prog := []bpf.Instruction{
		bpf.LoadAbsolute{Off: offArch, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: auditArch, SkipTrue: 1},
		errno,
	}
	if runtime.GOARCH == "amd64" { // the x32 ABI's calls are numbered from bit 30
		prog = append(prog, bpf.LoadAbsolute{Off: offNr, Size: 4},
			bpf.JumpIf{Cond: bpf.JumpGreaterOrEqual, Val: 1 << 30, SkipFalse: 1}, errno)
	}
	// clone3 answers ENOSYS, not EPERM: glibc's pthread_create (a cgo
	// build's threads) and Go's fork then fall back to clone, whose flags
	// the rules can read.
	if nr, ok := info.SyscallNames["clone3"]; ok {
		prog = append(prog, bpf.LoadAbsolute{Off: offNr, Size: 4},
			bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: uint32(nr), SkipTrue: 1},
			bpf.RetConstant{Val: unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS)})
	}
	// ioctl is allowed but for the two that type into a terminal
	// (TIOCSTI) or paste on a console (TIOCLINUX): the agent may still have
	// the terminal of the shell that started it (root's) as its own.
	if nr, ok := info.SyscallNames["ioctl"]; ok {
		for _, req := range []uint32{unix.TIOCSTI, unix.TIOCLINUX} {
			prog = append(prog, bpf.LoadAbsolute{Off: offNr, Size: 4},
				bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: uint32(nr), SkipTrue: 3},
				bpf.LoadAbsolute{Off: offArgs + 8, Size: 4},
				bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: req, SkipTrue: 1},
				errno)
		}
	}
	for _, r := range rules(o) {
		nr, ok := info.SyscallNames[r.name]
		if !ok {
			return nil, fmt.Errorf("no system call %q on %s", r.name, runtime.GOARCH)
		}
		block := []bpf.Instruction{bpf.LoadAbsolute{Off: offNr, Size: 4}, nil}
		var tests []bpf.Instruction
		for _, c := range r.conds {
			tests = append(tests, bpf.LoadAbsolute{Off: uint32(offArgs + 8*c.arg), Size: 4}) // the low half (little endian)
			if c.mask {
				tests = append(tests, bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: c.val})
			} else {
				tests = append(tests, bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: c.val})
			}
		}
		tests = append(tests, allow)
		// Every failed test jumps past the allow, to the next block.
		for i, in := range tests {
			if j, ok := in.(bpf.JumpIf); ok {
				j.SkipTrue = uint8(len(tests) - 1 - i)
				tests[i] = j
			}
		}
		block[1] = bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: uint32(nr), SkipTrue: uint8(len(tests))}
		prog = append(append(prog, block...), tests...)
	}
	return append(prog, errno), nil
}

var auditArches = map[string]uint32{"amd64": unix.AUDIT_ARCH_X86_64, "arm64": unix.AUDIT_ARCH_AARCH64}

// loadFilter sets no_new_privs and loads the filter on this thread, and
// through TSYNC on every other (which copies no_new_privs too).
func loadFilter(o Options) error {
	ins, err := program(o)
	if err != nil {
		return err
	}
	raw, err := bpf.Assemble(ins)
	if err != nil {
		return err
	}
	filter := make([]unix.SockFilter, len(raw))
	for i, r := range raw {
		filter[i] = unix.SockFilter{Code: r.Op, Jt: r.Jt, Jf: r.Jf, K: r.K}
	}
	fprog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	r, _, e := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_TSYNC, uintptr(unsafe.Pointer(&fprog)))
	runtime.KeepAlive(filter)
	if e != 0 {
		return e
	}
	if r != 0 {
		return fmt.Errorf("thread %d could not take the filter", r)
	}
	return nil
}

// allThreads makes a system call on every thread: psx does it through Go's
// AllThreadsSyscall in a binary without cgo, and through libpsx's signal
// handshake with every pthread in a cgo build (go install on a machine
// with a C compiler), where AllThreadsSyscall refuses.
func allThreads(trap, a1, a2, a3 uintptr) error {
	_, _, e := psx.Syscall3(trap, a1, a2, a3)
	switch e {
	case 0:
		return nil
	case unix.ENOTSUP:
		return ErrCgo
	}
	return e
}
