package agent

import (
	"bufio"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/msbtap/msbtap/internal/fielderr"
	"github.com/msbtap/msbtap/policy"
)

// auditEntry is one flow decision as queued on the packet path.
type auditEntry struct {
	at time.Time
	f  policy.Flow
	d  policy.Decision
}

// auditLine is one line of the decision log.
type auditLine struct {
	Time      string `json:"time"`
	Direction string `json:"direction"`
	Proto     string `json:"proto"`
	Transport string `json:"transport,omitempty"` // of a DNS query: udp or tcp
	Src       string `json:"src"`
	Dst       string `json:"dst,omitempty"`
	Domain    string `json:"domain,omitempty"`
	Rule      int    `json:"rule"`
	RuleText  string `json:"rule_text"`
	Action    string `json:"action"`
}

// auditLog writes one JSON line per flow decision. The packet path only
// queues the decision; a goroutine formats and writes it. When the queue is
// full the line is dropped and counted rather than stalling traffic.
type auditLog struct {
	ch      chan auditEntry
	w       *bufio.Writer
	c       io.Closer
	holder  *policy.Holder
	pins    *policy.Pins
	dropped atomic.Uint64
	done    chan struct{}
	once    sync.Once
}

func openAudit(path string, holder *policy.Holder, pins *policy.Pins, log *slog.Logger) (*auditLog, error) {
	if path == "" {
		return nil, nil
	}
	var w io.Writer
	var c io.Closer
	if path == "-" {
		w = os.Stdout
	} else {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
		if err != nil {
			return nil, fielderr.Wrap("audit_log", err)
		}
		w, c = f, f
	}
	a := &auditLog{ch: make(chan auditEntry, 4096), w: bufio.NewWriter(w), c: c, holder: holder, pins: pins, done: make(chan struct{})}
	go a.routineWrite(log)
	return a, nil
}

// Log queues one decision. A nil log ignores it.
func (a *auditLog) Log(f policy.Flow, d policy.Decision) {
	if a == nil {
		return
	}
	select {
	case a.ch <- auditEntry{at: time.Now(), f: f, d: d}:
	default:
		a.dropped.Add(1)
	}
}

// Dropped returns the lines lost to a full queue.
func (a *auditLog) Dropped() uint64 {
	if a == nil {
		return 0
	}
	return a.dropped.Load()
}

func (a *auditLog) routineWrite(log *slog.Logger) {
	defer close(a.done)
	enc := json.NewEncoder(a.w)
	for e := range a.ch {
		l := auditLine{
			Time:      e.at.UTC().Format(time.RFC3339Nano),
			Direction: e.f.Direction.String(),
			Proto:     protoLabel(e.f),
			Src:       addrLabel(e.f.Src.String()),
			Dst:       addrLabel(e.f.Dst.String()),
			Domain:    e.f.Domain,
			Rule:      e.d.Rule,
			RuleText:  ruleLabel(e.d, a.holder.Load()),
			Action:    e.d.Action.String(),
		}
		if e.f.DNS {
			l.Dst = ""
			l.Transport = e.f.Proto.String()
		}
		if l.Domain == "" && e.f.Dst.IsValid() {
			if names := a.pins.Lookup(e.f.Dst.Addr()); len(names) > 0 {
				l.Domain = names[0]
			}
		}
		if err := enc.Encode(&l); err != nil {
			log.Error("audit log write failed", "err", err)
		}
		if len(a.ch) == 0 {
			a.w.Flush()
		}
	}
	a.w.Flush()
}

// Close drains the queue and closes the file.
func (a *auditLog) Close() error {
	if a == nil {
		return nil
	}
	a.once.Do(func() {
		close(a.ch)
		<-a.done
		if a.c != nil {
			a.c.Close()
		}
	})
	return nil
}
