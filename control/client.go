package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/audit"
	"github.com/msbtap/msbtap/flow"
)

// Client talks to a control socket.
type Client struct {
	path string
	hc   *http.Client
}

// NewClient returns a client of the socket at path; nothing is dialled
// until a call.
func NewClient(path string) *Client {
	return &Client{path: path, hc: &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}}}}
}

// Close releases idle connections.
func (c *Client) Close() { c.hc.CloseIdleConnections() }

// do sends one request and decodes a JSON reply into out (if not nil); an
// error reply comes back as an error with the agent's message.
func (c *Client) do(hc *http.Client, method, path string, body io.Reader, out any) error {
	req, err := http.NewRequest(method, "http://msbtap"+path, body)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return c.dialErr(err)
	}
	defer resp.Body.Close()
	return decodeReply(resp, out)
}

func (c *Client) dialErr(err error) error {
	if ue, ok := err.(*url.Error); ok {
		err = ue.Err
	}
	return fmt.Errorf("control socket %s: %w", c.path, err)
}

func decodeReply(resp *http.Response, out any) error {
	if resp.StatusCode/100 != 2 {
		var e struct {
			Error string `json:"error"`
		}
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		if json.Unmarshal(b, &e) != nil || e.Error == "" {
			e.Error = string(bytes.TrimSpace(b))
		}
		return fmt.Errorf("%s (%s)", e.Error, resp.Status)
	}
	if out == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// Flows lists the open flows.
func (c *Client) Flows() ([]flow.Info, error) {
	var fs []flow.Info
	return fs, c.do(c.hc, "GET", "/v1/flows", nil, &fs)
}

// CloseFlow resets flow id.
func (c *Client) CloseFlow(id uint64) error {
	return c.do(c.hc, "DELETE", "/v1/flows/"+strconv.FormatUint(id, 10), nil, nil)
}

// Policy returns the policy in force, as JSON.
func (c *Client) Policy() (json.RawMessage, error) {
	var p json.RawMessage
	return p, c.do(c.hc, "GET", "/v1/policy", nil, &p)
}

// SetPolicy puts a policy (a policy file's contents) in force; with revoke
// the open flows it denies are reset, and their number returned.
func (c *Client) SetPolicy(raw []byte, revoke bool) (int, error) {
	var r struct {
		Revoked int `json:"revoked"`
	}
	path := "/v1/policy"
	if revoke {
		path += "?revoke=true"
	}
	return r.Revoked, c.do(c.hc, "PUT", path, bytes.NewReader(raw), &r)
}

// Events calls fn with each decision as the agent makes it, until ctx ends,
// the agent goes away or fn fails.
func (c *Client) Events(ctx context.Context, fn func(audit.Record) error) error {
	req, err := http.NewRequestWithContext(ctx, "GET", "http://msbtap/v1/events", nil)
	if err != nil {
		return err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return c.dialErr(err)
	}
	defer resp.Body.Close()
	if err := decodeReply(resp, nil); err != nil {
		return err
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var r audit.Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			return fmt.Errorf("event stream: %w", err)
		}
		if err := fn(r); err != nil {
			return err
		}
	}
	if ctx.Err() != nil {
		return nil
	}
	return sc.Err()
}

// Stats returns the agent's counters.
func (c *Client) Stats() (map[string][]Sample, error) {
	var s map[string][]Sample
	return s, c.do(c.hc, "GET", "/v1/stats", nil, &s)
}

// StartCapture has the agent write every frame to f, which the caller
// opened for writing; name labels it. f's descriptor travels with the
// request; the caller may close its copy afterwards.
func (c *Client) StartCapture(f *os.File, name string) error {
	raw, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var fd int
	raw.Control(func(u uintptr) { fd = int(u) })
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			conn, err := d.DialContext(ctx, "unix", c.path)
			if err != nil {
				return nil, err
			}
			return &fdPassingConn{UnixConn: conn.(*net.UnixConn), fd: fd}, nil
		}}}
	defer hc.CloseIdleConnections()
	err = c.do(hc, "PUT", "/v1/pcap?name="+url.QueryEscape(name), nil, nil)
	runtime.KeepAlive(f)
	return err
}

// fdPassingConn sends fd along with the first bytes it writes.
type fdPassingConn struct {
	*net.UnixConn
	fd   int
	once sync.Once
}

func (c *fdPassingConn) Write(b []byte) (int, error) {
	sent := false
	var n int
	var err error
	c.once.Do(func() {
		sent = true
		n, _, err = c.WriteMsgUnix(b, unix.UnixRights(c.fd), nil)
	})
	if sent {
		return n, err
	}
	return c.UnixConn.Write(b)
}

// StopCapture ends the capture.
func (c *Client) StopCapture() (CaptureInfo, error) {
	var ci CaptureInfo
	return ci, c.do(c.hc, "DELETE", "/v1/pcap", nil, &ci)
}

// RatesText are the rates as the socket speaks them: "50mbit", "20MB",
// "off".
type RatesText struct {
	Up       string  `json:"up"`
	Down     string  `json:"down"`
	NewConns float64 `json:"new_connections_per_second"`
}

// Rates returns the sandbox's rates.
func (c *Client) Rates() (RatesText, error) {
	var r RatesText
	return r, c.do(c.hc, "GET", "/v1/rates", nil, &r)
}

// SetRates changes the rates given (the others stay) and returns them all.
func (c *Client) SetRates(change map[string]any) (RatesText, error) {
	b, _ := json.Marshal(change)
	var r RatesText
	return r, c.do(c.hc, "PUT", "/v1/rates", bytes.NewReader(b), &r)
}

// SetSecret sets secret name to value.
func (c *Client) SetSecret(name string, value []byte) error {
	return c.do(c.hc, "PUT", "/v1/secrets/"+url.PathEscape(name), bytes.NewReader(value), nil)
}

// RemoveSecret removes secret name.
func (c *Client) RemoveSecret(name string) error {
	return c.do(c.hc, "DELETE", "/v1/secrets/"+url.PathEscape(name), nil, nil)
}
