package main

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gdamore/tcell/v2"

	"github.com/msbtap/msbtap/audit"
	"github.com/msbtap/msbtap/flow"
)

// fakeSource is an agent whose flows grow by fixed amounts each refresh.
type fakeSource struct {
	mu     sync.Mutex
	flows  []flow.Info
	grow   map[uint64]uint64 // bytes down added per Flows call
	closed []uint64
	events chan audit.Record
}

func (f *fakeSource) Flows() ([]flow.Info, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i := range f.flows {
		f.flows[i].BytesDown += f.grow[f.flows[i].ID]
	}
	return append([]flow.Info(nil), f.flows...), nil
}

func (f *fakeSource) Policy() (json.RawMessage, error) {
	return json.RawMessage(`{"default_action": "deny", "rules": [{"destination": {"domain": "fast.test"}, "action": "allow"},
		{"destination": {"group": "host"}, "action": "deny"}, {"destination": {"group": "public"}, "action": "allow"}]}`), nil
}

func (f *fakeSource) CloseFlow(id uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = append(f.closed, id)
	for i, fl := range f.flows {
		if fl.ID == id {
			f.flows = append(f.flows[:i], f.flows[i+1:]...)
			break
		}
	}
	return nil
}

func (f *fakeSource) Events(ctx context.Context, fn func(audit.Record) error) error {
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case r := <-f.events:
			fn(r)
		}
	}
}

// lockedScreen lets the test read what top shows while it draws: the
// simulation hands out its front buffer, which Show writes.
type lockedScreen struct {
	tcell.SimulationScreen
	mu sync.Mutex
}

func (l *lockedScreen) Show() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.SimulationScreen.Show()
}

// screenText returns the screen's lines, and the style of the first cell
// of each.
func screenText(s *lockedScreen) ([]string, []tcell.Style) {
	s.mu.Lock()
	defer s.mu.Unlock()
	cells, w, h := s.GetContents()
	lines := make([]string, h)
	styles := make([]tcell.Style, h)
	for y := 0; y < h; y++ {
		var b strings.Builder
		for x := 0; x < w; x++ {
			c := cells[y*w+x]
			if len(c.Runes) > 0 {
				b.WriteRune(c.Runes[0])
			} else {
				b.WriteByte(' ')
			}
		}
		lines[y] = strings.TrimRight(b.String(), " ")
		styles[y] = cells[y*w].Style
	}
	return lines, styles
}

func waitScreen(t *testing.T, s *lockedScreen, what string, cond func(lines []string, styles []tcell.Style) bool) []string {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		lines, styles := screenText(s)
		if cond(lines, styles) {
			return lines
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: never on screen:\n%s", what, strings.Join(lines, "\n"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func lineWith(lines []string, s string) int {
	for i, l := range lines {
		if strings.Contains(l, s) {
			return i
		}
	}
	return -1
}

func TestTop(t *testing.T) {
	src := &fakeSource{
		flows: []flow.Info{
			{ID: 3, Direction: "egress", Proto: "tcp", Src: "100.96.0.2:40001", Dst: "198.51.100.10:80", Domain: "slow.test", Rule: 2, AgeSecs: 9},
			{ID: 5, Direction: "egress", Proto: "tcp", Src: "100.96.0.2:40002", Dst: "198.51.100.11:443", Domain: "fast.test", Rule: 0, AgeSecs: 1},
		},
		grow:   map[uint64]uint64{3: 1000, 5: 1 << 20},
		events: make(chan audit.Record, 4),
	}
	s := &lockedScreen{SimulationScreen: tcell.NewSimulationScreen("")}
	if err := s.Init(); err != nil {
		t.Fatal(err)
	}
	defer s.Fini()
	s.SetSize(200, 30)
	done := make(chan error, 1)
	go func() { done <- runTop(context.Background(), src, s, "test.sock", 50*time.Millisecond) }()

	src.events <- audit.Record{Time: time.Now().Format(time.RFC3339Nano), FlowID: 5, Action: "allow", Proto: "tcp", RuleText: "rules[0]: allow egress to domain fast.test, as decided"}
	// Sorted by rate: the fast flow first, with the rule text of its own
	// decision (from the events); the other's from the policy in force.
	lines := waitScreen(t, s, "both flows, fast first, with rates", func(l []string, _ []tcell.Style) bool {
		f, sl := lineWith(l, "198.51.100.11:443"), lineWith(l, "198.51.100.10:80")
		return f > 0 && sl > f && strings.Contains(l[f], "fast.test, as decided") && strings.Contains(l[f], "MiB") &&
			strings.Contains(l[sl], "rules[2]: allow egress to group public")
	})
	if !strings.Contains(lines[lineWith(lines, "fast.test")], "allow") {
		t.Errorf("no decision column:\n%s", strings.Join(lines, "\n"))
	}

	// A denial from the events stream: listed, in red.
	src.events <- audit.Record{Time: time.Now().Format(time.RFC3339Nano), Action: "deny", Proto: "tcp", Src: "100.96.0.2:40100",
		Dst: "10.77.0.2:80", Rule: -1, RuleText: "default_action deny", Repeats: 2}
	waitScreen(t, s, "the denial, highlighted", func(l []string, st []tcell.Style) bool {
		i := lineWith(l, "10.77.0.2:80")
		if i < 0 || !strings.Contains(l[i], "default_action deny") || !strings.Contains(l[i], "×3") {
			return false
		}
		fg, _, attr := st[i].Decompose()
		return fg == tcell.ColorRed && attr&tcell.AttrBold != 0
	})

	// 's' sorts by bytes, then age: the old slow flow first.
	s.InjectKey(tcell.KeyRune, 's', 0)
	s.InjectKey(tcell.KeyRune, 's', 0)
	waitScreen(t, s, "sorted by age", func(l []string, _ []tcell.Style) bool {
		f, sl := lineWith(l, "198.51.100.11:443"), lineWith(l, "198.51.100.10:80")
		return lineWith(l, "sort: age") >= 0 && sl > 0 && f > sl
	})
	// The first row is selected; down, then x closes the fast flow.
	s.InjectKey(tcell.KeyDown, 0, 0)
	s.InjectKey(tcell.KeyRune, 'x', 0)
	waitScreen(t, s, "the closed flow gone", func(l []string, _ []tcell.Style) bool {
		return lineWith(l, "closed flow 5") >= 0 && lineWith(l, "fast.test") < 0
	})
	src.mu.Lock()
	closed := append([]uint64(nil), src.closed...)
	src.mu.Unlock()
	if len(closed) != 1 || closed[0] != 5 {
		t.Errorf("closed %v, want [5]", closed)
	}

	s.InjectKey(tcell.KeyRune, 'q', 0)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("q did not end top")
	}
}

func TestHumanBytes(t *testing.T) {
	for n, want := range map[float64]string{0: "0B", 1023: "1023B", 1536: "1.5KiB", 5 << 20: "5.0MiB"} {
		if got := humanBytes(n); got != want {
			t.Errorf("humanBytes(%v) = %q, want %q", n, got, want)
		}
	}
}
