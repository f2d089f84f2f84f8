package agent

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"sort"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/msbtap/msbtap/audit"
	"github.com/msbtap/msbtap/capture"
	"github.com/msbtap/msbtap/control"
	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/internal/fielderr"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/tap"
)

// controller is the agent as the control socket drives it (control.API).
type controller struct {
	a    *Agent
	reg  *prometheus.Registry // what /metrics serves
	pump *tap.Pump            // whose frames a capture sees

	mu  sync.Mutex // mu serialises policy swaps and captures
	cap *capture.Capture
}

var _ control.API = (*controller)(nil)

// startControl serves the control socket, if configured, and starts the
// --pcap capture. Both happen during set-up, while the agent may still
// create files and change their owner.
func (a *Agent) startControl(pump *tap.Pump) error {
	a.ctl.pump = pump
	if a.cfg.Pcap != "" {
		c, err := capture.StartRotating(a.cfg.Pcap, a.cfg.PcapMaxBytes, a.rotator("pcap", a.cfg.Pcap, os.O_WRONLY|os.O_CREATE|os.O_TRUNC))
		if err != nil {
			return fielderr.Wrap("pcap", err)
		}
		a.ctl.set(c)
	}
	a.onClose(func() { a.ctl.StopCapture() })
	if a.cfg.Control == "" {
		return nil
	}
	srv, err := control.Listen(a.cfg.Control, control.Options{UID: a.cfg.ControlUID, GID: a.cfg.ControlGID,
		Refuse: a.inSandbox, Log: a.log.With("component", "control")}, a.ctl)
	if err != nil {
		return fielderr.Wrap("control", err)
	}
	a.onClose(func() { srv.Close() })
	a.log.Info("control socket", "path", a.cfg.Control, "owner_uid", a.cfg.ControlUID)
	return nil
}

// set makes cp the running capture.
func (c *controller) set(cp *capture.Capture) {
	c.cap = cp
	c.pump.SetCapture(cp.Frame)
}

func (c *controller) Flows() []flow.Info {
	pins := c.a.popts.Pins
	return c.a.gw.Flows(func(ip netip.Addr) string {
		if names := pins.Lookup(ip); len(names) > 0 {
			return names[0]
		}
		return ""
	})
}

func (c *controller) CloseFlow(id uint64) bool {
	ok := c.a.gw.CloseFlow(id)
	if ok {
		c.a.log.Info("flow closed through the control socket", "flow_id", id)
	}
	return ok
}

func (c *controller) Policy() (json.RawMessage, error) {
	return json.Marshal(c.a.policyFile.Load())
}

// SetPolicy validates raw as a policy file, swaps it in for new flows, and
// with revoke resets the open flows it denies.
func (c *controller) SetPolicy(raw []byte, revoke bool) (int, error) {
	f, err := policy.ParseFile(raw)
	if err != nil {
		return 0, fmt.Errorf("%w: %v", control.ErrBadRequest, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.a.setPolicy(f, "control socket"); err != nil {
		return 0, fmt.Errorf("%w: %v", control.ErrBadRequest, err)
	}
	if !revoke {
		return 0, nil
	}
	n := c.a.gw.Revoke()
	c.a.log.Info("open flows the new policy denies were reset", "flows", n)
	return n, nil
}

func (c *controller) Events() (<-chan audit.Record, func()) { return c.a.audit.Subscribe(1024) }

// Stats gathers the counters /metrics serves, as name → samples. A
// histogram or summary gives NAME_count and NAME_sum.
func (c *controller) Stats() (map[string][]control.Sample, error) {
	fams, err := c.reg.Gather()
	if err != nil {
		return nil, err
	}
	out := make(map[string][]control.Sample, len(fams))
	for _, mf := range fams {
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, lp := range m.GetLabel() {
				labels[lp.GetName()] = lp.GetValue()
			}
			if len(labels) == 0 {
				labels = nil
			}
			add := func(name string, v float64) {
				out[name] = append(out[name], control.Sample{Labels: labels, Value: v})
			}
			switch mf.GetType() {
			case dto.MetricType_COUNTER:
				add(mf.GetName(), m.GetCounter().GetValue())
			case dto.MetricType_GAUGE:
				add(mf.GetName(), m.GetGauge().GetValue())
			case dto.MetricType_UNTYPED:
				add(mf.GetName(), m.GetUntyped().GetValue())
			case dto.MetricType_SUMMARY:
				add(mf.GetName()+"_count", float64(m.GetSummary().GetSampleCount()))
				add(mf.GetName()+"_sum", m.GetSummary().GetSampleSum())
			case dto.MetricType_HISTOGRAM, dto.MetricType_GAUGE_HISTOGRAM:
				add(mf.GetName()+"_count", float64(m.GetHistogram().GetSampleCount()))
				add(mf.GetName()+"_sum", m.GetHistogram().GetSampleSum())
			}
		}
	}
	for _, s := range out {
		sort.SliceStable(s, func(i, j int) bool { return fmt.Sprint(s[i].Labels) < fmt.Sprint(s[j].Labels) })
	}
	return out, nil
}

func (c *controller) StartCapture(f *os.File, name string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cap != nil {
		f.Close()
		return fmt.Errorf("%w: already capturing to %s; stop that first", control.ErrConflict, c.cap.Path())
	}
	cp, err := capture.StartFile(f, name, c.a.cfg.PcapMaxBytes)
	if err != nil {
		return fmt.Errorf("%w: %v", control.ErrBadRequest, err)
	}
	c.set(cp)
	c.a.log.Info("capture started through the control socket", "file", name)
	return nil
}

func (c *controller) StopCapture() (control.CaptureInfo, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cap == nil {
		return control.CaptureInfo{}, fmt.Errorf("%w: no capture running", control.ErrNotFound)
	}
	c.pump.SetCapture(nil)
	c.cap.Close()
	w, d := c.cap.Stats()
	ci := control.CaptureInfo{File: c.cap.Path(), Written: w, Dropped: d}
	c.cap = nil
	return ci, nil
}

func (c *controller) Rates() control.Rates {
	up, down, conns := c.a.gw.Rates()
	return control.Rates{Up: up, Down: down, NewConnsPerSecond: conns}
}

func (c *controller) SetRates(r control.Rates) error {
	c.a.gw.SetRates(r.Up, r.Down, r.NewConnsPerSecond)
	c.a.log.Info("rates changed through the control socket", "up_bytes_per_second", r.Up, "down_bytes_per_second", r.Down,
		"new_connections_per_second", r.NewConnsPerSecond)
	return nil
}

// inSandbox reports whether control-socket peer pid runs in the sandbox
// (Config.InSandbox; without it, none does).
func (a *Agent) inSandbox(pid int) bool {
	return a.cfg.InSandbox != nil && a.cfg.InSandbox(pid)
}
