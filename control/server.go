package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/internal/units"
)

// Server serves the control socket.
type Server struct {
	path string
	ln   net.Listener
	srv  *http.Server
	done chan struct{}
}

// Options say who may use the socket.
type Options struct {
	// UID and GID own the socket (the user who ran sudo, say; -1 keeps
	// root's). Only root and UID may talk to it.
	UID, GID int
	// Refuse, if set, refuses the connecting process pid even so: the
	// sandbox's own processes, which may run as UID.
	Refuse func(pid int) bool
	Log    *slog.Logger
}

// Listen creates the socket at path, mode 0600, owned by o.UID:o.GID, and
// serves api on it. The socket's mode keeps other users out, and each
// connection's peer credentials are checked too (see Options).
func Listen(path string, o Options, api API) (*Server, error) {
	log := o.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	uid, gid := o.UID, o.GID
	if err := removeStale(path); err != nil {
		return nil, err
	}
	old := syscall.Umask(0o177) // the socket is born 0600
	ln, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(true)
	if uid >= 0 {
		if err := os.Lchown(path, uid, gid); err != nil {
			ln.Close()
			return nil, fmt.Errorf("%s: %w", path, err)
		}
	}
	s := &Server{path: path, ln: ln, done: make(chan struct{})}
	s.srv = &http.Server{Handler: s.routes(api), ReadHeaderTimeout: 10 * time.Second,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context { return context.WithValue(ctx, connKey{}, c) }}
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(peerChecked{ln, uid, o.Refuse, log}); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("control socket stopped", "err", err)
		}
	}()
	return s, nil
}

// removeStale removes a socket nobody listens on any more, and refuses
// anything else at path.
func removeStale(path string) error {
	st, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if st.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("%s: exists and is not a socket", path)
	}
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return fmt.Errorf("%s: another msbtap listens there", path)
	}
	return os.Remove(path)
}

// peerChecked accepts only connections from root or uid, and not from a
// process refuse names.
type peerChecked struct {
	net.Listener
	uid    int
	refuse func(pid int) bool
	log    *slog.Logger
}

func (p peerChecked) Accept() (net.Conn, error) {
	for {
		c, err := p.Listener.Accept()
		if err != nil {
			return nil, err
		}
		uc, ok := c.(*net.UnixConn)
		if ok {
			if why := p.check(uc); why == "" {
				return &peerConn{UnixConn: uc}, nil
			} else {
				p.log.Warn("control connection refused", "reason", why)
			}
		}
		c.Close()
	}
}

// check returns why the peer of c may not use the socket ("" if it may).
func (p peerChecked) check(c *net.UnixConn) string {
	raw, err := c.SyscallConn()
	if err != nil {
		return err.Error()
	}
	var cred *unix.Ucred
	raw.Control(func(fd uintptr) { cred, err = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) })
	switch {
	case err != nil || cred == nil:
		return fmt.Sprintf("no peer credentials: %v", err)
	case cred.Uid != 0 && int(cred.Uid) != p.uid:
		return fmt.Sprintf("uid %d is neither root nor the socket's owner", cred.Uid)
	case p.refuse != nil && p.refuse(int(cred.Pid)):
		return fmt.Sprintf("pid %d runs inside the sandbox", cred.Pid)
	}
	return ""
}

// maxPassedFiles bounds the descriptors a client may pass on one
// connection; more are closed at once.
const maxPassedFiles = 2

// peerConn is a client's connection. It reads with recvmsg so that a file
// descriptor the client passes (SCM_RIGHTS: the capture file it opened, as
// itself) is kept for the request that wants it; any not taken are closed
// with the connection.
type peerConn struct {
	*net.UnixConn
	mu    sync.Mutex // mu protects files
	files []int
}

func (c *peerConn) Read(b []byte) (int, error) {
	oob := make([]byte, unix.CmsgSpace(4*maxPassedFiles))
	n, oobn, _, _, err := c.ReadMsgUnix(b, oob)
	if oobn > 0 {
		c.keep(oob[:oobn])
	}
	return max(n, 0), err // an error may come with -1
}

