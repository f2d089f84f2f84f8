package control

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/msbtap/msbtap/ask"
)

// askFake is a fakeAPI that answers asks.
type askFake struct {
	fakeAPI
	mu      sync.Mutex
	answers []ask.Answer
}

func (f *askFake) Pending() []ask.Question {
	return []ask.Question{{ID: 3, Proto: "tcp", Dst: "198.51.100.7:443", Name: "api.example.test", Waiting: 2}}
}

func (f *askFake) Decide(id uint64, a ask.Answer) error {
	if id != 3 {
		return fmt.Errorf("%w: %d", ask.ErrNoQuestion, id)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.answers = append(f.answers, a)
	return nil
}

// TestAskEndpoints: the questions are listed, answered with who answered
// (the peer's uid), and an unknown id is 404; an API without asks has no
// such endpoints.
func TestAskEndpoints(t *testing.T) {
	api := &askFake{fakeAPI: fakeAPI{secrets: map[string]string{}}}
	path := filepath.Join(t.TempDir(), "ctl.sock")
	srv, err := Listen(path, Options{UID: os.Getuid(), GID: os.Getgid()}, api)
	if err != nil {
		t.Fatal(err)
	}
	cl := NewClient(path)
	defer func() { cl.Close(); srv.Close() }()
	qs, err := cl.Pending()
	if err != nil || len(qs) != 1 || qs[0].Name != "api.example.test" || qs[0].Waiting != 2 {
		t.Fatalf("pending: %+v %v", qs, err)
	}
	if err := cl.Decide(3, true, true); err != nil {
		t.Fatal(err)
	}
	if err := cl.Decide(4, false, false); err == nil || !containsAll(err.Error(), "no open question", "404") {
		t.Errorf("unknown question: %v", err)
	}
	want := ask.Answer{Allow: true, Always: true, By: fmt.Sprintf("ctl uid %d", os.Getuid())}
	if len(api.answers) != 1 || api.answers[0] != want {
		t.Errorf("answers: %+v, want %+v", api.answers, want)
	}

	_, plain, _ := serve(t)
	if _, err := plain.Pending(); err == nil || !containsAll(err.Error(), "404") {
		t.Errorf("pending on an API without asks: %v", err)
	}
}
