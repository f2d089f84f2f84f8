package main

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/gdamore/tcell/v2"

	"github.com/msbtap/msbtap/audit"
	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/policy"
)

// topSource is what `ctl top` needs of the control socket (a *Client, or
// a fake in the tests).
type topSource interface {
	Flows() ([]flow.Info, error)
	CloseFlow(id uint64) error
	Events(ctx context.Context, fn func(audit.Record) error) error
	Policy() (json.RawMessage, error)
}

// Sort orders of the flow table, cycled with 's'.
var topSorts = []string{"rate", "bytes", "age", "id"}

const (
	maxDenials   = 200  // denials kept for the list, newest first
	maxRuleTexts = 4096 // open flows' rule texts learnt from the events
)

type topRow struct {
	flow.Info
	upRate, downRate float64 // bytes a second over the last refresh
	ruleText         string
}

type topSample struct {
	up, down uint64
	at       time.Time
}

// top is the state of `ctl top`: the open flows with their rates, and the
// denials the events stream reported.
type top struct {
	src   topSource
	title string

	mu       sync.Mutex // mu protects everything below
	rows     []topRow
	prev     map[uint64]topSample
	rules    map[uint64]string // flow id → rule text, from the events
	policy   *policy.Engine    // the policy in force, for flows opened before top started
	denials  []audit.Record    // newest last
	sortIdx  int
	selID    uint64 // the selected flow (0: the first)
	status   string
	err      string
	refreshd time.Time
}

func newTop(src topSource, title string) *top {
	return &top{src: src, title: title, prev: make(map[uint64]topSample), rules: make(map[uint64]string)}
}

// event takes one record of the events stream.
func (t *top) event(r audit.Record) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if r.Action != "allow" {
		t.denials = append(t.denials, r)
		if len(t.denials) > maxDenials {
			t.denials = t.denials[len(t.denials)-maxDenials:]
		}
		return
	}
	if r.FlowID != 0 && r.RuleText != "" {
		if len(t.rules) >= maxRuleTexts {
			clear(t.rules)
		}
		t.rules[r.FlowID] = r.RuleText
	}
}

// refresh reads the flows and works out each one's rate since the last
// refresh.
func (t *top) refresh(now time.Time) {
	fs, err := t.src.Flows()
	var eng *policy.Engine
	if raw, perr := t.src.Policy(); perr == nil {
		if f, perr := policy.ParseFile(raw); perr == nil {
			eng, _ = policy.Compile(f, policy.Options{})
		}
	}
	t.mu.Lock()
	if eng != nil {
		t.policy = eng
	}
	defer t.mu.Unlock()
	if err != nil {
		t.err = err.Error()
		return
	}
	t.err = ""
	t.refreshd = now
	rows := make([]topRow, len(fs))
	next := make(map[uint64]topSample, len(fs))
	for i, f := range fs {
		r := topRow{Info: f, ruleText: t.rules[f.ID]}
		if p, ok := t.prev[f.ID]; ok {
			if dt := now.Sub(p.at).Seconds(); dt > 0 {
				r.upRate = float64(f.BytesUp-min(p.up, f.BytesUp)) / dt
				r.downRate = float64(f.BytesDown-min(p.down, f.BytesDown)) / dt
			}
		}
		next[f.ID] = topSample{f.BytesUp, f.BytesDown, now}
		rows[i] = r
	}
	t.prev = next
	for id := range t.rules { // forget the rule texts of closed flows
		if _, ok := next[id]; !ok && len(t.rules) > len(next)+maxRuleTexts/2 {
			delete(t.rules, id)
		}
	}
	t.rows = rows
	t.sortLocked()
}

func (t *top) sortLocked() {
	rs := t.rows
	switch topSorts[t.sortIdx] {
	case "rate":
		sort.SliceStable(rs, func(i, j int) bool {
			a, b := rs[i].upRate+rs[i].downRate, rs[j].upRate+rs[j].downRate
			if a != b {
				return a > b
			}
			return rs[i].ID < rs[j].ID
		})
	case "bytes":
		sort.SliceStable(rs, func(i, j int) bool {
			a, b := rs[i].BytesUp+rs[i].BytesDown, rs[j].BytesUp+rs[j].BytesDown
			if a != b {
				return a > b
			}
			return rs[i].ID < rs[j].ID
		})
	case "age":
		sort.SliceStable(rs, func(i, j int) bool { return rs[i].AgeSecs > rs[j].AgeSecs })
	default:
		sort.SliceStable(rs, func(i, j int) bool { return rs[i].ID < rs[j].ID })
	}
}

