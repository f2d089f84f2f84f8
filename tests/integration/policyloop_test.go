package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/msbtap/msbtap/internal/testkit/testenv"
)

// Registry stand-ins: a test host on the "internet" that serves HTTPS and
// HTTP under the names of real registries, and a DNS server that answers
// those names with its address (and msbtap uses as its upstream).
const (
	registryHost4 = "198.51.100.31"
	registryDNS4  = "198.51.100.54"
	// elsewhereName is on the same test host but in no preset.
	elsewhereName = "elsewhere.example.test"
)

// startRegistries serves names (and elsewhereName) on registryHost4, with
// the test DNS server on registryDNS4 answering them, and points the
// world's msbtap at it. It returns the CA file the HTTPS server's
// certificate chains to.
func startRegistries(t *testing.T, w *testenv.World, names ...string) (ca string) {
	t.Helper()
	w.Inet.MustRun(t, "ip", "addr", "add", registryHost4+"/32", "dev", "lo")
	w.Inet.MustRun(t, "ip", "addr", "add", registryDNS4+"/32", "dev", "lo")
	dir := t.TempDir()
	ca, ready := filepath.Join(dir, "registry-ca.pem"), filepath.Join(dir, "ready")
	// A "name=address" entry is a record for another address alone.
	var all, records []string
	for _, n := range append(append([]string{}, names...), elsewhereName) {
		if name, addr, ok := strings.Cut(n, "="); ok {
			records = append(records, name+"="+addr)
			continue
		}
		all = append(all, n)
		records = append(records, n+"="+registryHost4)
	}
	args := []string{w.Testhost, "serve", "--https", registryHost4 + ":443", "--http", registryHost4 + ":80",
		"--tls-names", strings.Join(all, ","), "--tls-ca-out", ca, "--dns", registryDNS4 + ":53", "--ready", ready}
	for _, r := range records {
		args = append(args, "--record", r)
	}
	w.Inet.Start(t, args...)
	deadline := time.Now().Add(10 * time.Second)
	for !fileExists(ready) {
		if time.Now().After(deadline) {
			t.Fatal("registry stand-ins not ready")
		}
		time.Sleep(20 * time.Millisecond)
	}
	w.DNSUpstream = registryDNS4
	return ca
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// curlGuest runs curl in the sandbox and returns its output and whether
// it succeeded.
func curlGuest(w *testenv.World, ca string, args ...string) (string, bool) {
	full := append([]string{"curl", "-sS", "--max-time", "8", "--cacert", ca}, args...)
	out, err := w.Guest.Run(full...)
	return strings.TrimSpace(out), err == nil
}

// TestPresetAllowsItsNamesOnly: under --policy none --allow pypi,debian,
// curl in the sandbox reaches pypi.org and files.pythonhosted.org over
// HTTPS and deb.debian.org over plain HTTP (the debian preset's port 80);
// pypi.org on port 80 (not a pypi port), another name on the very same
// address (by SNI), that name's lookup, and an address never looked up are
// all refused.
func TestPresetAllowsItsNamesOnly(t *testing.T) {
	testenv.RequireTools(t, "curl", "dig")
	w := testenv.NewWorld(t)
	ca := startRegistries(t, w, "pypi.org", "files.pythonhosted.org", "deb.debian.org")
	w.StartAgent(t, "--policy", "none", "--allow", "pypi,debian")

	for _, url := range []string{"https://pypi.org/simple/", "https://files.pythonhosted.org/packages/x.whl", "http://deb.debian.org/debian/dists/"} {
		out, ok := curlGuest(w, ca, url)
		host := strings.SplitN(strings.SplitN(url, "//", 2)[1], "/", 2)[0]
		if !ok || !strings.Contains(out, "hello from testhost "+host) {
			t.Errorf("%s: allowed by the preset, got ok=%v %q", url, ok, out)
		}
	}
	if out, ok := curlGuest(w, ca, "http://pypi.org/simple/"); ok {
		t.Errorf("pypi.org on port 80 (pypi's preset says 443): got through: %q", out)
	}
	// The same address, pinned to pypi.org, asked for another name.
	if out, ok := curlGuest(w, ca, "--resolve", elsewhereName+":443:"+registryHost4, "https://"+elsewhereName+"/"); ok {
		t.Errorf("a name outside the preset on a preset name's address: got through: %q", out)
	}
	if out, _ := w.Guest.Run("dig", "+time=3", "+tries=1", elsewhereName); !strings.Contains(out, "status: NXDOMAIN") {
		t.Errorf("a name outside the presets resolved:\n%s", out)
	}
	if out, ok := curlGuest(w, ca, "http://"+testenv.WebHost4+"/"); ok {
		t.Errorf("an address never looked up: got through: %q", out)
	}
	if !strings.Contains(w.AgentLog.String(), "server name "+elsewhereName+" is not allowed") {
		t.Errorf("the refusal by server name is not in the log")
	}
}

// TestLearnRoundTrip: a workload (curl to two names, one over HTTPS and
// one over plain HTTP, a dig of a third, UDP to a bare address) runs
// under --policy none --learn; SIGUSR1 and the exit write a policy that
// policy check accepts and that names what was used; under that policy
// the same workload works and a new destination (another name, another
// port, another address) is refused. policy suggest on the run's decision
// log gives the same policy.
func TestLearnRoundTrip(t *testing.T) {
	testenv.RequireTools(t, "curl", "dig")
	w := testenv.NewWorld(t)
	ca := startRegistries(t, w, "pypi.org", "files.pythonhosted.org", "look.example.test")
	dir := t.TempDir()
	learned, auditLog := filepath.Join(dir, "learned.json"), filepath.Join(dir, "audit.log")
	workload := func(what string) {
		t.Helper()
		if out, ok := curlGuest(w, ca, "https://pypi.org/simple/"); !ok || !strings.Contains(out, "hello from testhost pypi.org") {
			t.Errorf("%s: https://pypi.org: ok=%v %q", what, ok, out)
		}
		if out, ok := curlGuest(w, ca, "http://files.pythonhosted.org/x.whl"); !ok || !strings.Contains(out, "hello from testhost files.pythonhosted.org") {
			t.Errorf("%s: http://files.pythonhosted.org: ok=%v %q", what, ok, out)
		}
		if out, _ := w.Guest.Run("dig", "+short", "+time=3", "+tries=1", "look.example.test"); strings.TrimSpace(out) != registryHost4 {
			t.Errorf("%s: dig look.example.test: %q", what, out)
		}
		if ok, out := reach(t, w, "udp", testenv.WebHost4+":7002"); !ok {
			t.Errorf("%s: udp to a bare address: %s", what, out)
		}
	}

	w.StartAgent(t, "--policy", "none", "--learn", learned, "--audit-log", auditLog)
	workload("learning")
	if err := w.Agent.Process.Signal(syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !fileExists(learned) && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if !fileExists(learned) {
		t.Fatalf("SIGUSR1 wrote no learned policy")
	}
	w.StopAgent(t)
	b, err := os.ReadFile(learned)
	if err != nil {
		t.Fatal(err)
	}
	pol := string(b)
	t.Logf("learned policy:\n%s", pol)
	for _, want := range []string{`"domain": "pypi.org"`, `"domain": "files.pythonhosted.org"`, `"domain": "look.example.test"`, `"cidr": "` + testenv.WebHost4 + `"`, `"default_action": "deny"`} {
		if !strings.Contains(pol, want) {
			t.Errorf("the learned policy lacks %s", want)
		}
	}
	// Each name with the port it was used on, nothing more (the three
	// names share one address).
	for _, want := range []string{
		`"domain": "files.pythonhosted.org"
      },
      "protocols": [
        "tcp"
      ],
      "ports": [
        {
          "start": 80,
          "end": 80
        }
      ],`,
		`"domain": "look.example.test"
      },
      "protocols": [
        "dns"
      ],
      "action"`,
		`"domain": "pypi.org"
      },
      "protocols": [
        "tcp"
      ],
      "ports": [
        {
          "start": 443,
          "end": 443
        }
      ],`} {
		if !strings.Contains(pol, want) {
			t.Errorf("the learned policy lacks %s", want)
		}
	}
	if strings.Contains(pol, registryHost4) {
		t.Errorf("the learned policy names the address %s where names are known", registryHost4)
	}
	if out, err := exec.Command(w.Msbtap, "policy", "check", learned).CombinedOutput(); err != nil {
		t.Errorf("policy check of the learned policy: %v\n%s", err, out)
	}
	// The decision log of the same run gives a policy for the same
	// destinations (the log folds repeats, so it may say less of which
	// name asked for what).
	suggested := filepath.Join(dir, "suggested.json")
	if out, err := exec.Command(w.Msbtap, "policy", "suggest", "-o", suggested, auditLog).CombinedOutput(); err != nil {
		t.Errorf("policy suggest: %v\n%s", err, out)
	} else if out, err := exec.Command(w.Msbtap, "policy", "check", suggested).CombinedOutput(); err != nil {
		t.Errorf("policy check of the suggested policy: %v\n%s", err, out)
	} else {
		s, _ := os.ReadFile(suggested)
		for _, want := range []string{`"domain": "pypi.org"`, `"domain": "files.pythonhosted.org"`, `"domain": "look.example.test"`, `"cidr": "` + testenv.WebHost4 + `"`} {
			if !strings.Contains(string(s), want) {
				t.Errorf("the suggested policy lacks %s:\n%s", want, s)
			}
		}
	}

	w.StartAgent(t, "--policy", learned)
	workload("under the learned policy")
	if out, ok := curlGuest(w, ca, "https://"+elsewhereName+"/"); ok {
		t.Errorf("a new name: got through: %q", out)
	}
	if out, ok := curlGuest(w, ca, "http://pypi.org/simple/"); ok {
		t.Errorf("a learned name on a new port: got through: %q", out)
	}
	if ok, out := reach(t, w, "tcp", testenv.WebHost4+":80"); ok {
		t.Errorf("a learned address on a new protocol and port: got through: %s", out)
	}
}

// askWorld is a world whose msbtap asks: its control socket and decision
// log, and a way to drive msbtap ctl.
type askWorld struct {
	*testenv.World
	t        *testing.T
	ca, sock string
	auditLog string
	// policyFile is the policy msbtap runs under.
	policyFile string
}

func newAskWorld(t *testing.T, policyJSON string, extra ...string) *askWorld {
	testenv.RequireTools(t, "curl", "dig")
	w := testenv.NewWorld(t)
	aw := &askWorld{World: w, t: t}
	aw.ca = startRegistries(t, w, "allow.ask.test", "deny.ask.test", "timeout.ask.test", "always.ask.test",
		"yes.ask.test", "no.ask.test", "look.example.test", "flood.ask.test="+testenv.WebHost4)
	dir := t.TempDir()
	aw.sock, aw.auditLog = filepath.Join(dir, "ctl.sock"), filepath.Join(dir, "audit.log")
	aw.policyFile = writePolicy(t, policyJSON)
	w.StartAgent(t, append([]string{"--policy", aw.policyFile, "--control", aw.sock, "--audit-log", aw.auditLog}, extra...)...)
	return aw
}

func (aw *askWorld) ctl(args ...string) (string, error) {
	out, err := exec.Command(aw.Msbtap, append([]string{"ctl", "--control", aw.sock}, args...)...).CombinedOutput()
	return string(out), err
}

type pendingQ struct {
	ID      uint64 `json:"id"`
	Proto   string `json:"proto"`
	Name    string `json:"name"`
	Dst     string `json:"dst"`
	Waiting int    `json:"waiting"`
}

func (aw *askWorld) pending() []pendingQ {
	aw.t.Helper()
	out, err := aw.ctl("pending", "--json")
	if err != nil {
		aw.t.Fatalf("ctl pending: %v\n%s", err, out)
	}
	var qs []pendingQ
	if err := json.Unmarshal([]byte(out), &qs); err != nil {
		aw.t.Fatalf("ctl pending: %v\n%s", err, out)
	}
	return qs
}

// waitQuestion waits for the question about name and returns it.
func (aw *askWorld) waitQuestion(name string) pendingQ {
	aw.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		for _, q := range aw.pending() {
			if q.Name == name {
				return q
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	aw.t.Fatalf("no question about %s; pending: %+v", name, aw.pending())
	return pendingQ{}
}

// curlAsync starts curl in the sandbox; the channel gets its output and
// error when it ends.
func (aw *askWorld) curlAsync(args ...string) (<-chan string, <-chan error) {
	out, errc := make(chan string, 1), make(chan error, 1)
	cmd := aw.Guest.Command(append([]string{"curl", "-sS", "--max-time", "25", "--cacert", aw.ca}, args...)...)
	go func() {
		b, err := cmd.CombinedOutput()
		out <- strings.TrimSpace(string(b))
		errc <- err
	}()
	return out, errc
}

// auditHas reports whether a line of the decision log has every one of
// subs.
func (aw *askWorld) auditHas(subs ...string) bool {
	b, _ := os.ReadFile(aw.auditLog)
lines:
	for _, l := range strings.Split(string(b), "\n") {
		for _, sub := range subs {
			if !strings.Contains(l, sub) {
				continue lines
			}
		}
		return true
	}
	return false
}

// TestAskCtl: curl to a name an ask rule holds waits (no answer from the
// server) until msbtap ctl decides: allow after 2 s (the connection
// completes, not reset), deny (reset at once), no answer (the timeout
// refuses it); allow --always puts a rule in the live policy, so the next
// connection is decided by it, not asked; 200 SYNs to one held host are one
// question; a metadata address and an explicit deny are never asked; under
// default ask, a lookup is held and answered too. Every answer is in the
// decision log with who gave it.
func TestAskCtl(t *testing.T) {
	aw := newAskWorld(t, `{"default_action": "deny", "rules": [
		{"destination": {"domain": "deny-me.ask.test"}, "action": "deny"},
		{"destination": {"domain_suffix": "ask.test"}, "action": "ask"}]}`, "--ask-timeout", "8s")

	// A terminal watching for questions.
	watch := exec.Command(aw.Msbtap, "ctl", "--control", aw.sock, "pending", "--watch")
	var watched testenv.Buffer
	watch.Stdout, watch.Stderr = &watched, &watched
	if err := watch.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { watch.Process.Kill(); watch.Wait() }()

	// Allow, after 2 s of waiting.
	out, errc := aw.curlAsync("https://allow.ask.test/x")
	q := aw.waitQuestion("allow.ask.test")
	if q.Proto != "tcp" || q.Dst != registryHost4+":443" || q.Waiting < 1 {
		t.Errorf("question: %+v", q)
	}
	time.Sleep(2 * time.Second)
	select {
	case err := <-errc:
		t.Fatalf("curl ended while its flow was held: %v %s", err, <-out)
	default:
	}
	// Held: nothing dialled, no relayed flow.
	if o, _ := aw.ctl("flows"); strings.Contains(o, registryHost4+":443") {
		t.Errorf("a held flow was dialled:\n%s", o)
	}
	if o, err := aw.ctl("allow", fmt.Sprint(q.ID)); err != nil {
		t.Fatalf("ctl allow: %v %s", err, o)
	}
	if o, err := <-out, <-errc; err != nil || !strings.Contains(o, "hello from testhost allow.ask.test") {
		t.Errorf("allowed after 2 s: %v %q", err, o)
	}
	if want := fmt.Sprintf("ask %d: tcp allow.ask.test %s:443", q.ID, registryHost4); !strings.Contains(watched.String(), want) {
		t.Errorf("ctl pending --watch did not show %q:\n%s", want, watched.String())
	}

	// Deny: refused at once.
	out, errc = aw.curlAsync("https://deny.ask.test/")
	q = aw.waitQuestion("deny.ask.test")
	if o, err := aw.ctl("deny", fmt.Sprint(q.ID)); err != nil {
		t.Fatalf("ctl deny: %v %s", err, o)
	}
	start := time.Now()
	select {
	case o := <-out:
		if err := <-errc; err == nil || !strings.Contains(o, "Couldn't connect") {
			t.Errorf("denied: want the connection reset, got %v %q", err, o)
		}
	case <-time.After(3 * time.Second):
		t.Errorf("denied: curl still waits %s after the deny", time.Since(start))
		<-out
		<-errc
	}

	// No answer: the timeout (8 s) refuses it.
	start = time.Now()
	out, errc = aw.curlAsync("https://timeout.ask.test/")
	aw.waitQuestion("timeout.ask.test")
	if o, err := <-out, <-errc; err == nil || time.Since(start) < 7*time.Second || time.Since(start) > 20*time.Second {
		t.Errorf("timeout: %v %q after %s", err, o, time.Since(start))
	}

	// Always: a rule of the live policy; the next connection is decided
	// by that rule.
	out, errc = aw.curlAsync("https://always.ask.test/")
	q = aw.waitQuestion("always.ask.test")
	if o, err := aw.ctl("allow", "--always", fmt.Sprint(q.ID)); err != nil {
		t.Fatalf("ctl allow --always: %v %s", err, o)
	}
	if o, err := <-out, <-errc; err != nil {
		t.Errorf("allowed always: %v %q", err, o)
	}
	pol, _ := aw.ctl("policy", "get")
	if !strings.Contains(pol, `"domain": "always.ask.test"`) {
		t.Errorf("the live policy lacks the always rule: %s", pol)
	}
	if o, ok := curlGuest(aw.World, aw.ca, "https://always.ask.test/again"); !ok {
		t.Errorf("second connection after always: %q", o)
	}
	if !aw.auditHas(`"domain":"always.ask.test","rule":1,"rule_text":"rules[1]: allow egress tcp to domain always.ask.test ports 443"`) {
		t.Errorf("the second connection was not decided by the always rule")
	}

	// Another name on always.ask.test's address, without a lookup: the
	// SYN goes in by the address's answered name, the server name is
	// asked at the ClientHello, and allowed 6 s later (past the 5 s a
	// client has for its first bytes) the connection completes.
	out, errc = aw.curlAsync("--resolve", "yes.ask.test:443:"+registryHost4, "https://yes.ask.test/late")
	q = aw.waitQuestion("yes.ask.test")
	time.Sleep(6 * time.Second)
	if o, err := aw.ctl("allow", fmt.Sprint(q.ID)); err != nil {
		t.Fatalf("ctl allow: %v %s", err, o)
	}
	if o, err := <-out, <-errc; err != nil || !strings.Contains(o, "hello from testhost yes.ask.test") {
		t.Errorf("a server name allowed after 6 s: %v %q", err, o)
	}

	// 200 SYNs to one held host: one question.
	if o, err := aw.Guest.Run("dig", "+short", "flood.ask.test"); err != nil || strings.TrimSpace(o) != testenv.WebHost4 {
		t.Fatalf("dig flood.ask.test: %v %q", err, o)
	}
	rssBefore := agentRSS(aw.AgentPID())
	flood := aw.Guest.Command(aw.Testhost, "hold", testenv.WebHost4+":80", "200", "1")
	if err := flood.Start(); err != nil {
		t.Fatal(err)
	}
	q = aw.waitQuestion("flood.ask.test")
	time.Sleep(1500 * time.Millisecond)
	qs := aw.pending()
	if len(qs) != 1 || qs[0].Waiting < 150 {
		t.Errorf("200 SYNs to one host: want one question with them all waiting, got %+v", qs)
	}
	t.Logf("agent RSS %s before, %s with %d flows held on one question", rssBefore, agentRSS(aw.AgentPID()), qs[0].Waiting)
	aw.ctl("deny", fmt.Sprint(q.ID))
	flood.Wait()

	// Never asked: metadata, an explicit deny.
	for _, tc := range []struct{ what, url string }{
		{"metadata", "http://169.254.169.254/"},
		{"an explicit deny", "https://deny-me.ask.test/"},
	} {
		start := time.Now()
		if o, ok := curlGuest(aw.World, aw.ca, tc.url); ok || time.Since(start) > 3*time.Second {
			t.Errorf("%s: want a prompt refusal, got ok=%v %q after %s", tc.what, ok, o, time.Since(start))
		}
	}
	if qs := aw.pending(); len(qs) != 0 {
		t.Errorf("questions left: %+v", qs)
	}
	for _, want := range []string{"answered allow by ctl uid 0", "answered deny by ctl uid 0", "answered deny by timeout", "answered allow always by ctl uid 0"} {
		if !aw.auditHas(want) {
			t.Errorf("the decision log lacks %q", want)
		}
	}
}

// TestAskLookupAndExec: under default ask, a lookup is held until
// --ask-exec answers; the program allows one name (always: with
// --ask-save the rule is in the policy file too) and denies another.
func TestAskLookupAndExec(t *testing.T) {
	dir := t.TempDir()
	script, envOut := filepath.Join(dir, "ask.sh"), filepath.Join(dir, "env.txt")
	// A value in msbtap's environment (where --secret values live) that
	// --ask-exec must not see.
	probe := fmt.Sprintf("probe%d", time.Now().UnixNano())
	t.Setenv("MSBTAP_ASK_PROBE", probe)
	if err := os.WriteFile(script, []byte("#!/bin/sh\nenv > "+envOut+"\nread q\ncase \"$q\" in\n*'\"name\":\"yes.ask.test\"'*) echo allow always;;\n*'\"name\":\"look.example.test\"'*) echo allow;;\n*) echo deny;;\nesac\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	aw := newAskWorld(t, `{"default_action": "ask"}`, "--ask-exec", script, "--ask-save")
	if o, err := aw.Guest.Run("dig", "+short", "+time=5", "+tries=1", "look.example.test"); err != nil || strings.TrimSpace(o) != registryHost4 {
		t.Errorf("a lookup --ask-exec allows: %v %q", err, o)
	}
	if o, _ := aw.Guest.Run("dig", "+time=5", "+tries=1", "nope.example.test"); !strings.Contains(o, "NXDOMAIN") {
		t.Errorf("a lookup --ask-exec denies: %q", o)
	}
	if o, ok := curlGuest(aw.World, aw.ca, "https://yes.ask.test/"); !ok || !strings.Contains(o, "hello from testhost yes.ask.test") {
		t.Errorf("--ask-exec allow: %q", o)
	}
	if o, ok := curlGuest(aw.World, aw.ca, "https://no.ask.test/"); ok {
		t.Errorf("--ask-exec deny (of the lookup): got through: %q", o)
	}
	// Without a lookup, on yes.ask.test's address (its answer lets the SYN
	// in): the server name is asked about, and denied.
	if o, ok := curlGuest(aw.World, aw.ca, "--resolve", elsewhereName+":443:"+registryHost4, "https://"+elsewhereName+"/"); ok {
		t.Errorf("--ask-exec deny (of the server name): got through: %q", o)
	}
	if env, err := os.ReadFile(envOut); err != nil || strings.Contains(string(env), probe) {
		t.Errorf("--ask-exec's environment (%v) has msbtap's:\n%s", err, env)
	}
	saved, _ := os.ReadFile(aw.policyFile)
	if !strings.Contains(string(saved), `"domain": "yes.ask.test"`) || strings.Contains(string(saved), "look.example.test") {
		t.Errorf("--ask-save: the policy file should have the always rule for yes.ask.test only:\n%s", saved)
	}
	if out, err := exec.Command(aw.Msbtap, "policy", "check", aw.policyFile).CombinedOutput(); err != nil {
		t.Errorf("policy check of the saved policy: %v %s", err, out)
	}
	for _, want := range [][]string{
		{`"proto":"dns"`, `"domain":"yes.ask.test"`, "answered allow always by ask-exec"},
		{`"proto":"dns"`, `"domain":"look.example.test"`, "answered allow by ask-exec"},
		{`"proto":"dns"`, `"domain":"nope.example.test"`, "answered deny by ask-exec"},
		{`"proto":"dns"`, `"domain":"no.ask.test"`, "answered deny by ask-exec"},
		{`"proto":"tcp"`, `"domain":"` + elsewhereName + `"`, "answered deny by ask-exec"},
	} {
		if !aw.auditHas(want...) {
			t.Errorf("the decision log lacks a line with %q", want)
		}
	}
}

// TestAskUDP: a UDP flow an ask rule decides keeps its first datagram
// until the answer: allowed within the client's first wait, the held
// datagram itself is relayed and answered; denied, nothing comes back.
func TestAskUDP(t *testing.T) {
	aw := newAskWorld(t, `{"default_action": "deny", "rules": [
		{"destination": {"cidr": "`+testenv.WebHost4+`"}, "protocols": ["udp"], "action": "ask"},
		{"destination": {"cidr": "`+registryHost4+`"}, "protocols": ["udp"], "action": "ask"}]}`)
	start := time.Now()
	cmd := aw.Guest.Command(aw.Testhost, "udp", testenv.WebHost4+":7002", "held-datagram")
	var out testenv.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	q := aw.waitQuestion("")
	if q.Proto != "udp" || q.Dst != testenv.WebHost4+":7002" {
		t.Errorf("question: %+v", q)
	}
	if o, err := aw.ctl("allow", fmt.Sprint(q.ID)); err != nil {
		t.Fatalf("ctl allow: %v %s", err, o)
	}
	err := cmd.Wait()
	if err != nil || !strings.Contains(out.String(), "held-datagram") || time.Since(start) > 2*time.Second {
		t.Errorf("allowed: %v %q after %s (want the first datagram's echo within the client's first 2 s)", err, out.String(), time.Since(start))
	}

	// Another address (the first one's answer stands for it a minute).
	cmd = aw.Guest.Command(aw.Testhost, "udp", registryHost4+":7002", "x")
	var out2 testenv.Buffer
	cmd.Stdout, cmd.Stderr = &out2, &out2
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	q = aw.waitQuestion("")
	if q.Dst != registryHost4+":7002" {
		t.Errorf("question: %+v", q)
	}
	aw.ctl("deny", fmt.Sprint(q.ID))
	if err := cmd.Wait(); err == nil {
		t.Errorf("denied: the client got an answer: %q", out2.String())
	}
	if !aw.auditHas(`"proto":"udp"`, "answered allow by ctl uid 0") || !aw.auditHas(`"proto":"udp"`, "answered deny by ctl uid 0") {
		t.Error("the decision log lacks the UDP answers")
	}
}

// agentRSS is a process's resident set, as /proc says it.
func agentRSS(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			return strings.TrimSpace(v)
		}
	}
	return "?"
}
