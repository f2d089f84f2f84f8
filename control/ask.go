package control

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/ask"
)

// AskAPI is the part of the agent that answers asks; an API that has it
// gets the /v1/pending endpoints.
type AskAPI interface {
	Pending() []ask.Question
	Decide(id uint64, a ask.Answer) error
}

// decision is the body of POST /v1/pending/ID.
type decision struct {
	Allow  bool `json:"allow"`
	Always bool `json:"always"`
}

// peerUID is the uid of the process at the other end of r's connection.
func peerUID(r *http.Request) (int, bool) {
	pc, _ := r.Context().Value(connKey{}).(*peerConn)
	if pc == nil {
		return 0, false
	}
	raw, err := pc.SyscallConn()
	if err != nil {
		return 0, false
	}
	var cred *unix.Ucred
	raw.Control(func(fd uintptr) { cred, err = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) })
	if err != nil || cred == nil {
		return 0, false
	}
	return int(cred.Uid), true
}

func askRoutes(mux *http.ServeMux, api API, reply func(http.ResponseWriter, any, error)) {
	aa, ok := api.(AskAPI)
	if !ok {
		return
	}
	mux.HandleFunc("GET /v1/pending", func(w http.ResponseWriter, r *http.Request) { reply(w, aa.Pending(), nil) })
	mux.HandleFunc("POST /v1/pending/{id}", func(w http.ResponseWriter, r *http.Request) {
		id, err := strconv.ParseUint(r.PathValue("id"), 10, 64)
		if err != nil {
			reply(w, nil, fmt.Errorf("%w: question id %q", ErrBadRequest, r.PathValue("id")))
			return
		}
		var d decision
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4096)).Decode(&d); err != nil {
			reply(w, nil, fmt.Errorf("%w: want {\"allow\": BOOL, \"always\": BOOL}: %v", ErrBadRequest, err))
			return
		}
		by := "ctl"
		if uid, ok := peerUID(r); ok {
			by = fmt.Sprintf("ctl uid %d", uid)
		}
		err = aa.Decide(id, ask.Answer{Allow: d.Allow, Always: d.Always, By: by})
		if errors.Is(err, ask.ErrNoQuestion) {
			err = fmt.Errorf("%w: %v", ErrNotFound, err)
		}
		reply(w, map[string]any{"id": id, "allow": d.Allow, "always": d.Always}, err)
	})
}

// Pending lists the open questions of ask rules.
func (c *Client) Pending() ([]ask.Question, error) {
	var qs []ask.Question
	return qs, c.do(c.hc, "GET", "/v1/pending", nil, &qs)
}

// Decide answers question id.
func (c *Client) Decide(id uint64, allow, always bool) error {
	b, _ := json.Marshal(decision{Allow: allow, Always: always})
	return c.do(c.hc, "POST", "/v1/pending/"+strconv.FormatUint(id, 10), bytes.NewReader(b), nil)
}

// askCommands are ctl pending, allow and deny.
func askCommands(do func(func(*cli.Context, *Client) error) cli.ActionFunc, printJSON func(w io.Writer, v any) error, usage func(error) error) []*cli.Command {
	answer := func(allow bool) cli.ActionFunc {
		return do(func(c *cli.Context, cl *Client) error {
			id, err := strconv.ParseUint(c.Args().First(), 10, 64)
			if err != nil || c.NArg() != 1 {
				return usage(errors.New("want one question ID (msbtap ctl pending lists them)"))
			}
			if err := cl.Decide(id, allow, c.Bool("always")); err != nil {
				return err
			}
			verb := "allowed"
			if !allow {
				verb = "denied"
			}
			if c.Bool("always") {
				verb += " always (a rule of the live policy now)"
			}
			fmt.Fprintf(c.App.Writer, "%d %s\n", id, verb)
			return nil
		})
	}
	always := []cli.Flag{&cli.BoolFlag{Name: "always", Usage: "also add a rule for the destination to the live policy (and, with run --ask-save, to the policy file)"}}
	return []*cli.Command{
		{
			Name:  "pending",
			Usage: "list the flows an ask rule holds: question id, proto, destination, name, flows waiting, age",
			Flags: []cli.Flag{
				&cli.BoolFlag{Name: "json", Usage: "print JSON"},
				&cli.BoolFlag{Name: "watch", Usage: "keep watching: print each new question as it comes (one line each), until interrupted"},
			},
			Action: do(func(c *cli.Context, cl *Client) error {
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
		},
		{Name: "allow", Usage: "let the flows held on question ID go", ArgsUsage: "ID", Flags: always, Action: answer(true)},
		{Name: "deny", Usage: "refuse the flows held on question ID", ArgsUsage: "ID", Flags: always, Action: answer(false)},
	}
}

// watchPending prints each new question once, as a line a terminal (or a
// script reading it) can act on, polling twice a second.
func watchPending(c *cli.Context, cl *Client) error {
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
