package main

import (
	"errors"
	"fmt"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/msbtap/msbtap/control"
)

// ctlPendingCommand is `ctl pending`, the questions of ask rules.
func ctlPendingCommand() *cli.Command {
	return &cli.Command{
		Name:  "pending",
		Usage: "list the flows an ask rule holds: question id, proto, destination, name, flows waiting, age",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "json", Usage: "print JSON"},
			&cli.BoolFlag{Name: "watch", Usage: "keep watching: print each new question as it comes (one line each), until interrupted"},
		},
		Action: withClient(func(c *cli.Context, cl *control.Client) error {
			if c.Bool("watch") {
				return watchPending(c, cl)
			}
			qs, err := cl.Pending()
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(c.App.Writer, qs)
			}
			tw := tabwriter.NewWriter(c.App.Writer, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tPROTO\tDST\tNAME\tSRC\tWAITING\tAGE")
			for _, q := range qs {
				fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%d\t%s\n", q.ID, q.Proto, q.Dst, q.Name, q.Src, q.Waiting, q.Age)
			}
			return tw.Flush()
		}),
	}
}

// watchPending prints each new question once, as a line a terminal (or a
// script reading it) can act on, polling twice a second.
func watchPending(c *cli.Context, cl *control.Client) error {
	seen := map[uint64]bool{}
	for {
		qs, err := cl.Pending()
		if err != nil {
			return err
		}
		now := map[uint64]bool{}
		for _, q := range qs {
			now[q.ID] = true
			if !seen[q.ID] {
				fmt.Fprintf(c.App.Writer, "ask %d: %s %s %s from %s — msbtap ctl allow %d [--always] | deny %d [--always]\n",
					q.ID, q.Proto, q.Name, q.Dst, q.Src, q.ID, q.ID)
			}
		}
		seen = now
		select {
		case <-c.Context.Done():
			return nil
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// ctlAnswerCommand is `ctl allow` or `ctl deny`, an answer to a question.
func ctlAnswerCommand(allow bool) *cli.Command {
	cmd := &cli.Command{
		Name: "allow", Usage: "let the flows held on question ID go", ArgsUsage: "ID",
		Flags: []cli.Flag{&cli.BoolFlag{Name: "always", Usage: "also add a rule for the destination to the live policy (and, with run --ask-save, to the policy file)"}},
	}
	verb := "allowed"
	if !allow {
		cmd.Name, cmd.Usage, verb = "deny", "refuse the flows held on question ID", "denied"
	}
	cmd.Action = withClient(func(c *cli.Context, cl *control.Client) error {
		id, err := strconv.ParseUint(c.Args().First(), 10, 64)
		if err != nil || c.NArg() != 1 {
			return withStatus(2, errors.New("want one question ID (msbtap ctl pending lists them)"))
		}
		if err := cl.Decide(id, allow, c.Bool("always")); err != nil {
			return err
		}
		if c.Bool("always") {
			fmt.Fprintf(c.App.Writer, "%d %s always (a rule of the live policy now)\n", id, verb)
		} else {
			fmt.Fprintf(c.App.Writer, "%d %s\n", id, verb)
		}
		return nil
	})
	return cmd
}
