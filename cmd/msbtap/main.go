// Command msbtap is a per-sandbox host networking agent: it gives one sandbox
// (a network namespace or a VM) a TAP device whose traffic is terminated by a
// userspace stack, checked against a policy, and proxied through host sockets.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/msbtap/msbtap/process"
	"github.com/msbtap/msbtap/sandbox"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "0.1.0-dev"

// exitError carries the process exit status out of a command.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string {
	if e.err == nil {
		return fmt.Sprintf("exit status %d", e.code)
	}
	return e.err.Error()
}

func (e *exitError) Unwrap() error { return e.err }

// withStatus wraps err so that main exits with code.
func withStatus(code int, err error) error { return &exitError{code: code, err: err} }

func newApp(stdout, stderr io.Writer) *cli.App {
	return &cli.App{
		Name:            "msbtap",
		Usage:           "policed userspace networking for one sandbox over a TAP device",
		Version:         version,
		Writer:          stdout,
		ErrWriter:       stderr,
		HideHelpCommand: true,
		// A repeatable flag takes each value whole: commas belong to it
		// (--secret NAME@HOST,HOST, --env NO_PROXY=a,b).
		DisableSliceFlagSeparator: true,
		// The completion scripts ask msbtap for the words that fit.
		EnableBashCompletion: true,
		Description: "msbtap gives one sandbox (a network namespace or a VM) a TAP device whose traffic is terminated by a userspace TCP/IP stack on the host, " +
			"checked against a policy, and relayed through the host's own sockets. Run as root (or with sudo).",
		OnUsageError: func(_ *cli.Context, err error, _ bool) error {
			return withStatus(2, err)
		},
		ExitErrHandler: func(*cli.Context, error) {}, // main prints and exits
		Commands: []*cli.Command{
			runCommand(),
			policyCommand(),
			doctorCommand(),
			ctlCommand(),
			secretsCommand(),
			configCommand(),
			completionCommand(),
			manCommand(),
			{
				Name:  "version",
				Usage: "print the version",
				Action: func(c *cli.Context) error {
					fmt.Fprintf(c.App.Writer, "msbtap %s\n", version)
					return nil
				},
			},
		},
	}
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == sandbox.InitArg {
		sandbox.Init() // msbtap re-executed as the sandbox's init
	}
	if len(os.Args) > 1 && os.Args[1] == process.HookRunnerArg {
		process.HookRunner() // msbtap re-executed to run --on-terminate
	}
	if len(os.Args) > 1 && os.Args[1] == process.AskRunnerArg {
		process.AskRunner() // msbtap re-executed to run --ask-exec
	}
	if len(os.Args) > 1 && os.Args[1] == process.KeeperArg {
		process.Keeper() // msbtap re-executed to keep the agent's files
	}
	err := newApp(os.Stdout, os.Stderr).Run(os.Args)
	if err == nil {
		return
	}
	code := 1
	var ee *exitError
	if errors.As(err, &ee) {
		code = ee.code
		if ee.err == nil {
			os.Exit(code)
		}
	}
	fmt.Fprintf(os.Stderr, "msbtap: %v\n", err)
	os.Exit(code)
}