func (c *peerConn) keep(oob []byte) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			if len(c.files) < maxPassedFiles {
				c.files = append(c.files, fd)
			} else {
				unix.Close(fd)
			}
		}
	}
}

// takeFile returns the last descriptor the client passed, or nil.
func (c *peerConn) takeFile(name string) *os.File {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.files) == 0 {
		return nil
	}
	fd := c.files[len(c.files)-1]
	c.files = c.files[:len(c.files)-1]
	return os.NewFile(uintptr(fd), name)
}

func (c *peerConn) Close() error {
	c.mu.Lock()
	for _, fd := range c.files {
		unix.Close(fd)
	}
	c.files = nil
	c.mu.Unlock()
	return c.UnixConn.Close()
}

type connKey struct{}

// Close stops serving and removes the socket.
func (s *Server) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	err := s.srv.Shutdown(ctx) // event streams end with their contexts
	<-s.done
	return err
}

func (r Rates) wire() RatesText {
	f := func(b float64) string {
		if b <= 0 {
			return "off"
		}
		return strconv.FormatFloat(b*8/1e6, 'f', -1, 64) + "mbit"
	}
	return RatesText{Up: f(r.Up), Down: f(r.Down), NewConns: r.NewConnsPerSecond}
}

// ParseRate parses a rate as the socket and the flags take it ("off" or
// empty: no limit).
func ParseRate(s string) (float64, error) {
	if s == "" || s == "off" || s == "0" {
		return 0, nil
	}
	return units.ParseRate(s)
}

func (s *Server) routes(api API) http.Handler {
	mux := http.NewServeMux()
	flowRoutes(mux, api)
	policyRoutes(mux, api)
	mux.HandleFunc("GET /v1/events", func(w http.ResponseWriter, r *http.Request) { streamEvents(w, r, api) })
	mux.HandleFunc("GET /v1/stats", func(w http.ResponseWriter, r *http.Request) {
		st, err := api.Stats()
		reply(w, st, err)
	})
	captureRoutes(mux, api)
	rateRoutes(mux, api)
	secretRoutes(mux, api)
	askRoutes(mux, api)
	return mux
}

// reply writes v as JSON, or err with the status its kind calls for.
func reply(w http.ResponseWriter, v any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		code := http.StatusInternalServerError
		switch {
		case errors.Is(err, ErrNotFound):
			code = http.StatusNotFound
		case errors.Is(err, ErrBadRequest):
			code = http.StatusBadRequest
		case errors.Is(err, ErrConflict):
			code = http.StatusConflict
		}
		w.WriteHeader(code)
		json.NewEncoder(w).Encode(map[string]string{"error": err.Error()})
		return
	}
	json.NewEncoder(w).Encode(v)
}

// body reads a request's body, up to 4 MiB.
func body(r *http.Request) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r.Body, 4<<20))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadRequest, err)
	}
	return b, nil
}

func flowRoutes(mux *http.ServeMux, api API) {
	mux.HandleFunc("GET /v1/flows", func(w http.ResponseWriter, r *http.Request) { reply(w, api.Flows(), nil) })
	mux.HandleFunc("DELETE /v1/flows/{id}", func(w http.ResponseWriter, r *http.Request) {
		id, err := strconv.ParseUint(r.PathValue("id"), 10, 64)
		if err != nil {
			reply(w, nil, fmt.Errorf("%w: flow id %q", ErrBadRequest, r.PathValue("id")))
			return
		}
		if !api.CloseFlow(id) {
			reply(w, nil, fmt.Errorf("%w: no open flow %d", ErrNotFound, id))
			return
		}
		reply(w, map[string]uint64{"closed": id}, nil)
	})
}