// selectedLocked returns the index of the selected row (-1: no rows).
func (t *top) selectedLocked() int {
	for i, r := range t.rows {
		if r.ID == t.selID {
			return i
		}
	}
	if len(t.rows) == 0 {
		return -1
	}
	t.selID = t.rows[0].ID
	return 0
}

// key handles a key press; it reports false when top should end.
func (t *top) key(ev *tcell.EventKey) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	move := func(d int) {
		i := t.selectedLocked()
		if i < 0 {
			return
		}
		i = max(0, min(len(t.rows)-1, i+d))
		t.selID = t.rows[i].ID
	}
	switch ev.Key() {
	case tcell.KeyCtrlC, tcell.KeyEscape:
		return false
	case tcell.KeyUp:
		move(-1)
	case tcell.KeyDown:
		move(1)
	case tcell.KeyDelete:
		t.closeSelectedLocked()
	case tcell.KeyRune:
		switch ev.Rune() {
		case 'q':
			return false
		case 'k':
			move(-1)
		case 'j':
			move(1)
		case 'x':
			t.closeSelectedLocked()
		case 's':
			t.sortIdx = (t.sortIdx + 1) % len(topSorts)
			t.sortLocked()
			t.status = "sorted by " + topSorts[t.sortIdx]
		}
	}
	return true
}

func (t *top) closeSelectedLocked() {
	i := t.selectedLocked()
	if i < 0 {
		t.status = "no flow to close"
		return
	}
	r := t.rows[i]
	// The call is quick (a local socket); the lock keeps the view still.
	if err := t.src.CloseFlow(r.ID); err != nil {
		t.status = fmt.Sprintf("close flow %d: %v", r.ID, err)
		return
	}
	t.status = fmt.Sprintf("closed flow %d (%s %s → %s)", r.ID, r.Proto, r.Src, r.Dst)
}

// humanBytes writes n bytes in binary units.
func humanBytes(n float64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB"}
	i := 0
	for n >= 1024 && i < len(units)-1 {
		n /= 1024
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%.0f%s", n, units[i])
	}
	return fmt.Sprintf("%.1f%s", n, units[i])
}

var (
	styleTitle  = tcell.StyleDefault.Reverse(true).Bold(true)
	styleHeader = tcell.StyleDefault.Bold(true).Underline(true)
	styleAllow  = tcell.StyleDefault.Foreground(tcell.ColorGreen)
	styleDeny   = tcell.StyleDefault.Foreground(tcell.ColorRed).Bold(true)
	styleSel    = tcell.StyleDefault.Reverse(true)
	styleDim    = tcell.StyleDefault.Dim(true)
)

// put writes s at x, y, clipped to the width w; it returns the x after it.
func put(s tcell.Screen, x, y, w int, st tcell.Style, str string) int {
	for _, r := range str {
		if x >= w {
			break
		}
		s.SetContent(x, y, r, nil, st)
		x++
	}
	return x
}

// fill pads a line to the width in style st.
func fill(s tcell.Screen, x, y, w int, st tcell.Style) {
	for ; x < w; x++ {
		s.SetContent(x, y, ' ', nil, st)
	}
}

var topColumns = []struct {
	name  string
	width int
}{
	{"ID", 6}, {"DIR", 8}, {"PROTO", 6}, {"SRC", 24}, {"DST", 24}, {"NAME", 22}, {"DECISION", 9},
	{"UP", 10}, {"DOWN", 10}, {"UP/s", 10}, {"DOWN/s", 10}, {"AGE", 7},
	{"RULE", 0}, // the rest of the line
}

func cell(v string, w int) string {
	if w == 0 {
		return v
	}
	if len(v) >= w {
		if w > 1 {
			return v[:w-2] + "… "
		}
		return v[:w]
	}
	return v + strings.Repeat(" ", w-len(v))
}

// draw renders the view: a title, the flows in the upper part, the
// denials in what is left (at least a few lines), a status line.
func (t *top) draw(s tcell.Screen) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s.Clear()
	w, h := s.Size()
	t.drawTitleLocked(s, w)
	denialLines := min(len(t.denials), max(3, (h-6)/3))
	flowLines := max(0, h-5-denialLines-1)
	t.drawFlowsLocked(s, w, flowLines)
	t.drawDenialsLocked(s, w, 3+flowLines, h-1)
	status := t.status
	if t.err != "" {
		status = "error: " + t.err
	}
	put(s, 0, h-1, w, styleDim, status)
	s.Show()
}

