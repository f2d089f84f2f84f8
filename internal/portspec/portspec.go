// Package portspec holds the published-port spec (Spec) and parses it as
// -p/--publish takes it: [HOSTIP:]HOSTPORT[-END]:GUESTPORT[-END][/tcp|/udp|/tcp6|/udp6].
package portspec

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/msbtap/msbtap/internal/fielderr"
)

// Spec is one published port: host address and port → guest port.
type Spec struct {
	Proto     string // "tcp" or "udp"
	Host      netip.AddrPort
	GuestPort uint16
	// GuestV6 sends every client to the guest's IPv6 address. Otherwise TCP
	// goes to the IPv4 address, and to the IPv6 one when that refuses
	// (a server that listens on [::] only, say); UDP goes to IPv4.
	GuestV6 bool
}

// String gives the spec as logs and errors show it: 127.0.0.1:8080→80/tcp,
// with a 6 after the protocol for GuestV6.
func (p Spec) String() string {
	v6 := ""
	if p.GuestV6 {
		v6 = "6"
	}
	return fmt.Sprintf("%s→%d/%s%s", p.Host, p.GuestPort, p.Proto, v6)
}

// Parse parses
// [HOSTIP:]HOSTPORT[-END]:GUESTPORT[-END][/tcp|/udp|/tcp6|/udp6]. The host
// address defaults to 127.0.0.1; IPv6 addresses go in brackets; tcp6 and
// udp6 relay to the guest's IPv6 address.
func Parse(s string) ([]Spec, error) {
	bad := func(why string) ([]Spec, error) {
		return nil, fielderr.Bad("publish", s, "%s (want [HOSTIP:]HOSTPORT[-END]:GUESTPORT[-END][/tcp|/udp|/tcp6|/udp6])", why)
	}
	rest, proto, v6 := s, "tcp", false
	if i := strings.LastIndexByte(rest, '/'); i >= 0 {
		proto, rest = rest[i+1:], rest[:i]
		switch proto {
		case "tcp", "udp":
		case "tcp6", "udp6":
			proto, v6 = proto[:3], true
		default:
			return bad(fmt.Sprintf("protocol %q", proto))
		}
	}
	host := netip.AddrFrom4([4]byte{127, 0, 0, 1})
	if strings.HasPrefix(rest, "[") {
		end := strings.Index(rest, "]:")
		if end < 0 {
			return bad("unclosed '[' around the IPv6 host address")
		}
		a, err := netip.ParseAddr(rest[1:end])
		if err != nil || !a.Is6() {
			return bad(fmt.Sprintf("host address %q", rest[1:end]))
		}
		host, rest = a, rest[end+2:]
	}
	parts := strings.Split(rest, ":")
	switch len(parts) {
	case 2:
	case 3:
		a, err := netip.ParseAddr(parts[0])
		if err != nil || !a.Is4() {
			return bad(fmt.Sprintf("host address %q (IPv6 goes in brackets)", parts[0]))
		}
		host, parts = a, parts[1:]
	default:
		if len(parts) > 3 {
			return bad("an IPv6 host address goes in brackets, as in [::1]:8080:80")
		}
		return bad("wrong number of ':'")
	}
	h0, h1, err := parsePortRange(parts[0])
	if err != nil {
		return bad("host port: " + err.Error())
	}
	g0, g1, err := parsePortRange(parts[1])
	if err != nil {
		return bad("guest port: " + err.Error())
	}
	if h1-h0 != g1-g0 {
		return bad(fmt.Sprintf("host range has %d ports, guest range %d", h1-h0+1, g1-g0+1))
	}
	var out []Spec
	for i := 0; i <= int(h1-h0); i++ {
		out = append(out, Spec{Proto: proto, Host: netip.AddrPortFrom(host, h0+uint16(i)), GuestPort: g0 + uint16(i), GuestV6: v6})
	}
	return out, nil
}

func parsePortRange(s string) (lo, hi uint16, err error) {
	a, b, isRange := strings.Cut(s, "-")
	p := func(x string) (uint16, error) {
		n, err := strconv.Atoi(x)
		if err != nil || n < 1 || n > 65535 {
			return 0, fmt.Errorf("%q is not a port 1..65535", x)
		}
		return uint16(n), nil
	}
	if lo, err = p(a); err != nil {
		return 0, 0, err
	}
	hi = lo
	if isRange {
		if hi, err = p(b); err != nil {
			return 0, 0, err
		}
		if hi < lo {
			return 0, 0, fmt.Errorf("range %s ends before it starts", s)
		}
	}
	return lo, hi, nil
}

// ParseAll parses every spec and refuses a host port published twice.
func ParseAll(specs []string) ([]Spec, error) {
	var out []Spec
	seen := map[string]string{}
	for _, spec := range specs {
		ps, err := Parse(spec)
		if err != nil {
			return nil, err
		}
		for _, p := range ps {
			k := p.Proto + " " + p.Host.String()
			if prev, dup := seen[k]; dup {
				return nil, fielderr.Bad("publish", spec, "host port %s/%s is already published by %q", p.Host, p.Proto, prev)
			}
			seen[k] = spec
		}
		out = append(out, ps...)
	}
	return out, nil
}
