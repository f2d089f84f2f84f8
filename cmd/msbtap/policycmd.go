package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/msbtap/msbtap/agent"
	"github.com/msbtap/msbtap/audit"
	"github.com/msbtap/msbtap/plan"
	"github.com/msbtap/msbtap/policy"
)

func policyCommand() *cli.Command {
	usageErr := func(_ *cli.Context, err error, _ bool) error { return withStatus(2, err) }
	return &cli.Command{
		Name:  "policy",
		Usage: "check a policy file, or explain how it decides a flow",
		Subcommands: []*cli.Command{
			showCommand(),
			{
				Name:         "check",
				Usage:        "validate a policy file: exit 0, or print the errors",
				ArgsUsage:    "FILE",
				OnUsageError: usageErr,
				Action: func(c *cli.Context) error {
					if c.NArg() != 1 {
						return withStatus(2, errors.New("policy check: want exactly one FILE"))
					}
					f, err := policy.LoadFile(c.Args().First())
					var errs policy.Errors
					if errors.As(err, &errs) {
						for _, e := range errs {
							fmt.Fprintln(c.App.ErrWriter, e)
						}
						fmt.Fprintf(c.App.ErrWriter, "%s: %d error(s)\n", c.Args().First(), len(errs))
						return withStatus(1, nil)
					}
					if err != nil {
						return withStatus(1, err)
					}
					fmt.Fprintf(c.App.Writer, "%s: ok (%d rules, default_action %s)\n", c.Args().First(), len(f.Rules), f.DefaultAction)
					return nil
				},
			},
			{
				Name:         "explain",
				Usage:        "print the rule that decides a flow, and its action; or what a preset of names (--preset) holds",
				OnUsageError: usageErr,
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "policy", Value: policy.DefaultPreset, Usage: "a preset or a policy `FILE`"},
					&cli.StringFlag{Name: "preset", Usage: "print the names, ports and sources of preset `NAME` (pypi, npm, github, …; list: every preset) and exit"},
					&cli.StringFlag{Name: "dst", Usage: "destination `IP:PORT` (an IP alone for icmp); required unless --preset"},
					&cli.StringFlag{Name: "proto", Value: "tcp", Usage: "tcp, udp, icmp or icmpv6"},
					&cli.StringFlag{Name: "domain", Usage: "the `NAME` the destination was resolved from"},
					&cli.StringFlag{Name: "sni", Usage: "the server `NAME` (TLS SNI or HTTP Host) the connection then asks for"},
					&cli.StringFlag{Name: "method", Usage: "an HTTP request's `METHOD`, for rules with http conditions"},
					&cli.StringFlag{Name: "path", Value: "/", Usage: "an HTTP request's `PATH`"},
					&cli.StringFlag{Name: "src", Usage: "source `IP:PORT` (default: the slot's guest address; the host client for ingress)"},
					&cli.StringFlag{Name: "direction", Value: "egress", Usage: "egress or ingress"},
					&cli.IntFlag{Name: "slot", Usage: "sandbox slot whose gateway counts as the host"},
				},
				Action: explain,
			},
			{
				Name:         "suggest",
				Usage:        "write a policy that allows what a decision log (--audit-log) shows the sandbox used or was refused by the default",
				ArgsUsage:    "AUDITLOG [AUDITLOG…]",
				OnUsageError: usageErr,
				Flags: []cli.Flag{
					&cli.IntFlag{Name: "suffix-depth", Usage: "write names of more than `N` labels (N ≥ 2) as domain_suffix rules on their last N labels"},
					&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Usage: "write the policy to `FILE` (atomically) instead of standard output"},
				},
				Action: suggest,
			},
		},
	}
}

func explain(c *cli.Context) error {
	if name := c.String("preset"); name != "" {
		return explainPreset(c, name)
	}
	if c.String("dst") == "" {
		return withStatus(2, errors.New("policy explain: --dst is required (or --preset NAME)"))
	}
	f, err := policy.Load(c.String("policy"))
	if err != nil {
		return withStatus(1, fmt.Errorf("--policy: %w", err))
	}
	p, err := plan.ForSlot(c.Int("slot"))
	if err != nil {
		return withStatus(2, fmt.Errorf("--slot: %w", err))
	}
	proto, err := policy.ParseProto(c.String("proto"))
	if err != nil {
		return withStatus(2, fmt.Errorf("--proto: %w", err))
	}
	dst, err := netip.ParseAddrPort(c.String("dst"))
	if err != nil {
		a, aerr := netip.ParseAddr(c.String("dst"))
		if aerr != nil {
			return withStatus(2, fmt.Errorf("--dst %q: want IP:PORT ([IPv6]:PORT) or an IP", c.String("dst")))
		}
		dst = netip.AddrPortFrom(a, 0)
	}
	fl := policy.Flow{Proto: proto, Dst: dst, Src: netip.AddrPortFrom(p.GuestIPv4.Addr(), 40000)}
	switch c.String("direction") {
	case "egress":
	case "ingress":
		fl.Direction = policy.Ingress
	default:
		return withStatus(2, fmt.Errorf("--direction %q: want egress or ingress", c.String("direction")))
	}
	if s := c.String("src"); s != "" {
		if fl.Src, err = netip.ParseAddrPort(s); err != nil {
			return withStatus(2, fmt.Errorf("--src %q: want IP:PORT", s))
		}
	}
	pins := policy.NewPins(0)
	if d := c.String("domain"); d != "" {
		pins.Add(dst.Addr(), d, time.Hour)
	}
	e, err := policy.Compile(f, policy.Options{Host: agent.HostAddrs(p), Pins: pins})
	if err != nil {
		return withStatus(1, err)
	}
	d := e.Check(fl)
	fmt.Fprintf(c.App.Writer, "%s\nby %s\n", d.Action, e.Describe(d.Rule))
	if sni := c.String("sni"); sni != "" {
		explainName(c, e, fl, d, sni)
	}
	if d := c.String("domain"); d != "" {
		q := e.CheckQuery(d)
		fmt.Fprintf(c.App.Writer, "resolving %s: %s by %s\n", d, q.Action, e.Describe(q.Rule))
	}
	fmt.Fprintf(c.App.Writer, "names no domain rule lists: %s\n", unlistedNames(f))
	return nil
}

