package ask

import (
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/msbtap/msbtap/policy"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var (
	src = netip.MustParseAddrPort("100.96.0.2:40000")
	dst = netip.MustParseAddrPort("198.51.100.7:443")
)

// waitPending waits until n flows wait on the questions.
func waitPending(t *testing.T, a *Asker, n int) []Question {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		qs := a.Pending()
		w := 0
		for _, q := range qs {
			w += q.Waiting
		}
		if w == n {
			return qs
		}
		if time.Now().After(deadline) {
			t.Fatalf("waiting flows: %d, want %d (%+v)", w, n, qs)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestOneQuestionPerDestination: 200 flows to one name are one question;
// an answer lets them all go, stands for the name, and is reported once.
func TestOneQuestionPerDestination(t *testing.T) {
	var reported []Answer
	var mu sync.Mutex
	a := New(Options{MaxWaiting: 300, Report: func(q Question, ans Answer) { mu.Lock(); reported = append(reported, ans); mu.Unlock() }})
	defer a.Close()
	var wg sync.WaitGroup
	results := make(chan bool, 200)
	for i := 0; i < 200; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			results <- a.Ask(context.Background(), "tcp", "ask.example.test", netip.AddrPortFrom(src.Addr(), uint16(40000+i)), dst)
		}(i)
	}
	qs := waitPending(t, a, 200)
	if len(qs) != 1 || qs[0].Name != "ask.example.test" || qs[0].Dst != dst.String() || qs[0].Proto != "tcp" {
		t.Fatalf("questions: %+v", qs)
	}
	if err := a.Decide(qs[0].ID, Answer{Allow: true, By: "ctl uid 0"}); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	close(results)
	for ok := range results {
		if !ok {
			t.Fatal("a held flow was refused after an allow")
		}
	}
	if act, ok := a.Answer("ask.example.test", netip.Addr{}); !ok || act != policy.Allow {
		t.Errorf("standing answer: %v %v", act, ok)
	}
	if !a.Ask(context.Background(), "tcp", "ask.example.test", src, dst) {
		t.Error("a flow to the answered name was held again")
	}
	if len(a.Pending()) != 0 || len(reported) != 1 || reported[0].By != "ctl uid 0" {
		t.Errorf("pending %v, reported %+v", a.Pending(), reported)
	}
	if err := a.Decide(qs[0].ID, Answer{}); !errors.Is(err, ErrNoQuestion) {
		t.Errorf("a second answer: %v", err)
	}
}

func TestTimeoutDeniesAndStands(t *testing.T) {
	var by string
	a := New(Options{Timeout: 100 * time.Millisecond, Grace: time.Hour, Report: func(q Question, ans Answer) { by = ans.By }})
	defer a.Close()
	start := time.Now()
	if a.Ask(context.Background(), "tcp", "", src, dst) {
		t.Fatal("allowed without an answer")
	}
	if took := time.Since(start); took < 100*time.Millisecond || took > 2*time.Second {
		t.Errorf("timed out after %s", took)
	}
	if by != "timeout" {
		t.Errorf("reported by %q", by)
	}
	if act, ok := a.Answer("", dst.Addr()); !ok || act != policy.Deny {
		t.Errorf("the timeout's deny does not stand for the address: %v %v", act, ok)
	}
}

func TestBounds(t *testing.T) {
	a := New(Options{MaxQuestions: 2, MaxWaiting: 3})
	defer a.Close()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for _, n := range []string{"a.test", "b.test", "b.test"} {
		wg.Add(1)
		go func(n string) { defer wg.Done(); a.Ask(ctx, "tcp", n, src, dst) }(n)
	}
	waitPending(t, a, 3)
	if a.Ask(context.Background(), "tcp", "c.test", src, dst) {
		t.Error("a third question was opened past MaxQuestions")
	}
	if a.Ask(context.Background(), "tcp", "a.test", src, dst) {
		t.Error("a fourth flow was held past MaxWaiting")
	}
	if a.Refused() != 2 {
		t.Errorf("refused %d, want 2", a.Refused())
	}
	cancel()
	wg.Wait()
}

func TestExecAndAlways(t *testing.T) {
	var rules []policy.FileRule
	a := New(Options{
		Exec: func(ctx context.Context, q Question) (Answer, error) {
			if q.Name == "yes.test" {
				return Answer{Allow: true, Always: true}, nil
			}
			return Answer{Always: true}, nil
		},
		Always: func(q Question, allow bool) error { rules = append(rules, Rule(q, allow)); return nil },
	})
	defer a.Close()
	if !a.Ask(context.Background(), "tcp", "yes.test", src, dst) {
		t.Error("ask-exec said allow")
	}
	if a.Ask(context.Background(), "dns", "no.test", src, netip.AddrPort{}) {
		t.Error("ask-exec said deny")
	}
	if len(rules) != 2 || rules[0].Destination.Domain != "yes.test" || rules[0].Action != "allow" || rules[0].Ports[0].Start != 443 ||
		rules[0].Protocols[0] != "tcp" || rules[1].Destination.Domain != "no.test" || rules[1].Action != "deny" || rules[1].Ports != nil {
		t.Errorf("rules: %+v", rules)
	}
	if r := Rule(Question{Proto: "dns", Name: "look.test"}, true); r.Protocols[0] != "dns" || r.Ports != nil {
		t.Errorf("always allow for a lookup: %+v", r)
	}
	if r := Rule(Question{Proto: "tcp", addr: dst.Addr(), port: 22}, true); r.Destination.CIDR != "198.51.100.7" || r.Ports[0].Start != 22 {
		t.Errorf("always allow for an address: %+v", r)
	}
	for _, r := range rules {
		if _, err := policy.ParseFile(mustJSON(t, policy.File{DefaultAction: "deny", Rules: []policy.FileRule{r}})); err != nil {
			t.Errorf("rule %+v: %v", r, err)
		}
	}
}

func TestCloseDeniesHeldFlows(t *testing.T) {
	a := New(Options{})
	done := make(chan bool)
	go func() { done <- a.Ask(context.Background(), "tcp", "x.test", src, dst) }()
	waitPending(t, a, 1)
	a.Close()
	if <-done {
		t.Error("allowed at close")
	}
	if a.Ask(context.Background(), "tcp", "y.test", src, dst) {
		t.Error("asked after close")
	}
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
