package main

import (
	"encoding/json"
	"fmt"
	"net"
	"sort"

	"github.com/urfave/cli/v2"

	"github.com/msbtap/msbtap/plan"
)

func configCommand() *cli.Command {
	return &cli.Command{
		Name:  "config",
		Usage: "print a sandbox's network settings: environment variables, a kernel ip= parameter, or JSON",
		OnUsageError: func(_ *cli.Context, err error, _ bool) error {
			return withStatus(2, err)
		},
		Flags: []cli.Flag{
			&cli.IntFlag{Name: "slot", Usage: "sandbox slot `N` (0..65535)"},
			&cli.IntFlag{Name: "mtu", Usage: "MTU (default 1500)"},
			&cli.StringFlag{Name: "guest-ipv4", Usage: "guest IPv4 address `A[/LEN]`"},
			&cli.StringFlag{Name: "guest-ipv6", Usage: "guest IPv6 address `A[/LEN]`"},
			&cli.StringFlag{Name: "guest-mac", Usage: "guest MAC address `M`"},
			&cli.StringFlag{Name: "iface", Value: "eth0", Usage: "the guest's interface `NAME`"},
			&cli.StringFlag{Name: "format", Value: "env", Usage: "env, cmdline or json"},
		},
		Action: func(c *cli.Context) error {
			p, err := plan.ForSlot(c.Int("slot"))
			if err != nil {
				return withStatus(2, fmt.Errorf("--slot: %w", err))
			}
			if p, err = p.Apply(plan.Overrides{GuestIPv4: c.String("guest-ipv4"), GuestIPv6: c.String("guest-ipv6"),
				GuestMAC: c.String("guest-mac"), MTU: c.Int("mtu")}); err != nil {
				return withStatus(2, err)
			}
			s, err := formatConfig(guestConfig(p, c.String("iface")), c.String("format"))
			if err != nil {
				return withStatus(2, err)
			}
			fmt.Fprint(c.App.Writer, s)
			return nil
		},
	}
}

// guestConfig is what a guest needs to configure its network by hand, named
// like the seed engine's MSB_NET_* variables.
func guestConfig(p plan.Plan, iface string) map[string]string {
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

func formatConfig(cfg map[string]string, format string) (string, error) {
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
	return "", fmt.Errorf("--format %q: want env, cmdline or json", format)
}
