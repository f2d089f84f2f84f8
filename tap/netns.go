package tap

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/plan"
)

// ResolveNetns turns a --netns value into a path: a bare name is looked up
// under /run/netns (as `ip netns` names them), anything with a slash is a path.
func ResolveNetns(s string) string {
	if strings.Contains(s, "/") {
		return s
	}
	return filepath.Join("/run/netns", s)
}

// OpenNetns opens the namespace at path, with an error that says what is wrong.
func OpenNetns(path string) (netns.NsHandle, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return netns.None(), fmt.Errorf("network namespace %s does not exist", path)
		}
		return netns.None(), fmt.Errorf("network namespace %s: %w", path, err)
	}
	h, err := netns.GetFromPath(path)
	if err != nil {
		return netns.None(), fmt.Errorf("open network namespace %s: %w", path, err)
	}
	if st.Type != unix.NSFS_MAGIC && st.Type != unix.PROC_SUPER_MAGIC {
		h.Close()
		return netns.None(), fmt.Errorf("%s is not a network namespace", path)
	}
	return h, nil
}

// NewNetns creates a fresh, unnamed network namespace and returns a handle
// that keeps it alive. The calling goroutine's thread is left untouched.
func NewNetns() (netns.NsHandle, error) {
	var h netns.NsHandle
	err := InNetns(netns.None(), func() error {
		var err error
		h, err = netns.New()
		if err != nil {
			return fmt.Errorf("create network namespace: %w", err)
		}
		return nil
	})
	return h, err
}

// InNetns runs fn on a dedicated OS thread that is in namespace ns (or, when
// ns is None, in a namespace fn itself switches to). The thread is returned to
// the agent's own namespace afterwards; if that fails, the thread is retired
// rather than reused in the wrong namespace.
func InNetns(ns netns.NsHandle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- fmt.Errorf("get own network namespace: %w", err)
			return // the thread dies with this goroutine while locked
		}
		defer orig.Close()
		if ns.IsOpen() {
			if err := netns.Set(ns); err != nil {
				errc <- fmt.Errorf("enter network namespace: %w", err)
				return
			}
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("return to own network namespace: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// CreateInNetns creates a TAP device named name inside namespace ns and
// returns it; the file descriptor stays with the agent, while the interface
// lives (and is the uplink) in ns, as slirp4netns and pasta do it. With
// offload, frames carry a virtio net header and TCP segmentation and
// checksum offload are on.
func CreateInNetns(ns netns.NsHandle, name string, offload bool) (*File, error) {
	if len(name) == 0 || len(name) >= unix.IFNAMSIZ {
		return nil, fmt.Errorf("tap name %q: must be 1 to %d characters", name, unix.IFNAMSIZ-1)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("netlink in target namespace: %w", err)
	}
	defer h.Close()
	if _, err := h.LinkByName(name); err == nil {
		return nil, fmt.Errorf("a network interface named %q already exists in the target namespace", name)
	}
	var (
		f       *os.File
		created string
	)
	err = InNetns(ns, func() error {
		var err error
		f, created, err = openTAP(name, offload)
		return err
	})
	if err != nil {
		return nil, tapError(name, err)
	}
	hl := 0
	if offload {
		hl = VNetHdrLen
	}
	return NewFile(f, created, hl), nil
}

func tapError(name string, err error) error {
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		return fmt.Errorf("create tap %s: %w (msbtap needs CAP_NET_ADMIN: run it as root)", name, err)
	}
	return fmt.Errorf("create tap %s: %w", name, err)
}

// ConfigureGuest sets up the namespace side of the TAP: MAC, MTU, link up,
// loopback up, the guest's IPv4 and IPv6 addresses, and default routes via
// the gateway.
func ConfigureGuest(ns netns.NsHandle, name string, p plan.Plan) error {
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("netlink in target namespace: %w", err)
	}
	defer h.Close()
	if lo, err := h.LinkByName("lo"); err == nil {
		if err := h.LinkSetUp(lo); err != nil {
			return fmt.Errorf("set lo up: %w", err)
		}
	}
	link, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find %s: %w", name, err)
	}
	if err := h.LinkSetHardwareAddr(link, p.GuestMAC); err != nil {
		return fmt.Errorf("set %s MAC %s: %w", name, p.GuestMAC, err)
	}
	if err := h.LinkSetMTU(link, p.MTU); err != nil {
		return fmt.Errorf("set %s MTU %d: %w", name, p.MTU, err)
	}
	// Turn off IPv6 DAD and router solicitation noise on this link: the
	// gateway owns the only other address, and the address must be usable at
	// once for programs started right after readiness.
	_ = InNetns(ns, func() error {
		for _, kv := range [][2]string{{"accept_dad", "0"}, {"dad_transmits", "0"}, {"accept_ra", "0"}} {
			_ = os.WriteFile(filepath.Join("/proc/sys/net/ipv6/conf", name, kv[0]), []byte(kv[1]), 0)
		}
		return nil
	})
	if err := h.LinkSetUp(link); err != nil {
		return fmt.Errorf("set %s up: %w", name, err)
	}
	v4 := &netlink.Addr{IPNet: prefixNet(p.GuestIPv4.Addr().AsSlice(), p.GuestIPv4.Bits())}
	if err := h.AddrAdd(link, v4); err != nil {
		return fmt.Errorf("add %s to %s: %w", p.GuestIPv4, name, err)
	}
	v6 := &netlink.Addr{IPNet: prefixNet(p.GuestIPv6.Addr().AsSlice(), p.GuestIPv6.Bits()), Flags: unix.IFA_F_NODAD}
	if err := h.AddrAdd(link, v6); err != nil {
		return fmt.Errorf("add %s to %s: %w", p.GuestIPv6, name, err)
	}
	for _, gw := range []net.IP{p.GatewayV4.AsSlice(), p.GatewayV6.AsSlice()} {
		r := &netlink.Route{LinkIndex: link.Attrs().Index, Gw: gw, MTU: 0}
		if err := h.RouteReplace(r); err != nil {
			return fmt.Errorf("add default route via %s on %s: %w", gw, name, err)
		}
	}
	return nil
}

func prefixNet(ip net.IP, bits int) *net.IPNet {
	return &net.IPNet{IP: ip, Mask: net.CIDRMask(bits, len(ip)*8)}
}

// SameNetns reports whether path still names the namespace ns (it may have
// been deleted, or replaced by another namespace of the same name).
func SameNetns(path string, ns netns.NsHandle) bool {
	var a, b unix.Stat_t
	if err := unix.Stat(path, &a); err != nil {
		return false
	}
	if err := unix.Fstat(int(ns), &b); err != nil {
		return false
	}
	return a.Dev == b.Dev && a.Ino == b.Ino
}
