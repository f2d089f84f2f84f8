package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/gdamore/tcell/v2"
	"github.com/urfave/cli/v2"

	"github.com/msbtap/msbtap/audit"
	"github.com/msbtap/msbtap/control"
)

// ctlCommand is `msbtap ctl`, the control socket's client on the command
// line.
func ctlCommand() *cli.Command {
	return &cli.Command{
		Name:  "ctl",
		Usage: "steer a running msbtap through its control socket",
		Flags: []cli.Flag{&cli.StringFlag{Name: "control", EnvVars: []string{"MSBTAP_CONTROL"}, Usage: "the control socket's `PATH` (msbtap run --control)"}},
		Subcommands: []*cli.Command{
			ctlTopCommand(), ctlFlowsCommand(), ctlPolicyCommand(), ctlSecretsCommand(), ctlEventsCommand(),
			ctlStatsCommand(), ctlPcapCommand(), ctlRatesCommand(), ctlPendingCommand(), ctlAnswerCommand(true), ctlAnswerCommand(false),
		},
	}
}

// withClient runs f with a client of the socket --control names; its
// errors are msbtap's status 1, those of withStatus(2, …) usage errors.
func withClient(f func(c *cli.Context, cl *control.Client) error) cli.ActionFunc {
	return func(c *cli.Context) error {
		p := c.String("control")
		if p == "" {
			return withStatus(2, errors.New("--control: give the control socket's PATH (or set MSBTAP_CONTROL)"))
		}
		cl := control.NewClient(p)
		defer cl.Close()
		return f(c, cl)
	}
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func ctlTopCommand() *cli.Command {
	return &cli.Command{
		Name:  "top",
		Usage: "a live view of the open flows (rates, rules) and of the denials as they happen; x closes the selected flow, q quits",
		Flags: []cli.Flag{&cli.DurationFlag{Name: "interval", Value: time.Second, Usage: "refresh the flows every `DURATION`"}},
		Action: withClient(func(c *cli.Context, cl *control.Client) error {
			if c.Duration("interval") <= 0 {
				return withStatus(2, errors.New("--interval: want a positive duration"))
			}
			if _, err := cl.Flows(); err != nil {
				return err
			}
			s, err := tcell.NewScreen()
			if err == nil {
				err = s.Init()
			}
			if err != nil {
				return fmt.Errorf("terminal: %w", err)
			}
			defer s.Fini()
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
			defer stop()
			return runTop(ctx, cl, s, c.String("control"), c.Duration("interval"))
		}),
	}
}

func ctlFlowsCommand() *cli.Command {
	return &cli.Command{
		Name:  "flows",
		Usage: "list the open flows (id, proto, src, dst, domain, rule, bytes each way, age)",
		Flags: []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON"}},
		Action: withClient(func(c *cli.Context, cl *control.Client) error {
			fs, err := cl.Flows()
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(c.App.Writer, fs)
			}
			tw := tabwriter.NewWriter(c.App.Writer, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tDIR\tPROTO\tSRC\tDST\tDOMAIN\tRULE\tUP\tDOWN\tAGE")
			for _, f := range fs {
				fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\t%s\n", f.ID, f.Direction, f.Proto, f.Src, f.Dst,
					f.Domain, f.Rule, f.BytesUp, f.BytesDown, time.Duration(f.AgeSecs*float64(time.Second)).Round(time.Second/10))
			}
			return tw.Flush()
		}),
		Subcommands: []*cli.Command{{
			Name:      "close",
			Usage:     "reset a flow (both ends see the reset)",
			ArgsUsage: "ID",
			Action: withClient(func(c *cli.Context, cl *control.Client) error {
				id, err := strconv.ParseUint(c.Args().First(), 10, 64)
				if err != nil || c.NArg() != 1 {
					return withStatus(2, fmt.Errorf("flows close: want one flow ID, got %q", c.Args().Slice()))
				}
				return cl.CloseFlow(id)
			}),
		}},
	}
}

func ctlPolicyCommand() *cli.Command {
	return &cli.Command{
		Name:  "policy",
		Usage: "read or replace the policy in force",
		Subcommands: []*cli.Command{
			{Name: "get", Usage: "print the policy in force (JSON)", Action: withClient(func(c *cli.Context, cl *control.Client) error {
				p, err := cl.Policy()
				if err != nil {
					return err
				}
				return printJSON(c.App.Writer, p)
			})},
			{
				Name: "set", Usage: "validate FILE (- for stdin) and put it in force for new flows", ArgsUsage: "FILE",
				Flags: []cli.Flag{&cli.BoolFlag{Name: "revoke", Usage: "also reset the open flows the new policy denies"}},
				Action: withClient(func(c *cli.Context, cl *control.Client) error {
					raw, err := readArg(c, "policy set")
					if err != nil {
						return err
					}
					n, err := cl.SetPolicy(raw, c.Bool("revoke"))
					if err == nil && c.Bool("revoke") {
						fmt.Fprintf(c.App.Writer, "policy set; %d open flows revoked\n", n)
					}
					return err
				}),
			},
		},
	}
}