// unlistedNames says how the policy treats a name no domain rule matches.
func unlistedNames(f *policy.File) string {
	switch {
	case f.DefaultAction == "allow":
		return "resolve (default_action allow)"
	case f.Resolve == policy.ResolveAll:
		return `resolve ("resolve": "all")`
	}
	return `NXDOMAIN ("resolve": "listed", the default under default_action ` + f.DefaultAction + `)`
}

// explainName says what becomes of a connection that asks for name once
// its first bytes are seen.
func explainName(c *cli.Context, e *policy.Engine, fl policy.Flow, d policy.Decision, name string) {
	w := c.App.Writer
	if !d.ByName && !d.PerRequest {
		fmt.Fprintf(w, "server name %s: not checked (the flow is decided by its address)\n", name)
		return
	}
	fl.Domain = name
	nd := e.Check(fl)
	fmt.Fprintf(w, "server name %s: %s by %s\n", name, nd.Action, e.Describe(nd.Rule))
	if nd.Action == policy.Allow && (nd.PerRequest || c.String("method") != "") {
		m := c.String("method")
		if m == "" {
			m = "GET"
		}
		rd := e.CheckRequest(fl, m, c.String("path"))
		fmt.Fprintf(w, "request %s %s%s: %s by %s (intercepted)\n", m, name, c.String("path"), rd.Action, e.Describe(rd.Rule))
	}
}

func suggest(c *cli.Context) error {
	if c.NArg() == 0 {
		return withStatus(2, errors.New("policy suggest: want one or more AUDITLOG files"))
	}
	depth := c.Int("suffix-depth")
	if depth < 0 || depth == 1 {
		return withStatus(2, fmt.Errorf("--suffix-depth %d: want 0 (exact names) or 2 and more labels", depth))
	}
	l := policy.NewLearner()
	used, bad := 0, 0
	for _, path := range c.Args().Slice() {
		fh, err := os.Open(path)
		if err != nil {
			return withStatus(1, err)
		}
		u, b, err := audit.LearnFrom(fh, l)
		fh.Close()
		if err != nil {
			return withStatus(1, fmt.Errorf("%s: %w", path, err))
		}
		used, bad = used+u, bad+b
	}
	f := l.Policy(policy.LearnOptions{SuffixDepth: depth})
	if out := c.String("output"); out != "" {
		if err := agent.WritePolicyFile(out, f); err != nil {
			return withStatus(1, fmt.Errorf("--output: %w", err))
		}
	} else {
		b, err := json.MarshalIndent(f, "", "  ")
		if err != nil {
			return withStatus(1, err)
		}
		fmt.Fprintf(c.App.Writer, "%s\n", b)
	}
	fmt.Fprintf(c.App.ErrWriter, "%d rules from %d decisions", len(f.Rules), used)
	if bad > 0 {
		fmt.Fprintf(c.App.ErrWriter, " (%d lines were no decision record)", bad)
	}
	if n := l.Dropped(); n > 0 {
		fmt.Fprintf(c.App.ErrWriter, " (%d destinations past the bound of %d left out)", n, policy.DefaultLearnMax)
	}
	fmt.Fprintln(c.App.ErrWriter)
	return nil
}

// explainPreset prints a preset of names (or, for "list", every preset
// with its description).
func explainPreset(c *cli.Context, name string) error {
	if name == "list" {
		for _, n := range policy.NamePresetNames() {
			p, _ := policy.LookupNamePreset(n)
			fmt.Fprintf(c.App.Writer, "%-12s %s\n", n, p.Description)
		}
		return nil
	}
	p, ok := policy.LookupNamePreset(name)
	if !ok {
		return withStatus(2, fmt.Errorf("--preset %q: want one of %s (or list)", name, strings.Join(policy.NamePresetNames(), ", ")))
	}
	fmt.Fprint(c.App.Writer, p.Explain())
	return nil
}

// showCommand is `msbtap policy show`.
func showCommand() *cli.Command {
	return &cli.Command{
		Name:      "show",
		Usage:     "print the effective policy in words, presets and groups expanded",
		ArgsUsage: "FILE|PRESET",
		OnUsageError: func(_ *cli.Context, err error, _ bool) error {
			return withStatus(2, err)
		},
		Action: func(c *cli.Context) error {
			if c.NArg() != 1 {
				return withStatus(2, errors.New("policy show: want exactly one FILE or PRESET"))
			}
			name := c.Args().First()
			f, err := policy.Load(name)
			if err != nil {
				return withStatus(1, err)
			}
			if _, ok := policy.Preset(name); ok {
				fmt.Fprintf(c.App.Writer, "preset %s\n", name)
			} else {
				fmt.Fprintf(c.App.Writer, "policy file %s\n", name)
			}
			policy.Show(c.App.Writer, f)
			return nil
		},
	}
}
