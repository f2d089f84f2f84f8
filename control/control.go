// Package control is msbtap's control socket: a Unix socket (mode 0600,
// owned by whoever ran sudo, peers checked) that serves HTTP and JSON, to
// list and reset flows, change the policy and the rates, stream the
// decisions, read the counters, capture frames and change secrets while the
// sandbox runs; and its client, which `msbtap ctl` drives. The socket is a
// file on the host: no address of the sandbox's network reaches it.
package control

import (
	"encoding/json"
	"errors"
	"os"

	"github.com/msbtap/msbtap/audit"
	"github.com/msbtap/msbtap/flow"
)

// Rates are the sandbox's rates: bytes a second each way ("up" what it
// sends), and TCP connections it may open a second; 0 means no limit. On
// the wire they are strings like "100mbit" or "20MB" (see units).
type Rates struct {
	Up, Down, NewConnsPerSecond float64
}

// API is what the socket drives; the agent implements it.
type API interface {
	Flows() []flow.Info
	CloseFlow(id uint64) bool
	// Policy returns the policy in force (JSON); SetPolicy validates and
	// swaps in a new one, and with revoke resets the open flows it denies.
	Policy() (json.RawMessage, error)
	SetPolicy(raw []byte, revoke bool) (revoked int, err error)
	// Events streams the decisions as the audit log records them.
	Events() (<-chan audit.Record, func())
	// Stats are the counters of /metrics.
	Stats() (map[string][]Sample, error)
	// StartCapture writes every frame to f, which the client opened;
	// StopCapture ends the capture, started here or by --pcap.
	StartCapture(f *os.File, name string) error
	StopCapture() (CaptureInfo, error)
	Rates() Rates
	SetRates(Rates) error
	SetSecret(name string, value []byte) error
	RemoveSecret(name string) error
}

// CaptureInfo is an ended capture: its file, and the frames written and
// dropped.
type CaptureInfo struct {
	File    string `json:"file"`
	Written uint64 `json:"frames_written"`
	Dropped uint64 `json:"frames_dropped"`
}

// Sample is one value of a metric, with its labels.
type Sample struct {
	Labels map[string]string `json:"labels,omitempty"`
	Value  float64           `json:"value"`
}

// Errors an API returns for the socket to answer with the right status.
var (
	ErrNotFound   = errors.New("not found")
	ErrBadRequest = errors.New("bad request")
	ErrConflict   = errors.New("conflict")
)
