package audit

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/policy"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func readRecords(t *testing.T, path string) []Record {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []Record
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var r Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("not JSON: %q", sc.Text())
		}
		out = append(out, r)
	}
	return out
}

func deny(dst string) (policy.Flow, policy.Decision) {
	return policy.Flow{Proto: policy.TCP, Src: netip.MustParseAddrPort("100.96.0.2:40000"), Dst: netip.MustParseAddrPort(dst)},
		policy.Decision{Action: policy.Deny, Rule: -1}
}

// TestFloodFoldsIntoFewLines: 10,000 denied SYNs to one address, ports
// varying, make two lines: the first, and one with the repeats.
func TestFloodFoldsIntoFewLines(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	l, err := Open(Options{Path: path, Window: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 10000; i++ {
		l.Decision(flow.Of(deny(fmt.Sprintf("198.51.100.9:%d", 1+i%60000))))
	}
	l.Close()
	rs := readRecords(t, path)
	if len(rs) != 2 || rs[0].Repeats != 0 || rs[1].Repeats != 9999 || rs[1].Until == "" {
		t.Fatalf("got %d lines: %+v", len(rs), rs)
	}
}

// TestTerminateAndFirstDenyNeverDropped: a full window drops allows and
// repeated denies, never a termination or the first deny of an address.
func TestTerminateAndFirstDenyNeverDropped(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	l, _ := Open(Options{Path: path, Window: time.Hour, MaxKeys: 10})
	allow := policy.Decision{Action: policy.Allow, Rule: 2}
	for i := 0; i < 10; i++ {
		f, _ := deny("198.51.100.1:80")
		f.Dst = netip.MustParseAddrPort(fmt.Sprintf("198.51.100.%d:80", 10+i))
		l.Decision(flow.Of(f, allow)) // fills the window
	}
	f, _ := deny("198.51.100.50:80")
	l.Decision(flow.Of(f, allow)) // dropped
	l.Decision(flow.Of(deny("198.51.100.51:22")))
	f, _ = deny("198.51.100.52:22")
	l.Decision(flow.Of(f, policy.Decision{Action: policy.Terminate, Rule: 0}))
	l.Close()
	var gotDeny, gotTerm, gotDropped bool
	for _, r := range readRecords(t, path) {
		gotDeny = gotDeny || r.Dst == "198.51.100.51:22"
		gotTerm = gotTerm || r.Action == "terminate"
		gotDropped = gotDropped || r.Dst == "198.51.100.50:80"
	}
	if !gotDeny || !gotTerm || gotDropped {
		t.Errorf("first deny logged %v, terminate logged %v, over-cap allow logged %v", gotDeny, gotTerm, gotDropped)
	}
	if l.Dropped() != 1 {
		t.Errorf("dropped %d, want 1", l.Dropped())
	}
}

// TestRotationBoundsTheFile: the log never grows past MaxBytes; the full
// file is kept as PATH.1.
func TestRotationBoundsTheFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.jsonl")
	l, _ := Open(Options{Path: path, MaxBytes: 4096, Window: time.Millisecond})
	for i := 0; i < 500; i++ {
		f, d := deny(fmt.Sprintf("198.51.%d.%d:80", i/250, i%250))
		l.Decision(flow.Of(f, d))
	}
	l.Close()
	for _, p := range []string{path, path + ".1"} {
		st, err := os.Stat(p)
		if err != nil || st.Size() > 4096 || st.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v size %d mode %v", p, err, st.Size(), st.Mode().Perm())
		}
	}
}

func TestRefusesSymlink(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "victim")
	os.WriteFile(target, []byte("precious\n"), 0o644)
	link := filepath.Join(dir, "audit.jsonl")
	os.Symlink(target, link)
	if _, err := Open(Options{Path: link}); err == nil || !strings.Contains(err.Error(), "symbolic link") {
		t.Fatalf("opened a symlink: %v", err)
	}
	if b, _ := os.ReadFile(target); string(b) != "precious\n" {
		t.Errorf("the link's target changed: %q", b)
	}
}

// TestSubscribe: a subscriber sees a decision at once, the same record the
// file gets; a slow one loses records instead of slowing the log.
func TestSubscribe(t *testing.T) {
	l, _ := Open(Options{Window: time.Hour})
	defer l.Close()
	ch, cancel := l.Subscribe(1)
	defer cancel()
	start := time.Now()
	f, d := deny("198.51.100.9:22")
	f.ID = 42
	l.Decision(flow.Of(f, d))
	select {
	case r := <-ch:
		if r.FlowID != 42 || r.Action != "deny" || r.Dst != "198.51.100.9:22" {
			t.Errorf("record %+v", r)
		}
		if took := time.Since(start); took > 100*time.Millisecond {
			t.Errorf("record came after %s", took)
		}
	case <-time.After(time.Second):
		t.Fatal("no record")
	}
	for i := 0; i < 5; i++ {
		f, d := deny(fmt.Sprintf("198.51.100.%d:22", 10+i))
		l.Decision(flow.Of(f, d))
	}
	time.Sleep(100 * time.Millisecond)
	if l.Lost() < 3 {
		t.Errorf("lost %d, want the records past the subscriber's buffer", l.Lost())
	}
}
