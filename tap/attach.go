package tap

import (
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/netns"
	"github.com/msbtap/msbtap/plan"
)

// CreateInNetns creates a TAP device named name inside namespace ns and
// returns it; the file descriptor stays with the agent, while the interface
// lives (and is the uplink) in ns, as slirp4netns and pasta do it. With
// offload, frames carry a virtio net header and TCP segmentation and
// checksum offload are on.
func CreateInNetns(ns netns.Handle, name string, offload bool) (*File, error) {
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
	err = netns.Do(ns, func() error {
		var err error
		f, created, err = openTAP(name, offload)
		return err
	})
	if err != nil {
		return nil, tapError(name, err)
	}
	return NewFile(f, created, vnetLen(offload)), nil
}

func vnetLen(offload bool) int {
	if offload {
		return VNetHdrLen
	}
	return 0
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
func ConfigureGuest(ns netns.Handle, name string, p plan.Plan) error {
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
	for _, kv := range [][2]string{{"accept_dad", "0"}, {"dad_transmits", "0"}, {"accept_ra", "0"}} {
		_ = netns.SetSysctl(ns, "net/ipv6/conf/"+name+"/"+kv[0], kv[1])
	}
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
		r := &netlink.Route{LinkIndex: link.Attrs().Index, Gw: gw}
		if err := h.RouteReplace(r); err != nil {
			return fmt.Errorf("add default route via %s on %s: %w", gw, name, err)
		}
	}
	return nil
}

func prefixNet(ip net.IP, bits int) *net.IPNet {
	return &net.IPNet{IP: ip, Mask: net.CIDRMask(bits, len(ip)*8)}
}
