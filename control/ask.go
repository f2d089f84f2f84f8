package control

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"

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

func askRoutes(mux *http.ServeMux, api API) {
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