// readArg reads the file the one argument names, or stdin for "-".
func readArg(c *cli.Context, what string) ([]byte, error) {
	if c.NArg() != 1 {
		return nil, withStatus(2, fmt.Errorf("%s: want one FILE (- for stdin)", what))
	}
	if c.Args().First() == "-" {
		return io.ReadAll(os.Stdin)
	}
	return os.ReadFile(c.Args().First())
}

func ctlSecretsCommand() *cli.Command {
	return &cli.Command{
		Name:  "secrets",
		Usage: "change secrets while the sandbox runs",
		Subcommands: []*cli.Command{
			{Name: "set", Usage: "set secret NAME to the value read from stdin", ArgsUsage: "NAME", Action: withClient(func(c *cli.Context, cl *control.Client) error {
				if c.NArg() != 1 {
					return withStatus(2, errors.New("secrets set: want one NAME (the value comes on stdin)"))
				}
				v, err := io.ReadAll(io.LimitReader(os.Stdin, 1<<20))
				if err != nil {
					return err
				}
				if len(v) > 0 && v[len(v)-1] == '\n' {
					v = v[:len(v)-1]
				}
				defer clear(v)
				return cl.SetSecret(c.Args().First(), v)
			})},
			{Name: "rm", Usage: "remove secret NAME", ArgsUsage: "NAME", Action: withClient(func(c *cli.Context, cl *control.Client) error {
				if c.NArg() != 1 {
					return withStatus(2, errors.New("secrets rm: want one NAME"))
				}
				return cl.RemoveSecret(c.Args().First())
			})},
		},
	}
}

func ctlEventsCommand() *cli.Command {
	return &cli.Command{
		Name:  "events",
		Usage: "stream decisions and violations as JSON lines (the audit log's records) until interrupted",
		Action: withClient(func(c *cli.Context, cl *control.Client) error {
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			enc := json.NewEncoder(c.App.Writer)
			return cl.Events(ctx, func(r audit.Record) error { return enc.Encode(r) })
		}),
	}
}

func ctlStatsCommand() *cli.Command {
	return &cli.Command{
		Name:  "stats",
		Usage: "print the counters of /metrics as JSON",
		Action: withClient(func(c *cli.Context, cl *control.Client) error {
			st, err := cl.Stats()
			if err != nil {
				return err
			}
			return printJSON(c.App.Writer, st)
		}),
	}
}

func ctlPcapCommand() *cli.Command {
	return &cli.Command{
		Name:  "pcap",
		Usage: "capture the sandbox's frames into a file",
		Subcommands: []*cli.Command{
			{Name: "start", Usage: "capture into FILE (created by you, as you; the agent writes to it)", ArgsUsage: "FILE",
				Action: withClient(func(c *cli.Context, cl *control.Client) error {
					if c.NArg() != 1 {
						return withStatus(2, errors.New("pcap start: want one FILE"))
					}
					name := c.Args().First()
					f, err := os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_NOFOLLOW, 0o644)
					if err != nil {
						return err
					}
					defer f.Close()
					if abs, err := filepath.Abs(name); err == nil {
						name = abs
					}
					return cl.StartCapture(f, name)
				})},
			{Name: "stop", Usage: "end the capture (started here or by --pcap)", Action: withClient(func(c *cli.Context, cl *control.Client) error {
				ci, err := cl.StopCapture()
				if err != nil {
					return err
				}
				return printJSON(c.App.Writer, ci)
			})},
		},
	}
}

func ctlRatesCommand() *cli.Command {
	return &cli.Command{
		Name:  "rates",
		Usage: "print the rates; with flags, change them",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "up", Usage: "what the sandbox sends, `RATE` (100mbit, 20MB, off)"},
			&cli.StringFlag{Name: "down", Usage: "what the sandbox receives, `RATE`"},
			&cli.Float64Flag{Name: "new-connections-per-second", Usage: "TCP connections a second, `N` (0: no limit)"},
		},
		Action: withClient(func(c *cli.Context, cl *control.Client) error {
			change := map[string]any{}
			for _, flag := range []string{"up", "down"} {
				if c.IsSet(flag) {
					change[flag] = c.String(flag)
				}
			}
			if c.IsSet("new-connections-per-second") {
				change["new_connections_per_second"] = c.Float64("new-connections-per-second")
			}
			var r control.RatesText
			var err error
			if len(change) == 0 {
				r, err = cl.Rates()
			} else {
				r, err = cl.SetRates(change)
			}
			if err != nil {
				return err
			}
			return printJSON(c.App.Writer, r)
		}),
	}
}
