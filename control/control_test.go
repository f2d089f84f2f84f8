package control

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/msbtap/msbtap/audit"
	"github.com/msbtap/msbtap/flow"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeAPI records what the socket asked of it.
type fakeAPI struct {
	mu      sync.Mutex
	closed  []uint64
	policy  []byte
	revoked bool
	rates   Rates
	secrets map[string]string
	events  chan audit.Record
	capture []byte
}

func (f *fakeAPI) Flows() []flow.Info {
	return []flow.Info{{ID: 7, Proto: "tcp", Src: "10.0.0.2:4000", Dst: "198.51.100.1:80", BytesDown: 1234}}
}
func (f *fakeAPI) CloseFlow(id uint64) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = append(f.closed, id)
	return id == 7
}
func (f *fakeAPI) Policy() (json.RawMessage, error) {
	return json.RawMessage(`{"default_action":"deny"}`), nil
}
func (f *fakeAPI) SetPolicy(raw []byte, revoke bool) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !json.Valid(raw) {
		return 0, errors.Join(ErrBadRequest, errors.New("not JSON"))
	}
	f.policy, f.revoked = raw, revoke
	return 2, nil
}
func (f *fakeAPI) Events() (<-chan audit.Record, func()) { return f.events, func() {} }
func (f *fakeAPI) Stats() (map[string][]Sample, error) {
	return map[string][]Sample{"msbtap_bytes_total": {{Labels: map[string]string{"direction": "tx"}, Value: 9}}}, nil
}
func (f *fakeAPI) StartCapture(file *os.File, name string) error {
	defer file.Close()
	_, err := file.Write([]byte("written by the agent"))
	return err
}
func (f *fakeAPI) StopCapture() (CaptureInfo, error) { return CaptureInfo{File: "x", Written: 3}, nil }
func (f *fakeAPI) Rates() Rates                      { return f.rates }
func (f *fakeAPI) SetRates(r Rates) error            { f.rates = r; return nil }
func (f *fakeAPI) SetSecret(name string, v []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.secrets[name] = string(v)
	return nil
}
func (f *fakeAPI) RemoveSecret(name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.secrets[name]; !ok {
		return ErrNotFound
	}
	delete(f.secrets, name)
	return nil
}

func serve(t *testing.T) (*fakeAPI, *Client, string) {
	t.Helper()
	api := &fakeAPI{secrets: map[string]string{}, events: make(chan audit.Record, 4)}
	path := filepath.Join(t.TempDir(), "ctl.sock")
	srv, err := Listen(path, Options{UID: os.Getuid(), GID: os.Getgid()}, api)
	if err != nil {
		t.Fatal(err)
	}
	cl := NewClient(path)
	t.Cleanup(func() { cl.Close(); srv.Close() })
	return api, cl, path
}

func TestSocketIsPrivate(t *testing.T) {
	_, _, path := serve(t)
	st, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, want a socket with 0600", st.Mode())
	}
	// A second agent on the same path is refused, and a file that is not
	// a socket is never removed.
	if _, err := Listen(path, Options{UID: -1, GID: -1}, &fakeAPI{}); err == nil {
		t.Fatal("a second listener took a live socket's path")
	}
	plain := filepath.Join(t.TempDir(), "plain")
	os.WriteFile(plain, []byte("keep"), 0o600)
	if _, err := Listen(plain, Options{UID: -1, GID: -1}, &fakeAPI{}); err == nil {
		t.Fatal("Listen replaced a regular file")
	}
}

