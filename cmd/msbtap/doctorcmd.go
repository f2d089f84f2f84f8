package main

import (
	"github.com/urfave/cli/v2"

	"github.com/msbtap/msbtap/doctor"
	"github.com/msbtap/msbtap/stack"
)

func doctorCommand() *cli.Command {
	return &cli.Command{
		Name:  "doctor",
		Usage: "check this host for what msbtap needs and what bites with many sandboxes (exit 1 on a failure)",
		Description: "Each check prints ok, warn or fail, what it found and, when something is wrong, the fix. " +
			"Run it as root, in the network namespace the agents run in (sysctls are per namespace).",
		OnUsageError: func(_ *cli.Context, err error, _ bool) error { return withStatus(2, err) },
		Flags: []cli.Flag{
			&cli.IntFlag{Name: "max-connections", Value: stack.DefaultMaxConnections, Usage: "the --max-connections the agents run with (`N`), for the descriptor check"},
			&cli.BoolFlag{Name: "vm", Usage: "the agents run in VM mode: a missing tc u32 or mirred is a failure"},
		},
		Action: func(c *cli.Context) error {
			rs := doctor.Run(doctor.Host(), doctor.Options{MaxConnections: c.Int("max-connections"), VM: c.Bool("vm")})
			if doctor.Print(c.App.Writer, rs) == doctor.Fail {
				return withStatus(1, nil)
			}
			return nil
		},
	}
}
