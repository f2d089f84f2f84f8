package process

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/msbtap/msbtap/agent"
	"github.com/msbtap/msbtap/internal/fielderr"
	"github.com/msbtap/msbtap/plan"
	"github.com/msbtap/msbtap/tap/taptest"
	"github.com/msbtap/msbtap/upstream"
)

// TestUpstreamCredentialsNeverReachTheCommand: the upstream proxy's
// credentials are a secret like the others. Their variable never takes
// msbtap's value in the command's environment, even under a name the
// allow-list passes on (LC_*); --env naming it is refused with an env
// error. (The network is built on taptest: no root needed.)
func TestUpstreamCredentialsNeverReachTheCommand(t *testing.T) {
	b := make([]byte, 12)
	rand.Read(b)
	pass := hex.EncodeToString(b)
	t.Setenv("LC_PROXY_AUTH", "user:"+pass)
	pl, err := plan.ForSlot(7)
	if err != nil {
		t.Fatal(err)
	}
	netCfg := func(env ...string) agent.Config {
		return agent.Config{Link: taptest.New(16), Plan: pl, ForCommand: true, CommandEnv: env, DNSUpstreams: []string{"127.0.0.1:1"},
			Upstream: upstream.Config{URL: "http://127.0.0.1:3128", CredentialsEnv: "LC_PROXY_AUTH"}}
	}
	a, err := agent.New(netCfg())
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	p := &Process{cfg: Config{Config: netCfg(), Command: []string{"sh"}}, net: a}
	env, err := p.commandEnv()
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range env {
		if strings.Contains(kv, pass) {
			t.Errorf("the command's environment holds the proxy's password: %s", kv)
		}
	}
	for _, e := range []string{"LC_PROXY_AUTH", "LC_PROXY_AUTH=mine"} {
		a, err := agent.New(netCfg(e))
		if err == nil {
			a.Close()
		}
		var fe *fielderr.Error
		if !errors.As(err, &fe) || fe.Field != "env" || strings.Contains(err.Error(), pass) {
			t.Errorf("--env %s: %v, want an env error without the value", e, err)
		}
	}
}

// TestTrimmerReadsTheNetworkSafely: the memory trimmer starts before the
// network exists and reads its activity from its own goroutine; the
// network New keeps later reaches it without a data race (go test -race).
func TestTrimmerReadsTheNetworkSafely(t *testing.T) {
	pl, err := plan.ForSlot(8)
	if err != nil {
		t.Fatal(err)
	}
	a, err := agent.New(agent.Config{Link: taptest.New(16), Plan: pl, DNSUpstreams: []string{"127.0.0.1:1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	p := &Process{}
	stop := startTrimmer(0, p.activity)
	defer stop()
	time.Sleep(50 * time.Millisecond) // the trimmer has read once
	p.setNetwork(a)
	p.activity()
}
