package policy

import (
	"fmt"
	"net/netip"
	"sync/atomic"
)

// Group is a named class of addresses.
type Group uint8

// Groups, as written in policy files.
const (
	GroupLoopback  Group = iota + 1 // 127.0.0.0/8, ::1
	GroupPrivate                    // RFC 1918, 100.64.0.0/10 (CGNAT), fc00::/7, fec0::/10
	GroupLinkLocal                  // 169.254.0.0/16, fe80::/10
	GroupMetadata                   // cloud metadata services (169.254.169.254 and friends)
	GroupMulticast                  // 224.0.0.0/4, ff00::/8, 255.255.255.255 and the host's subnets' broadcast addresses
	GroupHost                       // the host itself: the gateway's addresses and the host's own
	GroupPublic                     // everything else, but for reserved special-purpose ranges
)

var groupNames = map[string]Group{
	"loopback":   GroupLoopback,
	"private":    GroupPrivate,
	"link_local": GroupLinkLocal,
	"metadata":   GroupMetadata,
	"multicast":  GroupMulticast,
	"host":       GroupHost,
	"public":     GroupPublic,
}

// String returns the group's name as written in policy files.
func (g Group) String() string {
	for n, v := range groupNames {
		if v == g {
			return n
		}
	}
	return fmt.Sprintf("group(%d)", uint8(g))
}

// ParseGroup parses a group name.
func ParseGroup(s string) (Group, error) {
	if g, ok := groupNames[s]; ok {
		return g, nil
	}
	return 0, fmt.Errorf("unknown group %q (want loopback, private, link_local, metadata, multicast, host or public)", s)
}

func prefixes(ss ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParsePrefix(s)
	}
	return out
}

var (
	private = prefixes("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7",
		"fec0::/10") // deprecated site-local
	// metadata are the cloud services that hand an instance its
	// credentials and configuration. Some are not link-local (Azure's
	// WireServer is a public address), so no other group keeps them out:
	// only a rule that names the metadata group reaches them.
	metadata = []netip.Addr{
		netip.MustParseAddr("169.254.169.254"),    // AWS, GCP, Azure IMDS, OpenStack, Oracle, DigitalOcean, …
		netip.MustParseAddr("169.254.170.2"),      // AWS ECS task credentials
		netip.MustParseAddr("169.254.170.23"),     // AWS EKS Pod Identity agent
		netip.MustParseAddr("169.254.169.123"),    // AWS time sync
		netip.MustParseAddr("169.254.0.23"),       // Tencent Cloud
		netip.MustParseAddr("168.63.129.16"),      // Azure WireServer (a public address)
		netip.MustParseAddr("100.100.100.200"),    // Alibaba Cloud
		netip.MustParseAddr("192.0.0.192"),        // Oracle Cloud Classic
		netip.MustParseAddr("fd00:ec2::254"),      // AWS IPv6
		netip.MustParseAddr("fd00:ec2::23"),       // AWS EKS Pod Identity agent, IPv6
		netip.MustParseAddr("fd00:ec2::123"),      // AWS time sync, IPv6
		netip.MustParseAddr("fd20:ce::254"),       // GCP IPv6
		netip.MustParseAddr("fd00:c1::a9fe:a9fe"), // Oracle Cloud IPv6
	}
	broadcast4 = netip.AddrFrom4([4]byte{255, 255, 255, 255})
	// reserved are special-purpose ranges (IANA registries) that are in no
	// group and never public. Documentation ranges (192.0.2.0/24,
	// 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32) count as public.
	reserved = prefixes(
		"0.0.0.0/8",       // "this network"
		"192.0.0.0/24",    // IETF protocol assignments
		"192.88.99.0/24",  // 6to4 relay anycast (deprecated)
		"198.18.0.0/15",   // benchmarking
		"240.0.0.0/4",     // reserved
		"100::/64",        // discard-only
		"2001::/23",       // IETF protocol assignments: Teredo 2001::/32, ORCHID, benchmarking
		"5f00::/16",       // SRv6 SIDs
		"64:ff9b:1::/48",  // local-use NAT64 (RFC 8215): carries any IPv4, at a prefix length we cannot know
		"::/96",           // IPv4-compatible, deprecated (::1 and :: are classified before)
		"::ffff:0:0:0/96", // SIIT IPv4-translated
	)
	// localNAT64 is the local-use NAT64 prefix (RFC 8215): its translator
	// may use any prefix length, so the IPv4 address inside cannot be told
	// for sure, and only a rule that names a range within it matches it.
	localNAT64 = netip.MustParsePrefix("64:ff9b:1::/48")
	nat64WKP   = netip.MustParsePrefix("64:ff9b::/96")
	sixToFour  = netip.MustParsePrefix("2002::/16")
	compat     = netip.MustParsePrefix("::/96")
	siit       = netip.MustParsePrefix("::ffff:0:0:0/96")
)

// Embedded returns the IPv4 address that an IPv6 address carries by one of
// the standard embeddings a host may route to IPv4: IPv4-mapped, the NAT64
// well-known prefix 64:ff9b::/96, 6to4 2002::/16, IPv4-compatible ::/96
// and SIIT ::ffff:0:0:0/96. ok is false for any other address.
func Embedded(a netip.Addr) (v4 netip.Addr, ok bool) {
	if a.Is4() {
		return a, false
	}
	if a.Is4In6() {
		return a.Unmap(), true
	}
	b := a.As16()
	switch {
	case nat64WKP.Contains(a), siit.Contains(a):
		return netip.AddrFrom4([4]byte(b[12:16])), true
	case sixToFour.Contains(a):
		return netip.AddrFrom4([4]byte(b[2:6])), true
	case compat.Contains(a) && !a.IsUnspecified() && !a.IsLoopback():
		return netip.AddrFrom4([4]byte(b[12:16])), true
	}
	return a, false
}