func TestEndpoints(t *testing.T) {
	api, cl, _ := serve(t)
	fs, err := cl.Flows()
	if err != nil || len(fs) != 1 || fs[0].ID != 7 || fs[0].BytesDown != 1234 {
		t.Fatalf("flows: %+v %v", fs, err)
	}
	if err := cl.CloseFlow(7); err != nil {
		t.Fatal(err)
	}
	if err := cl.CloseFlow(8); err == nil {
		t.Fatal("closing a flow that is not open succeeded")
	}
	p, err := cl.Policy()
	if err != nil || string(p) != `{"default_action":"deny"}` {
		t.Fatalf("policy: %s %v", p, err)
	}
	if n, err := cl.SetPolicy([]byte(`{"rules":[]}`), true); err != nil || n != 2 || !api.wasRevoked() {
		t.Fatalf("set policy: %d %v", n, err)
	}
	if _, err := cl.SetPolicy([]byte(`{`), false); err == nil || !containsAll(err.Error(), "not JSON", "400") {
		t.Fatalf("a bad policy: %v", err)
	}
	st, err := cl.Stats()
	if err != nil || st["msbtap_bytes_total"][0].Value != 9 {
		t.Fatalf("stats: %v %v", st, err)
	}
	r, err := cl.SetRates(map[string]any{"down": "50mbit"})
	if err != nil || r.Down != "50mbit" || r.Up != "off" || api.Rates().Down != 50e6/8 {
		t.Fatalf("rates: %+v %+v %v", r, api.rates, err)
	}
	if _, err := cl.SetRates(map[string]any{"up": "fast"}); err == nil {
		t.Fatal("a bad rate was accepted")
	}
	if err := cl.SetSecret("token", []byte("s3cret")); err != nil || api.secret("token") != "s3cret" {
		t.Fatalf("secret: %v %v", api.secrets, err)
	}
	if err := cl.RemoveSecret("token"); err != nil {
		t.Fatal(err)
	}
	if err := cl.RemoveSecret("token"); err == nil || !containsAll(err.Error(), "404") {
		t.Fatalf("removing a missing secret: %v", err)
	}
}

func TestEventsStream(t *testing.T) {
	api, cl, _ := serve(t)
	ctx, cancel := context.WithCancel(context.Background())
	got := make(chan audit.Record, 1)
	done := make(chan error, 1)
	go func() {
		done <- cl.Events(ctx, func(r audit.Record) error { got <- r; return nil })
	}()
	api.events <- audit.Record{FlowID: 42, Action: "deny"}
	select {
	case r := <-got:
		if r.FlowID != 42 || r.Action != "deny" {
			t.Fatalf("event %+v", r)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no event")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// The capture file travels as a descriptor the client opened: the agent
// writes to it and never opens a path a client names.
func TestCaptureFileIsPassed(t *testing.T) {
	_, cl, path := serve(t)
	out := filepath.Join(t.TempDir(), "c.pcap")
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.StartCapture(f, out); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if b, _ := os.ReadFile(out); string(b) != "written by the agent" {
		t.Fatalf("file holds %q", b)
	}
	// A request without a descriptor is refused.
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "PUT /v1/pcap?name=/etc/x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
	b, _ := io.ReadAll(c)
	if !containsAll(string(b), "400", "descriptor") {
		t.Fatalf("reply %q", b)
	}
}

func containsAll(s string, subs ...string) bool {
	for _, x := range subs {
		if !strings.Contains(s, x) {
			return false
		}
	}
	return true
}

func (f *fakeAPI) secret(name string) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.secrets[name]
}

func (f *fakeAPI) wasRevoked() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.revoked
}

// A process the agent says runs in the sandbox is refused, whoever it is.
func TestRefusedPeer(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ctl.sock")
	var asked atomic.Int64
	srv, err := Listen(path, Options{UID: os.Getuid(), GID: os.Getgid(), Refuse: func(pid int) bool {
		asked.Store(int64(pid))
		return true
	}}, &fakeAPI{})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	cl := NewClient(path)
	defer cl.Close()
	if _, err := cl.Flows(); err == nil {
		t.Fatal("a refused peer got an answer")
	}
	if asked.Load() != int64(os.Getpid()) {
		t.Fatalf("Refuse was asked about pid %d, want ours (%d)", asked.Load(), os.Getpid())
	}
}
