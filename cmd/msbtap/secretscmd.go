package main

import (
	"errors"
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/msbtap/msbtap/secrets"
)

func secretsCommand() *cli.Command {
	return &cli.Command{
		Name:  "secrets",
		Usage: "check a secrets file",
		Subcommands: []*cli.Command{{
			Name:      "check",
			Usage:     "validate a secrets file (owner, mode, fields, from_file sources): exit 0, or print the errors",
			ArgsUsage: "FILE",
			Action: func(c *cli.Context) error {
				if c.NArg() != 1 {
					return withStatus(2, errors.New("secrets check: want exactly one FILE"))
				}
				f, err := secrets.LoadFile(c.Args().First())
				if err == nil {
					err = f.CheckFiles()
				}
				if err != nil {
					return withStatus(1, err)
				}
				fmt.Fprintf(c.App.Writer, "%s: ok (%d secrets)\n", c.Args().First(), len(f.Secrets))
				return nil
			},
		}},
	}
}
