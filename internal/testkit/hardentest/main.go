// Command hardentest applies harden as the agent does (an unprivileged uid
// and gid, CAP_NET_RAW kept, the seccomp list) and reports what a process
// so hardened can still do; harden's tests run it, built as msbtap is.
//
// Environment: SECCOMP=off leaves the filter out; HARDEN_UID and HARDEN_GID (default
// 0: stay root) are the user it becomes; TMP is a directory of the test's
// for the file probes.
package main

import (
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/harden"
)

func main() {
	res := map[string]string{}
	uid, _ := strconv.Atoi(os.Getenv("HARDEN_UID"))
	gid, _ := strconv.Atoi(os.Getenv("HARDEN_GID"))
	seccompOn := os.Getenv("SECCOMP") != "off"
	tmp := os.Getenv("TMP")
	// Threads of its own, as the agent has (netstack, relays, pump).
	for range 4 {
		go func() {
			runtime.LockOSThread()
			select {}
		}()
	}
	// Opened before, as the agent opens its log: still writable after.
	before, berr := os.OpenFile(filepath.Join(tmp, "before"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	err := harden.Apply(harden.Options{Keep: []uintptr{unix.CAP_NET_RAW}, UID: uid, GID: gid, Seccomp: seccompOn})
	if err != nil { // report it and try nothing as root
		res["apply"] = err.Error()
		json.NewEncoder(os.Stdout).Encode(res)
		return
	}
	errStr := func(err error) string {
		if err == nil {
			return "ok"
		}
		return err.Error()
	}
	res["unshare"] = errStr(unix.Unshare(unix.CLONE_NEWNS))
	res["setns"] = errStr(unix.Setns(0, unix.CLONE_NEWNET))
	res["mount"] = errStr(unix.Mount("none", "/mnt", "tmpfs", 0, ""))
	if seccompOn { // without the filter it would succeed and end the report
		res["execve"] = errStr(syscall.Exec("/bin/true", []string{"true"}, nil))
	} else {
		// What a program it runs gets: nothing, whatever the bounding set.
		out, err := exec.Command("/bin/cat", "/proc/self/status").Output()
		res["exec"] = errStr(err)
		for _, l := range strings.Split(string(out), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && (k == "CapEff" || k == "CapPrm" || k == "Uid") {
				res["child"+k] = strings.TrimSpace(v)
			}
		}
	}
	_, _, e := unix.RawSyscall(unix.SYS_PTRACE, unix.PTRACE_ATTACH, 1, 0)
	res["ptrace"] = errStr(errnoErr(e))

	// What a hijacked agent would try on the host.
	if f, err := os.OpenFile("/etc/shadow", os.O_WRONLY, 0); err == nil {
		f.Close()
		res["shadow"] = "ok"
	} else {
		res["shadow"] = err.Error()
	}
	etc := filepath.Join("/etc", "msbtap-hardentest-"+strconv.Itoa(os.Getpid()))
	if f, err := os.OpenFile(etc, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644); err == nil {
		f.Close()
		os.Remove(etc)
		res["create_etc"] = "ok"
	} else {
		res["create_etc"] = err.Error()
	}
	if f, err := os.OpenFile(filepath.Join(tmp, "new"), os.O_WRONLY|os.O_CREATE, 0o600); err == nil {
		f.Close()
		res["create_tmp"] = "ok"
	} else {
		res["create_tmp"] = err.Error()
	}
	res["chmod"] = errStr(os.Chmod("/etc/passwd", 0o666))
	res["kill1"] = errStr(unix.Kill(1, 0))
	res["setuid0"] = errStr(unix.Setresuid(0, 0, 0))
	_, _, e = unix.RawSyscall(unix.SYS_PRCTL, unix.PR_SET_DUMPABLE, 1, 0)
	res["dumpable"] = errStr(errnoErr(e))
	d, _, _ := unix.RawSyscall(unix.SYS_PRCTL, unix.PR_GET_DUMPABLE, 0, 0)
	res["getdumpable"] = strconv.Itoa(int(d))
	res["packet"] = errStr(socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(unix.ETH_P_ALL))))
	res["rawtcp"] = errStr(socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_TCP))
	res["unix"] = errStr(socket(unix.AF_UNIX, unix.SOCK_STREAM, 0))
	res["netfilter"] = errStr(socket(unix.AF_NETLINK, unix.SOCK_RAW, unix.NETLINK_NETFILTER))
	res["icmp"] = errStr(socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_ICMP))
	res["icmp6"] = errStr(socket(unix.AF_INET6, unix.SOCK_RAW, unix.IPPROTO_ICMPV6))
	res["route"] = errStr(socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE))
	if berr == nil {
		_, err := before.WriteString("after\n")
		res["write_before"] = errStr(err)
	} else {
		res["write_before"] = berr.Error()
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err == nil {
		c, derr := net.Dial("tcp", ln.Addr().String())
		if derr == nil {
			c.Close()
		}
		err = derr
		ln.Close()
	}
	res["tcp"] = errStr(err)
	if b, err := os.ReadFile("/proc/self/status"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			k, v, ok := strings.Cut(l, ":")
			switch k {
			case "NoNewPrivs", "Seccomp", "CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb", "Uid", "Gid", "Groups":
				if ok {
					res[k] = strings.Join(strings.Fields(v), " ")
				}
			}
		}
	}
	res["threads"] = threads()
	var sig int32
	unix.Prctl(unix.PR_GET_PDEATHSIG, uintptr(unsafe.Pointer(&sig)), 0, 0, 0)
	res["pdeathsig"] = strconv.Itoa(int(sig))
	json.NewEncoder(os.Stdout).Encode(res)
}

// threads checks that every thread has what the first has (credentials,
// capabilities, no_new_privs, seccomp): "N alike", or the first that
// differs.
func threads() string {
	dirs, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return err.Error()
	}
	var first string
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join("/proc/self/task", d.Name(), "status"))
		if err != nil {
			return err.Error()
		}
		var keep []string
		for _, l := range strings.Split(string(b), "\n") {
			switch k, _, _ := strings.Cut(l, ":"); k {
			case "Uid", "Gid", "Groups", "CapEff", "CapPrm", "CapInh", "CapAmb", "NoNewPrivs", "Seccomp":
				keep = append(keep, strings.Join(strings.Fields(l), " "))
			}
		}
		this := strings.Join(keep, "; ")
		if first == "" {
			first = this
		} else if this != first {
			return "thread " + d.Name() + " differs: " + this + " vs " + first
		}
	}
	return strconv.Itoa(len(dirs)) + " alike"
}

func socket(domain, typ, proto int) error {
	fd, err := unix.Socket(domain, typ, proto)
	if err == nil {
		unix.Close(fd)
	}
	return err
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func errnoErr(e syscall.Errno) error {
	if e == 0 {
		return nil
	}
	return e
}
