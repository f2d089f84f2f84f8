package plan

import (
	"encoding/json"
	"fmt"
	"net"
	"sort"

	"github.com/msbtap/msbtap/internal/fielderr"
)

// GuestConfig is what a guest needs to configure its network by hand,
// named like the MSB_NET_* variables of microsandbox's network engine.
func (p Plan) GuestConfig(iface string) map[string]string {
	return map[string]string{
		"MSB_NET_IFACE":        iface,
		"MSB_NET_MAC":          p.GuestMAC.String(),
		"MSB_NET_MTU":          fmt.Sprint(p.MTU),
		"MSB_NET_IPV4_ADDRESS": p.GuestIPv4.String(),
		"MSB_NET_IPV4_GATEWAY": p.GatewayV4.String(),
		"MSB_NET_IPV4_DNS":     p.GatewayV4.String(),
		"MSB_NET_IPV6_ADDRESS": p.GuestIPv6.String(),
		"MSB_NET_IPV6_GATEWAY": p.GatewayV6.String(),
		"MSB_NET_IPV6_DNS":     p.GatewayV6.String(),
	}
}

// FormatGuestConfig writes a guest configuration as environment lines
// ("env"), a kernel ip= parameter ("cmdline") or JSON ("json").
func FormatGuestConfig(cfg map[string]string, format string) (string, error) {
	switch format {
	case "env":
		keys := make([]string, 0, len(cfg))
		for k := range cfg {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		s := ""
		for _, k := range keys {
			s += k + "=" + cfg[k] + "\n"
		}
		return s, nil
	case "json":
		b, err := json.MarshalIndent(cfg, "", "  ")
		return string(b) + "\n", err
	case "cmdline":
		// ip=<client>:<server>:<gateway>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>
		_, ipn, err := net.ParseCIDR(cfg["MSB_NET_IPV4_ADDRESS"])
		if err != nil {
			return "", err
		}
		ip, _, _ := net.ParseCIDR(cfg["MSB_NET_IPV4_ADDRESS"])
		return fmt.Sprintf("ip=%s::%s:%s::%s:off:%s\n", ip, cfg["MSB_NET_IPV4_GATEWAY"], net.IP(ipn.Mask).String(),
			cfg["MSB_NET_IFACE"], cfg["MSB_NET_IPV4_DNS"]), nil
	}
	return "", fielderr.Bad("format", format, "want env, cmdline or json")
}