// Unspecified reports whether a is an unspecified address in any form
// (0.0.0.0, ::, ::ffff:0.0.0.0, or embedded in another IPv6 prefix): such a
// destination is never dialed.
func Unspecified(a netip.Addr) bool {
	if v4, ok := Embedded(a); ok {
		a = v4
	}
	return !a.IsValid() || a.IsUnspecified()
}

// HostSet is the set of addresses that mean "the host itself". It can be
// replaced while the agent runs (the host gains and loses addresses);
// readers never lock.
//
// It also holds the broadcast addresses of the host's IPv4 subnets: those
// are in the multicast group, never a destination.
type HostSet struct {
	set   atomic.Pointer[map[netip.Addr]struct{}]
	bcast atomic.Pointer[map[netip.Addr]struct{}]
}

// NewHostSet returns a HostSet of the given addresses (normalised).
func NewHostSet(addrs ...netip.Addr) *HostSet {
	h := &HostSet{}
	h.Set(addrs...)
	h.SetBroadcast()
	return h
}

// Set replaces the addresses in the set.
func (h *HostSet) Set(addrs ...netip.Addr) {
	m := make(map[netip.Addr]struct{}, len(addrs))
	for _, a := range addrs {
		if a.IsValid() {
			m[a.Unmap()] = struct{}{}
		}
	}
	h.set.Store(&m)
}

// Contains reports whether a is one of the host's addresses.
func (h *HostSet) Contains(a netip.Addr) bool {
	if h == nil {
		return false
	}
	_, ok := (*h.set.Load())[a]
	return ok
}

// SetBroadcast replaces the broadcast addresses of the host's subnets.
func (h *HostSet) SetBroadcast(addrs ...netip.Addr) {
	m := make(map[netip.Addr]struct{}, len(addrs))
	for _, a := range addrs {
		if a.IsValid() {
			m[a.Unmap()] = struct{}{}
		}
	}
	h.bcast.Store(&m)
}

// IsBroadcast reports whether a is the broadcast address of one of the
// host's subnets.
func (h *HostSet) IsBroadcast(a netip.Addr) bool {
	if h == nil {
		return false
	}
	_, ok := (*h.bcast.Load())[a]
	return ok
}

// SubnetBroadcast returns the broadcast address of an IPv4 subnet (its
// last address). A /31 or /32 has none, nor has an IPv6 prefix.
func SubnetBroadcast(p netip.Prefix) (netip.Addr, bool) {
	if !p.Addr().Is4() || p.Bits() > 30 || p.Bits() < 0 {
		return netip.Addr{}, false
	}
	b := p.Masked().Addr().As4()
	n := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	n |= 1<<(32-p.Bits()) - 1
	return netip.AddrFrom4([4]byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}), true
}

// InGroup reports whether a (already unmapped) belongs to g. An IPv6
// address that embeds an IPv4 address is in the groups of the IPv4 address
// it carries (a NAT64 or 6to4 host would reach that one).
func InGroup(a netip.Addr, g Group, host *HostSet) bool {
	if v4, ok := Embedded(a); ok {
		if g != GroupPublic && inGroup(v4, g, host) {
			return true
		}
		if g == GroupPublic && !inGroup(v4, GroupPublic, host) {
			return false
		}
	}
	return inGroup(a, g, host)
}

func inGroup(a netip.Addr, g Group, host *HostSet) bool {
	switch g {
	case GroupLoopback:
		return a.IsLoopback()
	case GroupPrivate:
		return inPrefixes(private, a)
	case GroupLinkLocal:
		return a.IsLinkLocalUnicast()
	case GroupMetadata:
		for _, m := range metadata {
			if m == a {
				return true
			}
		}
		return false
	case GroupMulticast:
		return a.IsMulticast() || a == broadcast4 || host.IsBroadcast(a)
	case GroupHost:
		return host.Contains(a)
	case GroupPublic:
		return a.IsValid() && !a.IsUnspecified() && !a.IsLoopback() && !inPrefixes(private, a) &&
			!a.IsLinkLocalUnicast() && !inGroup(a, GroupMetadata, nil) && !inGroup(a, GroupMulticast, host) &&
			!host.Contains(a) && !Reserved(a)
	}
	return false
}

func inPrefixes(ps []netip.Prefix, a netip.Addr) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// Reserved reports whether a lies in a special-purpose range that is in no
// group and never public (0.0.0.0/8, 240.0.0.0/4, Teredo, …). Addresses
// that embed IPv4 are classified by what they carry, not by this.
func Reserved(a netip.Addr) bool {
	if a.Is6() && (nat64WKP.Contains(a) || sixToFour.Contains(a)) {
		return false
	}
	if a.Is6() && (compat.Contains(a) || siit.Contains(a)) {
		if v4, ok := Embedded(a); ok {
			return Reserved(v4) // judged by the IPv4 address they carry
		}
	}
	return inPrefixes(reserved, a)
}

// NonPublic reports whether a is an address a public DNS name must not
// resolve to (DNS rebinding): anything that is not public (private, CGNAT,
// loopback, link-local, metadata, multicast, unspecified, reserved), also
// when embedded in an IPv6 address.
func NonPublic(a netip.Addr) bool {
	return !InGroup(a.Unmap(), GroupPublic, nil)
}
