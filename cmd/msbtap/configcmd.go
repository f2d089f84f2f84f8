package main

import (
	"fmt"

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
			if err == nil {
				p, err = p.Apply(plan.Overrides{GuestIPv4: c.String("guest-ipv4"), GuestIPv6: c.String("guest-ipv6"),
					GuestMAC: c.String("guest-mac"), MTU: c.Int("mtu")})
			}
			var s string
			if err == nil {
				s, err = plan.FormatGuestConfig(p.GuestConfig(c.String("iface")), c.String("format"))
			}
			if err != nil {
				return withStatus(2, asFlagError(err, nil))
			}
			fmt.Fprint(c.App.Writer, s)
			return nil
		},
	}
}
