package inspect

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/msbtap/msbtap/policy"
)

// Authority is the host (and port) of an HTTP request's Host header,
// :authority or absolute URL, in the one form msbtap checks and forwards.
type Authority struct {
	// Name is what the policy sees: a host name from policy.NormalizeName,
	// or an IP address as netip writes it.
	Name string
	// Port is the port given (0: none).
	Port uint16
	ipv6 bool
}

// String is the authority as it goes upstream: byte for byte the host
// that was checked, and the port in decimal.
func (a Authority) String() string {
	h := a.Name
	if a.ipv6 {
		h = "[" + h + "]"
	}
	if a.Port != 0 {
		h += ":" + strconv.Itoa(int(a.Port))
	}
	return h
}

// ParseAuthority parses host[:port]. The port, if there is a colon, must be
// decimal 1-65535; an IPv6 address must be in brackets, without a zone; a
// name must pass policy.NormalizeName. Anything else is an error: a host
// checked one way and read another (allowed.test.:80.evil) is how a
// request gets past a name check.
func ParseAuthority(s string) (Authority, error) {
	var a Authority
	host, port, hasPort := s, "", false
	if strings.HasPrefix(s, "[") {
		end := strings.IndexByte(s, ']')
		if end < 0 {
			return a, fmt.Errorf("host %q: no closing bracket", s)
		}
		host = s[1:end]
		switch rest := s[end+1:]; {
		case rest == "":
		case rest[0] == ':':
			port, hasPort = rest[1:], true
		default:
			return a, fmt.Errorf("host %q: %q after the address", s, rest)
		}
		ip, err := netip.ParseAddr(host)
		if err != nil || !ip.Is6() || ip.Zone() != "" {
			return a, fmt.Errorf("host %q: not an IPv6 address in brackets", s)
		}
		a.Name, a.ipv6 = ip.String(), true
	} else {
		if i := strings.IndexByte(s, ':'); i >= 0 {
			host, port, hasPort = s[:i], s[i+1:], true
		}
		if ip, err := netip.ParseAddr(host); err == nil && ip.Is4() {
			a.Name = ip.String()
		} else {
			n, err := policy.NormalizeName(host)
			if err != nil {
				return a, fmt.Errorf("host: %v", err)
			}
			a.Name = n
		}
	}
	if hasPort {
		p, err := parsePort(port)
		if err != nil {
			return a, fmt.Errorf("host %q: %v", s, err)
		}
		a.Port = p
	}
	return a, nil
}

func parsePort(s string) (uint16, error) {
	if s == "" || len(s) > 5 {
		return 0, errors.New("the port is not decimal 1-65535")
	}
	n := 0
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, errors.New("the port is not decimal 1-65535")
		}
		n = n*10 + int(s[i]-'0')
	}
	if n < 1 || n > 65535 {
		return 0, errors.New("the port is not decimal 1-65535")
	}
	return uint16(n), nil
}
