package main

import (
	"context"
	"errors"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/msbtap/msbtap/agent"
	"github.com/msbtap/msbtap/process"
	"github.com/msbtap/msbtap/settings"
)

func runCommand() *cli.Command {
	return &cli.Command{
		Name:      "run",
		Usage:     "attach a sandbox and serve its network until it goes away",
		ArgsUsage: "[-- COMMAND [ARGS...]]",
		Flags:     runFlags(),
		OnUsageError: func(_ *cli.Context, err error, _ bool) error {
			return withStatus(2, err)
		},
		Action: func(c *cli.Context) error {
			s, err := loadSettings(c)
			if err != nil {
				return withStatus(2, err)
			}
			cfg, err := settings.Build(s, os.Stderr)
			if err != nil {
				return withStatus(2, s.flagError(err))
			}
			return s.flagError(startAgent(cfg))
		},
	}
}

// startAgent runs the agent; tests replace it to see the parsed config.
var startAgent = runAgent

// runAgent builds the agent, runs it until the sandbox goes away, and maps
// how it ended to msbtap's exit status: the command's own, 3 after a fatal
// violation, 1 for any other error.
func runAgent(cfg process.Config) error {
	a, err := process.New(cfg)
	if err != nil {
		return err
	}
	err = a.Run(context.Background())
	a.Close()
	var st *process.ExitStatus
	var term *agent.Terminated
	switch {
	case errors.As(err, &st):
		return withStatus(st.Code, nil)
	case errors.As(err, &term):
		return withStatus(3, err)
	}
	return err
}
