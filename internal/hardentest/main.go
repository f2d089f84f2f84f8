// Command hardentest applies harden as the agent does and reports what a
// process so hardened can still do; harden's tests run it (it must be
// built without cgo, as msbtap is).
package main

import (
	"encoding/json"
	"net"
	"os"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/harden"
)

func main() {
	res := map[string]string{}
	err := harden.Apply(harden.Options{Keep: []uintptr{unix.CAP_NET_RAW}, Seccomp: os.Getenv("SECCOMP") != "off"})
	if err != nil {
		res["apply"] = err.Error()
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
	if os.Getenv("SECCOMP") != "off" { // without the filter it would succeed and end the report
		res["execve"] = errStr(syscall.Exec("/bin/true", []string{"true"}, nil))
	}
	_, _, e := unix.RawSyscall(unix.SYS_PTRACE, unix.PTRACE_ATTACH, 1, 0)
	res["ptrace"] = errStr(errnoErr(e))
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
			case "NoNewPrivs", "Seccomp", "CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb":
				if ok {
					res[k] = strings.TrimSpace(v)
				}
			}
		}
	}
	json.NewEncoder(os.Stdout).Encode(res)
}

func errnoErr(e syscall.Errno) error {
	if e == 0 {
		return nil
	}
	return e
}
