package tap

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/songgao/water"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/internal/fielderr"
)

// VMTap is the TAP a VMM opens by name, joined to a TAP the agent holds by
// tc mirred redirects in both directions (the Kata Containers tcfilter
// model): every frame the VM sends is stolen at the VM TAP's ingress and
// handed to the agent TAP's egress (which the agent reads), and every frame
// the agent writes is stolen at its TAP's ingress and handed to the VM TAP's
// egress (which the VMM reads). Neither device has an address and IPv6 is
// off on both, so the host's IP stack never sees a guest frame.
type VMTap struct {
	// Name is the VM's TAP; AgentName the agent's.
	Name, AgentName string
	// Agent is the agent's end, read and written by the pump.
	Agent *File

	createdVM bool // only what we created is removed
}

// AgentTapName derives the agent-side TAP's name from the VM TAP's.
func AgentTapName(name string) string {
	if len(name) > 11 {
		name = name[:11]
	}
	return name + "-msb"
}

// CreateVMTap creates the VM's persistent TAP (owned by owner, or root when
// owner < 0) and the agent's TAP, sets both up at mtu and joins them. On
// failure nothing is left behind; Close removes both.
func CreateVMTap(name string, owner, mtu int, offload bool) (t *VMTap, err error) {
	if len(name) == 0 || len(name) >= unix.IFNAMSIZ {
		return nil, fielderr.Bad("tap", name, "must be 1 to %d characters", unix.IFNAMSIZ-1)
	}
	agentName := AgentTapName(name)
	for _, n := range []string{name, agentName} {
		if _, err := netlink.LinkByName(n); err == nil {
			return nil, fmt.Errorf("a network interface named %q already exists", n)
		}
	}
	t = &VMTap{Name: name, AgentName: agentName}
	defer func() {
		if err != nil {
			t.Close()
		}
	}()

	// The VM's TAP: persistent, so that it outlives our descriptor and the
	// VMM can attach to it by name.
	vm, err := water.New(water.Config{DeviceType: water.TAP, PlatformSpecificParams: water.PlatformSpecificParams{Name: name, Persist: true}})
	if err != nil {
		return t, tapError(name, err)
	}
	t.createdVM = true
	if owner >= 0 {
		f := vm.ReadWriteCloser.(*os.File)
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.TUNSETOWNER, uintptr(owner)); e != 0 {
			vm.Close()
			return t, fielderr.Bad("tap_owner", owner, "%w", e)
		}
	}
	vm.Close()

	ag, _, err := openTAP(agentName, offload)
	if err != nil {
		return t, tapError(agentName, err)
	}
	t.Agent = NewFile(ag, agentName, vnetLen(offload))

	links := make([]netlink.Link, 2)
	for i, n := range []string{name, agentName} {
		// No IPv6 (no link-local address, no router solicitations from the
		// host) on either device.
		_ = os.WriteFile(filepath.Join("/proc/sys/net/ipv6/conf", n, "disable_ipv6"), []byte("1"), 0)
		l, err := netlink.LinkByName(n)
		if err != nil {
			return t, fmt.Errorf("find %s: %w", n, err)
		}
		if err := netlink.LinkSetMTU(l, mtu); err != nil {
			return t, fmt.Errorf("set %s MTU %d: %w", n, mtu, err)
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return t, fmt.Errorf("set %s up: %w", n, err)
		}
		links[i] = l
	}
	for i, from := range links {
		to := links[1-i]
		q := &netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: from.Attrs().Index,
			Handle:    netlink.MakeHandle(0xffff, 0),
			Parent:    netlink.HANDLE_INGRESS,
		}}
		if err := netlink.QdiscAdd(q); err != nil {
			return t, fmt.Errorf("add ingress qdisc on %s: %w", from.Attrs().Name, err)
		}
		f := &netlink.U32{
			FilterAttrs: netlink.FilterAttrs{
				LinkIndex: from.Attrs().Index,
				Parent:    netlink.MakeHandle(0xffff, 0),
				Priority:  1,
				Protocol:  unix.ETH_P_ALL,
			},
			Actions: []netlink.Action{netlink.NewMirredAction(to.Attrs().Index)},
		}
		if err := netlink.FilterAdd(f); err != nil {
			return t, fmt.Errorf("add mirred redirect %s → %s: %w", from.Attrs().Name, to.Attrs().Name, err)
		}
	}
	return t, nil
}

// Created are the devices msbtap created (the VM's TAP unless it existed
// before, and the agent's), which Close removes.
func (t *VMTap) Created() []string {
	var names []string
	if t.createdVM {
		names = append(names, t.Name)
	}
	if t.Agent != nil {
		names = append(names, t.AgentName)
	}
	return names
}

// Close removes both devices (and with them the qdiscs and filters).
func (t *VMTap) Close() error {
	var errs []error
	names := []string{}
	if t.createdVM {
		names = append(names, t.Name)
	}
	if t.Agent != nil {
		t.Agent.Close() // the agent's TAP is not persistent: this removes it
		names = append(names, t.AgentName)
	}
	for _, n := range names {
		if l, err := netlink.LinkByName(n); err == nil {
			if err := netlink.LinkDel(l); err != nil {
				errs = append(errs, fmt.Errorf("delete %s: %w", n, err))
			}
		}
	}
	return errors.Join(errs...)
}
