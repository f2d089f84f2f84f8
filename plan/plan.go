// Package plan derives a sandbox's addresses from its slot number, as
// microsandbox's network engine does, and applies the user's overrides.
package plan

import (
	"net"
	"net/netip"

	"github.com/msbtap/msbtap/internal/fielderr"
)

// MaxSlot is the highest slot number.
const MaxSlot = 65535

// DefaultMTU is the MTU used unless one is set.
const DefaultMTU = 1500

// Plan is one sandbox's link and address configuration.
type Plan struct {
	Slot       int
	GuestMAC   net.HardwareAddr
	GatewayMAC net.HardwareAddr
	GuestIPv4  netip.Prefix // guest address with its prefix length (/30 by default)
	GatewayV4  netip.Addr
	GuestIPv6  netip.Prefix // guest address with its prefix length (/64 by default)
	GatewayV6  netip.Addr
	MTU        int
}

// ForSlot returns the default plan of a slot.
func ForSlot(slot int) (Plan, error) {
	if slot < 0 || slot > MaxSlot {
		return Plan{}, fielderr.Bad("slot", slot, "out of range 0..%d", MaxSlot)
	}
	hi, lo := byte(slot>>8), byte(slot)
	base := uint32(100)<<24 | uint32(96)<<16 // 100.96.0.0
	g := base + uint32(slot)*4 + 2
	guest4 := netip.AddrFrom4([4]byte{byte(g >> 24), byte(g >> 16), byte(g >> 8), byte(g)})
	var v6 [16]byte
	copy(v6[:], []byte{0xfd, 0x42, 0x6d, 0x73, 0x00, 0x62, hi, lo})
	v6[15] = 2
	guest6 := netip.AddrFrom16(v6)
	v6[15] = 1
	return Plan{
		Slot:       slot,
		GuestMAC:   net.HardwareAddr{0x02, 0x6d, 0x73, hi, lo, 0x02},
		GatewayMAC: net.HardwareAddr{0x02, 0x6d, 0x73, hi, lo, 0x01},
		GuestIPv4:  netip.PrefixFrom(guest4, 30),
		GatewayV4:  guest4.Prev(),
		GuestIPv6:  netip.PrefixFrom(guest6, 64),
		GatewayV6:  netip.AddrFrom16(v6),
		MTU:        DefaultMTU,
	}, nil
}

// Overrides are user-given values that replace those derived from the slot.
// Zero values leave the plan's value alone.
type Overrides struct {
	GuestIPv4 string // "A" or "A/LEN"; the gateway becomes the guest address − 1
	GuestIPv6 string // "A" or "A/LEN"; the gateway becomes the guest address − 1
	GuestMAC  string
	MTU       int
}

// Apply returns p with the overrides applied, or an error naming the bad one.
func (p Plan) Apply(o Overrides) (Plan, error) {
	if o.GuestIPv4 != "" {
		pfx, err := parseGuestAddr(o.GuestIPv4, 30)
		if err != nil || !pfx.Addr().Is4() {
			return p, fielderr.Bad("guest_ipv4", o.GuestIPv4, "not an IPv4 address")
		}
		if pfx.Bits() > 30 {
			return p, fielderr.Bad("guest_ipv4", o.GuestIPv4, "prefix /%d leaves no room for the gateway; use /30 or shorter", pfx.Bits())
		}
		gw := pfx.Addr().Prev()
		if !gw.IsValid() || !pfx.Contains(gw) || gw == pfx.Masked().Addr() {
			return p, fielderr.Bad("guest_ipv4", o.GuestIPv4, "the gateway (guest address - 1) must be a host address in the same subnet")
		}
		p.GuestIPv4, p.GatewayV4 = pfx, gw
	}
	if o.GuestIPv6 != "" {
		pfx, err := parseGuestAddr(o.GuestIPv6, 64)
		if err != nil || !pfx.Addr().Is6() || pfx.Addr().Is4In6() {
			return p, fielderr.Bad("guest_ipv6", o.GuestIPv6, "not an IPv6 address")
		}
		gw := pfx.Addr().Prev()
		if !gw.IsValid() || !pfx.Contains(gw) || gw == pfx.Masked().Addr() {
			return p, fielderr.Bad("guest_ipv6", o.GuestIPv6, "the gateway (guest address - 1) must be a host address in the same subnet")
		}
		p.GuestIPv6, p.GatewayV6 = pfx, gw
	}
	if o.GuestMAC != "" {
		mac, err := net.ParseMAC(o.GuestMAC)
		if err != nil || len(mac) != 6 {
			return p, fielderr.Bad("guest_mac", o.GuestMAC, "not a 6-byte MAC address")
		}
		if mac[0]&1 != 0 {
			return p, fielderr.Bad("guest_mac", o.GuestMAC, "a multicast address cannot be a NIC's address")
		}
		if mac.String() == p.GatewayMAC.String() {
			return p, fielderr.Bad("guest_mac", o.GuestMAC, "equals the gateway MAC")
		}
		p.GuestMAC = mac
	}
	if o.MTU != 0 {
		if o.MTU < 1280 || o.MTU > 65520 {
			return p, fielderr.Bad("mtu", o.MTU, "out of range 1280..65520 (IPv6 needs at least 1280)")
		}
		p.MTU = o.MTU
	}
	return p, nil
}

func parseGuestAddr(s string, defBits int) (netip.Prefix, error) {
	if pfx, err := netip.ParsePrefix(s); err == nil {
		return pfx, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	return netip.PrefixFrom(a, defBits), nil
}
