package policy

import (
	"fmt"
	"net/netip"
)

// Group is a named class of addresses.
type Group uint8

// Groups, as written in policy files.
const (
	GroupLoopback  Group = iota + 1 // 127.0.0.0/8, ::1
	GroupPrivate                    // RFC 1918, 100.64.0.0/10 (CGNAT), fc00::/7
	GroupLinkLocal                  // 169.254.0.0/16, fe80::/10
	GroupMetadata                   // cloud metadata services (169.254.169.254 and friends)
	GroupMulticast                  // 224.0.0.0/4, 255.255.255.255, ff00::/8
	GroupHost                       // the host itself: the gateway's addresses and the host's own
	GroupPublic                     // everything else
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

var (
	private = []netip.Prefix{
		netip.MustParsePrefix("10.0.0.0/8"),
		netip.MustParsePrefix("172.16.0.0/12"),
		netip.MustParsePrefix("192.168.0.0/16"),
		netip.MustParsePrefix("100.64.0.0/10"),
		netip.MustParsePrefix("fc00::/7"),
	}
	metadata = []netip.Addr{
		netip.MustParseAddr("169.254.169.254"), // AWS, GCP, Azure, OpenStack, …
		netip.MustParseAddr("169.254.170.2"),   // AWS ECS task metadata
		netip.MustParseAddr("169.254.169.123"), // AWS time sync
		netip.MustParseAddr("100.100.100.200"), // Alibaba Cloud
		netip.MustParseAddr("fd00:ec2::254"),   // AWS IPv6
		netip.MustParseAddr("fd00:ec2::123"),
	}
	broadcast4 = netip.AddrFrom4([4]byte{255, 255, 255, 255})
)

// HostSet is the set of addresses that mean "the host itself".
type HostSet struct {
	addrs []netip.Addr
}

// NewHostSet returns a HostSet of the given addresses (normalised).
func NewHostSet(addrs ...netip.Addr) *HostSet {
	h := &HostSet{}
	for _, a := range addrs {
		if a.IsValid() {
			h.addrs = append(h.addrs, a.Unmap())
		}
	}
	return h
}

// Contains reports whether a is one of the host's addresses.
func (h *HostSet) Contains(a netip.Addr) bool {
	if h == nil {
		return false
	}
	for _, x := range h.addrs {
		if x == a {
			return true
		}
	}
	return false
}

// InGroup reports whether a (already unmapped) belongs to g.
func InGroup(a netip.Addr, g Group, host *HostSet) bool {
	switch g {
	case GroupLoopback:
		return a.IsLoopback()
	case GroupPrivate:
		for _, p := range private {
			if p.Contains(a) {
				return true
			}
		}
		return false
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
		return a.IsMulticast() || a == broadcast4
	case GroupHost:
		return host.Contains(a)
	case GroupPublic:
		return a.IsValid() && !a.IsUnspecified() && !a.IsLoopback() && !InGroup(a, GroupPrivate, nil) &&
			!a.IsLinkLocalUnicast() && !InGroup(a, GroupMetadata, nil) && !InGroup(a, GroupMulticast, nil) &&
			!host.Contains(a)
	}
	return false
}

// NonPublic reports whether a is an address a public DNS name must not
// resolve to (DNS rebinding): private, CGNAT, loopback, link-local,
// metadata, multicast or unspecified.
func NonPublic(a netip.Addr) bool {
	a = a.Unmap()
	return !a.IsValid() || a.IsUnspecified() || a.IsLoopback() || a.IsLinkLocalUnicast() ||
		InGroup(a, GroupPrivate, nil) || InGroup(a, GroupMetadata, nil) || InGroup(a, GroupMulticast, nil)
}