func policyRoutes(mux *http.ServeMux, api API) {
	mux.HandleFunc("GET /v1/policy", func(w http.ResponseWriter, r *http.Request) {
		p, err := api.Policy()
		reply(w, p, err)
	})
	mux.HandleFunc("PUT /v1/policy", func(w http.ResponseWriter, r *http.Request) {
		b, err := body(r)
		if err != nil {
			reply(w, nil, err)
			return
		}
		n, err := api.SetPolicy(b, r.URL.Query().Get("revoke") == "true")
		reply(w, map[string]int{"revoked": n}, err)
	})
}

// streamEvents writes the decisions as JSON lines, each flushed, until
// the client goes.
func streamEvents(w http.ResponseWriter, r *http.Request, api API) {
	ch, cancel := api.Events()
	defer cancel()
	w.Header().Set("Content-Type", "application/x-ndjson")
	fl, _ := w.(http.Flusher)
	bw := bufio.NewWriter(w)
	enc := json.NewEncoder(bw)
	if fl != nil {
		bw.Flush()
		fl.Flush()
	}
	for {
		select {
		case <-r.Context().Done():
			return
		case rec := <-ch:
			if enc.Encode(rec) != nil || bw.Flush() != nil {
				return
			}
			if fl != nil {
				fl.Flush()
			}
		}
	}
}

func captureRoutes(mux *http.ServeMux, api API) {
	mux.HandleFunc("PUT /v1/pcap", func(w http.ResponseWriter, r *http.Request) {
		// The client opens the file itself and passes its descriptor: the
		// agent never creates a file on a client's say-so.
		name := r.URL.Query().Get("name")
		pc, _ := r.Context().Value(connKey{}).(*peerConn)
		var f *os.File
		if pc != nil {
			f = pc.takeFile(name)
		}
		if f == nil {
			reply(w, nil, fmt.Errorf("%w: pass the capture file's descriptor with the request (msbtap ctl pcap start FILE does)", ErrBadRequest))
			return
		}
		reply(w, map[string]string{"capturing": name}, api.StartCapture(f, name))
	})
	mux.HandleFunc("DELETE /v1/pcap", func(w http.ResponseWriter, r *http.Request) {
		c, err := api.StopCapture()
		reply(w, c, err)
	})
}

func rateRoutes(mux *http.ServeMux, api API) {
	mux.HandleFunc("GET /v1/rates", func(w http.ResponseWriter, r *http.Request) { reply(w, api.Rates().wire(), nil) })
	mux.HandleFunc("PUT /v1/rates", func(w http.ResponseWriter, r *http.Request) {
		cur := api.Rates().wire()
		if err := json.NewDecoder(r.Body).Decode(&cur); err != nil {
			reply(w, nil, fmt.Errorf("%w: %v", ErrBadRequest, err))
			return
		}
		var nr Rates
		var err1, err2 error
		nr.Up, err1 = ParseRate(cur.Up)
		nr.Down, err2 = ParseRate(cur.Down)
		nr.NewConnsPerSecond = cur.NewConns
		if err := errors.Join(err1, err2); err != nil || nr.NewConnsPerSecond < 0 {
			reply(w, nil, fmt.Errorf("%w: rates: %v", ErrBadRequest, err))
			return
		}
		err := api.SetRates(nr)
		reply(w, api.Rates().wire(), err)
	})
}

func secretRoutes(mux *http.ServeMux, api API) {
	mux.HandleFunc("PUT /v1/secrets/{name}", func(w http.ResponseWriter, r *http.Request) {
		b, err := body(r)
		if err == nil {
			err = api.SetSecret(r.PathValue("name"), b)
		}
		clear(b)
		reply(w, map[string]string{"set": r.PathValue("name")}, err)
	})
	mux.HandleFunc("DELETE /v1/secrets/{name}", func(w http.ResponseWriter, r *http.Request) {
		reply(w, map[string]string{"removed": r.PathValue("name")}, api.RemoveSecret(r.PathValue("name")))
	})
}