// drawTitleLocked draws the title, the keys and the flows' column heads.
func (t *top) drawTitleLocked(s tcell.Screen, w int) {
	var up, down float64
	for _, r := range t.rows {
		up += r.upRate
		down += r.downRate
	}
	title := fmt.Sprintf(" msbtap top  %s  %s  %d flows  up %s/s  down %s/s  %d denials  sort: %s ",
		t.title, t.refreshd.Format("15:04:05"), len(t.rows), humanBytes(up), humanBytes(down), len(t.denials), topSorts[t.sortIdx])
	fill(s, put(s, 0, 0, w, styleTitle, title), 0, w, styleTitle)
	put(s, 0, 1, w, styleDim, " keys: ↑/↓ select  x close the selected flow  s sort  q quit")
	x := 0
	for _, c := range topColumns {
		x = put(s, x, 2, w, styleHeader, cell(c.name, c.width))
	}
}

// drawFlowsLocked draws as many flows as fit in lines from line 3,
// scrolled to keep the selected one in view.
func (t *top) drawFlowsLocked(s tcell.Screen, w, lines int) {
	sel := t.selectedLocked()
	start := 0
	if sel >= lines && lines > 0 {
		start = sel - lines + 1
	}
	y := 3
	for i := start; i < len(t.rows) && y < 3+lines; i++ {
		vals := t.flowCellsLocked(t.rows[i])
		x := 0
		for j, c := range topColumns {
			st := tcell.StyleDefault
			if j == 6 {
				st = styleAllow
			}
			if i == sel {
				st = styleSel
			}
			x = put(s, x, y, w, st, cell(vals[j], c.width))
		}
		if i == sel {
			fill(s, x, y, w, styleSel)
		}
		y++
	}
}

// flowCellsLocked is a flow's row, a value for each of topColumns.
func (t *top) flowCellsLocked(r topRow) []string {
	rule := r.ruleText
	if rule == "" && t.policy != nil {
		rule = t.policy.Describe(r.Rule)
	}
	if rule == "" {
		rule = ruleLabel(r.Rule)
	}
	return []string{fmt.Sprint(r.ID), r.Direction, r.Proto, r.Src, r.Dst, r.Domain, "allow",
		humanBytes(float64(r.BytesUp)), humanBytes(float64(r.BytesDown)), humanBytes(r.upRate), humanBytes(r.downRate),
		(time.Duration(r.AgeSecs * float64(time.Second))).Round(time.Second).String(), rule}
}

// drawDenialsLocked draws the denials, newest first, from line y to
// before line end.
func (t *top) drawDenialsLocked(s tcell.Screen, w, y, end int) {
	put(s, 0, y, w, styleHeader, "recent denials, newest first")
	y++
	for i := len(t.denials) - 1; i >= 0 && y < end; i-- {
		d := t.denials[i]
		when := d.Time
		if tm, err := time.Parse(time.RFC3339Nano, d.Time); err == nil {
			when = tm.Local().Format("15:04:05")
		}
		dst := d.Dst
		if d.Domain != "" {
			dst += " (" + d.Domain + ")"
		}
		line := fmt.Sprintf("%s  %-9s %-4s %s → %s  %s", when, d.Action, d.Proto, d.Src, dst, d.RuleText)
		if d.Reason != "" {
			line += "  " + d.Reason
		}
		if d.Repeats > 0 {
			line += fmt.Sprintf("  ×%d", d.Repeats+1)
		}
		put(s, 0, y, w, styleDeny, line)
		y++
	}
}

func ruleLabel(i int) string {
	if i < 0 {
		return "default_action"
	}
	return fmt.Sprintf("rules[%d]", i)
}

// runTop shows the view on s (initialised) until the user quits or ctx
// ends.
func runTop(ctx context.Context, src topSource, s tcell.Screen, title string, every time.Duration) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	t := newTop(src, title)
	wake := func() { _ = s.PostEvent(tcell.NewEventInterrupt(nil)) }
	go func() {
		// The stream ends with the agent; the table shows the error then.
		_ = src.Events(ctx, func(r audit.Record) error { t.event(r); wake(); return nil })
	}()
	t.refresh(time.Now())
	go func() {
		tk := time.NewTicker(every)
		defer tk.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-tk.C:
				t.refresh(now)
				wake()
			}
		}
	}()
	go func() { <-ctx.Done(); wake() }()
	for {
		t.draw(s)
		switch ev := s.PollEvent().(type) {
		case nil:
			return nil
		case *tcell.EventKey:
			if !t.key(ev) {
				return nil
			}
		case *tcell.EventResize:
			s.Sync()
		}
		if ctx.Err() != nil {
			return nil
		}
	}
}
