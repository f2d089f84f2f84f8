package integration

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/msbtap/msbtap/internal/testkit/testenv"
)

// reach reports whether the sandbox gets through to addr over proto, and
// what it saw. ping targets are bare addresses.
func reach(t *testing.T, w *testenv.World, proto, addr string) (bool, string) {
	t.Helper()
	var out string
	var err error
	switch proto {
	case "tcp":
		out, err = w.Guest.Run(w.Testhost, "dial", addr)
	case "udp":
		out, err = w.Guest.Run(w.Testhost, "udp", addr, "hello")
	case "ping":
		out, err = w.Guest.Run("ping", "-c", "1", "-W", "2", addr)
	}
	return err == nil, strings.TrimSpace(out)
}

func hostPort(a, port string) string {
	if strings.Contains(a, ":") {
		return "[" + a + "]:" + port
	}
	return a + ":" + port
}

// TestPublicOnly: under the default policy a public test host is reachable
// and the metadata address, the gateway, a host-loopback service and a
// private host are not, over TCP, UDP and ping, IPv4 and IPv6.
func TestPublicOnly(t *testing.T) {
	testenv.RequireTools(t, "ping")
	w := testenv.NewWorld(t)
	w.StartAgent(t) // public-only is the default
	for _, tc := range []struct {
		proto, addr string
	}{
		{"tcp", testenv.WebHost4 + ":80"}, {"tcp", "[" + testenv.WebHost6 + "]:80"},
		{"udp", testenv.WebHost4 + ":7002"}, {"udp", "[" + testenv.WebHost6 + "]:7002"},
		{"ping", testenv.WebHost4}, {"ping", testenv.WebHost6},
	} {
		if ok, out := reach(t, w, tc.proto, tc.addr); !ok {
			t.Errorf("public %s %s: blocked: %s", tc.proto, tc.addr, out)
		}
	}
	type target struct{ what, v4, v6, port string }
	for _, tg := range []target{
		{"metadata", "169.254.169.254", "fd00:ec2::254", "80"},
		{"gateway / host loopback", "100.96.0.1", "fd42:6d73:62::1", testenv.HostLoopbackPort},
		{"private host", testenv.PrivHost4, testenv.PrivHost6, "80"},
	} {
		for _, a := range []string{tg.v4, tg.v6} {
			start := time.Now()
			ok, out := reach(t, w, "tcp", hostPort(a, tg.port))
			if ok || !strings.Contains(out, "connection refused") || time.Since(start) > 2*time.Second {
				t.Errorf("%s tcp %s: want a prompt refusal, got ok=%v %q after %s", tg.what, a, ok, out, time.Since(start))
			}
			udpPort := tg.port
			if tg.what == "private host" {
				udpPort = "7002"
			}
			if ok, out := reach(t, w, "udp", hostPort(a, udpPort)); ok {
				t.Errorf("%s udp %s: got through: %s", tg.what, a, out)
			}
			// The gateway answers its own echo (nothing of the host is
			// exposed); every other non-public address stays unreachable.
			if ok, out := reach(t, w, "ping", a); ok != strings.HasPrefix(tg.what, "gateway") {
				t.Errorf("%s ping %s: reached %v: %s", tg.what, a, ok, out)
			}
		}
	}
	// The same private and host services are really there: allow-all
	// reaches them, so the refusals above were the policy's.
	w.StopAgent(t)
	w.StartAgent(t, "--policy", "allow-all")
	for _, tc := range []struct{ proto, addr string }{
		{"tcp", testenv.PrivHost4 + ":80"}, {"tcp", "[" + testenv.PrivHost6 + "]:80"},
		{"udp", testenv.PrivHost4 + ":7002"}, {"ping", testenv.PrivHost4},
		{"tcp", "100.96.0.1:" + testenv.HostLoopbackPort}, {"tcp", "[fd42:6d73:62::1]:" + testenv.HostLoopbackPort},
		{"udp", "100.96.0.1:" + testenv.HostLoopbackPort}, {"ping", "100.96.0.1"}, {"ping", "fd42:6d73:62::1"},
	} {
		if ok, out := reach(t, w, tc.proto, tc.addr); !ok {
			t.Errorf("allow-all %s %s: blocked: %s", tc.proto, tc.addr, out)
		}
	}
}

func writePolicy(t *testing.T, js string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "policy.json")
	if err := os.WriteFile(p, []byte(js), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestDomainAllow: deny by default, allow one name (and UDP to one address,
// which must not open DNS to every name). That name resolves and connects;
// another name does not resolve; the allowed address reached without a
// lookup is denied.
func TestDomainAllow(t *testing.T) {
	testenv.RequireTools(t, "curl", "dig")
	w := testenv.NewWorld(t)
	pol := writePolicy(t, `{"default_action": "deny", "rules": [
		{"destination": {"cidr": "`+testenv.WebHost4+`"}, "protocols": ["udp"], "ports": [{"start": 7002}], "action": "allow"},
		{"destination": {"domain": "`+testenv.TestDomain+`"}, "action": "allow"}]}`)
	w.StartAgent(t, "--policy", pol)

	if ok, out := reach(t, w, "tcp", testenv.WebHost4+":80"); ok {
		t.Errorf("the allowed name's address, without a lookup: got through: %s", out)
	}
	out := w.Guest.MustRun(t, "curl", "-sS", "-4", "--max-time", "10", "http://"+testenv.TestDomain+"/")
	if !strings.Contains(out, "hello from testhost") {
		t.Errorf("allowed name: %q", out)
	}
	out = w.Guest.MustRun(t, "curl", "-sS", "-6", "--max-time", "10", "http://"+testenv.TestDomain+"/")
	if !strings.Contains(out, "hello from testhost") {
		t.Errorf("allowed name over IPv6: %q", out)
	}
	out, _ = w.Guest.Run("dig", "+time=3", "+tries=1", testenv.OtherDomain)
	if !strings.Contains(out, "status: NXDOMAIN") {
		t.Errorf("other name: want NXDOMAIN, got:\n%s", out)
	}
	if _, err := w.Guest.Run("curl", "-sS", "--max-time", "5", "http://"+testenv.OtherDomain+"/"); err == nil {
		t.Errorf("curl of a denied name succeeded")
	}
}

func TestRebindingProtection(t *testing.T) {
	testenv.RequireTools(t, "dig")
	w := testenv.NewWorld(t)
	w.StartAgent(t)
	out, _ := w.Guest.Run("dig", "+time=3", "+tries=1", testenv.RebindDomain)
	if !strings.Contains(out, "status: NXDOMAIN") || strings.Contains(out, "10.0.0.1") {
		t.Errorf("public name answered with 10.0.0.1: want it refused (NXDOMAIN), got:\n%s", out)
	}
	w.StopAgent(t)
	w.StartAgent(t, "--no-rebind-protection")
	out = w.Guest.MustRun(t, "dig", "+short", "+time=3", "+tries=1", testenv.RebindDomain)
	if strings.TrimSpace(out) != "10.0.0.1" {
		t.Errorf("with --no-rebind-protection: got %q, want 10.0.0.1", out)
	}
}

func TestDNSBlockLists(t *testing.T) {
	testenv.RequireTools(t, "dig")
	w := testenv.NewWorld(t)
	w.StartAgent(t, "--dns-block", testenv.OtherDomain, "--dns-block-suffix", "blocked.test")
	if out := w.Guest.MustRun(t, "dig", "+short", testenv.TestDomain); strings.TrimSpace(out) != testenv.WebHost4 {
		t.Errorf("unblocked name: %q", out)
	}
	for _, n := range []string{testenv.OtherDomain, "blocked.test", "a.b.blocked.test"} {
		out, _ := w.Guest.Run("dig", "+time=3", "+tries=1", n)
		if !strings.Contains(out, "status: NXDOMAIN") {
			t.Errorf("%s: want NXDOMAIN, got:\n%s", n, out)
		}
	}
}

// TestTerminate: a command in the sandbox connects to a forbidden address;
// the command is killed, --on-terminate runs with the violation in its
// environment, and msbtap exits with status 3.
func TestTerminate(t *testing.T) {
	w := testenv.NewWorld(t)
	pol := writePolicy(t, `{"default_action": "allow", "rules": [
		{"destination": {"group": "private"}, "protocols": ["tcp"], "action": "terminate"}]}`)
	envFile := filepath.Join(t.TempDir(), "violation.env")
	marker := filepath.Join(t.TempDir(), "survived")
	// A process that left the command's session (setsid) must die too.
	script := fmt.Sprintf("setsid sh -c 'sleep 3; touch %s.setsid' & %s dial %s:80; sleep 20; touch %s", marker, w.Testhost, testenv.PrivHost4, marker)
	// The command's /tmp is its own: it gets testhost and the marker's
	// directory (root's, mode 0700) through binds, as root.
	cmd := w.Host.Command(w.Msbtap, "run", "--policy", pol, "--dns-upstream", testenv.DNSHost4,
		"--user", "root", "--bind-ro", filepath.Dir(w.Testhost), "--bind", filepath.Dir(marker),
		"--on-terminate", "env | grep ^MSBTAP_VIOLATION_ > "+envFile, "--terminated-fd", "3", "--", "sh", "-c", script)
	// --terminated-fd: what msbtap-cni's supervisor listens to.
	tr, tw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	cmd.ExtraFiles = []*os.File{tw}
	start := time.Now()
	out, err := cmd.CombinedOutput()
	took := time.Since(start)
	tw.Close()
	if told, _ := io.ReadAll(tr); string(told) != "terminated\n" {
		t.Errorf("--terminated-fd got %q, want \"terminated\\n\"", told)
	}
	if cmd.ProcessState == nil || cmd.ProcessState.ExitCode() != 3 {
		t.Fatalf("msbtap: %v, want exit status 3\n%s", err, out)
	}
	if took > 15*time.Second {
		t.Errorf("took %s: the sandbox was not stopped at once", took)
	}
	time.Sleep(4 * time.Second) // the setsid child would have touched its marker by now
	for _, m := range []string{marker, marker + ".setsid"} {
		if _, err := os.Stat(m); err == nil {
			t.Errorf("a process of the sandbox ran on after the violation (%s)", filepath.Base(m))
		}
	}
	env, err := os.ReadFile(envFile)
	if err != nil {
		t.Fatalf("--on-terminate did not run: %v\n%s", err, out)
	}
	for _, want := range []string{
		"MSBTAP_VIOLATION_PROTO=tcp",
		"MSBTAP_VIOLATION_DST=" + testenv.PrivHost4 + ":80",
		"MSBTAP_VIOLATION_SRC=100.96.0.2:",
		"MSBTAP_VIOLATION_RULE=rules[0]",
	} {
		if !strings.Contains(string(env), want) {
			t.Errorf("violation environment lacks %q:\n%s", want, env)
		}
	}
	if !strings.Contains(string(out), "sandbox terminated") {
		t.Errorf("msbtap did not report the termination:\n%s", out)
	}
}

// TestOnViolationTerminate: --on-violation terminate makes a plain deny
// fatal, here for a guest-pid sandbox attached with --netns.
func TestOnViolationTerminate(t *testing.T) {
	w := testenv.NewWorld(t)
	victim := w.Guest.Start(t, "sleep", "60")
	cmd := w.Host.Command(w.Msbtap, "run", "--netns", w.Guest.Name, "--on-violation", "terminate",
		"--guest-pid", strconv.Itoa(victim.Process.Pid))
	out, done := startCmd(t, cmd)
	waitFor(t, 10*time.Second, "msbtap ready", func() bool { return strings.Contains(out.String(), "ready") })
	w.Guest.Run(w.Testhost, "dial", "169.254.169.254:80")
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("msbtap did not stop after a denied flow:\n%s", out.String())
	}
	if cmd.ProcessState.ExitCode() != 3 {
		t.Errorf("exit status %d, want 3\n%s", cmd.ProcessState.ExitCode(), out.String())
	}
	waitFor(t, 5*time.Second, "the guest pid to die", func() bool {
		return victim.ProcessState != nil || syscall.Kill(victim.Process.Pid, 0) != nil || isZombie(victim.Process.Pid)
	})
}

func isZombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	f := strings.Fields(string(b))
	return len(f) > 2 && f[2] == "Z"
}

// TestAuditLogAndMetrics: one decision line per flow, and the counters move.
func TestAuditLogAndMetrics(t *testing.T) {
	testenv.RequireTools(t, "curl", "dig")
	w := testenv.NewWorld(t)
	audit := filepath.Join(t.TempDir(), "audit.jsonl")
	w.StartAgent(t, "--audit-log", audit, "--metrics-addr", "127.0.0.1:9465")
	metrics := func() string { return w.Host.MustRun(t, "curl", "-sS", "http://127.0.0.1:9465/metrics") }
	val := func(m, name string) float64 {
		r := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`).FindStringSubmatch(m)
		if r == nil {
			t.Fatalf("no %s in /metrics", name)
		}
		v, _ := strconv.ParseFloat(r[1], 64)
		return v
	}
	m0 := metrics()
	w.Guest.MustRun(t, "dig", "+short", testenv.TestDomain)
	w.Guest.MustRun(t, "dig", "+short", "+tcp", testenv.TestDomain, "AAAA")
	w.Guest.MustRun(t, "curl", "-sS", "-4", "http://"+testenv.TestDomain+"/")
	w.Guest.Run(w.Testhost, "dial", testenv.PrivHost4+":80")
	w.Guest.Run(w.Testhost, "udp", "169.254.169.254:53", "x") // port 53 is DNS: answered by the agent
	w.Guest.Run(w.Testhost, "udp", "169.254.169.254:123", "x")
	m1 := metrics()
	for _, name := range []string{`msbtap_bytes_total{direction="tx"}`, `msbtap_bytes_total{direction="rx"}`,
		`msbtap_decisions_total{action="allow"}`, `msbtap_decisions_total{action="deny"}`, `msbtap_flows_total{proto="tcp"}`,
		`msbtap_drops_total{reason="policy"}`} {
		if val(m1, name) <= val(m0, name) {
			t.Errorf("%s did not move: %v -> %v", name, val(m0, name), val(m1, name))
		}
	}
	w.StopAgent(t) // flushes the log

	f, err := os.Open(audit)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	type line struct {
		Time, Direction, Proto, Transport, Src, Dst, Domain, Action, RuleText string
		Rule                                                                  int
	}
	var lines []line
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var l struct {
			Time      string `json:"time"`
			Direction string `json:"direction"`
			Proto     string `json:"proto"`
			Transport string `json:"transport"`
			Src       string `json:"src"`
			Dst       string `json:"dst"`
			Domain    string `json:"domain"`
			Rule      *int   `json:"rule"`
			RuleText  string `json:"rule_text"`
			Action    string `json:"action"`
		}
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			t.Fatalf("audit line is not JSON: %q: %v", sc.Text(), err)
		}
		if l.Time == "" || l.Proto == "" || l.Src == "" || l.Action == "" || l.Rule == nil {
			t.Errorf("audit line lacks fields: %s", sc.Text())
			continue
		}
		lines = append(lines, line{l.Time, l.Direction, l.Proto, l.Transport, l.Src, l.Dst, l.Domain, l.Action, l.RuleText, *l.Rule})
	}
	has := func(pred func(line) bool) bool {
		for _, l := range lines {
			if pred(l) {
				return true
			}
		}
		return false
	}
	if !has(func(l line) bool {
		return l.Proto == "dns" && l.Transport == "udp" && l.Domain == testenv.TestDomain && l.Action == "allow"
	}) {
		t.Errorf("no DNS-over-UDP decision for %s in %+v", testenv.TestDomain, lines)
	}
	if !has(func(l line) bool {
		return l.Proto == "dns" && l.Transport == "tcp" && l.Domain == testenv.TestDomain && l.Action == "allow"
	}) {
		t.Errorf("no DNS-over-TCP decision for %s in %+v", testenv.TestDomain, lines)
	}
	if !has(func(l line) bool {
		return l.Proto == "tcp" && l.Dst == testenv.WebHost4+":80" && l.Domain == testenv.TestDomain && l.Action == "allow" && l.Rule == 2
	}) {
		t.Errorf("no allowed tcp decision to %s:80 with its domain by rule 2 in %+v", testenv.WebHost4, lines)
	}
	if !has(func(l line) bool {
		return l.Proto == "tcp" && l.Dst == testenv.PrivHost4+":80" && l.Action == "deny" && l.Rule == -1
	}) {
		t.Errorf("no denied tcp decision to %s:80 in %+v", testenv.PrivHost4, lines)
	}
	if !has(func(l line) bool {
		return l.Proto == "udp" && l.Dst == "169.254.169.254:123" && l.Action == "deny" && l.Rule == 1
	}) {
		t.Errorf("no denied udp decision to the metadata address in %+v", lines)
	}
}

// TestPolicyReload: SIGHUP swaps in a new valid policy; an invalid file is
// refused and the old policy stays.
func TestPolicyReload(t *testing.T) {
	w := testenv.NewWorld(t)
	pol := writePolicy(t, `{"default_action": "allow"}`)
	w.StartAgent(t, "--policy", pol)
	if ok, out := reach(t, w, "tcp", testenv.WebHost4+":80"); !ok {
		t.Fatalf("before reload: %s", out)
	}
	os.WriteFile(pol, []byte(`{"default_action": "allow", "rules": [{"destination": {"cidr": "198.51.100.0/24"}, "action": "deny"}]}`), 0o644)
	w.Agent.Process.Signal(syscall.SIGHUP)
	waitFor(t, 5*time.Second, "the reload", func() bool { return strings.Contains(w.AgentLog.String(), "policy reloaded") })
	if ok, out := reach(t, w, "tcp", testenv.WebHost4+":80"); ok {
		t.Errorf("after reload to deny: got through: %s", out)
	}
	os.WriteFile(pol, []byte(`{"default_action": "alow"}`), 0o644)
	w.Agent.Process.Signal(syscall.SIGHUP)
	waitFor(t, 5*time.Second, "the failed reload", func() bool { return strings.Contains(w.AgentLog.String(), "policy reload failed") })
	if ok, out := reach(t, w, "tcp", testenv.WebHost4+":80"); ok {
		t.Errorf("an invalid reload replaced the policy: got through: %s", out)
	}
}

func TestDenyModeDrop(t *testing.T) {
	testenv.RequireTools(t, "curl")
	w := testenv.NewWorld(t)
	w.StartAgent(t, "--deny-mode", "drop")
	cmd := w.Guest.Command("curl", "-sS", "--connect-timeout", "1", "http://"+testenv.PrivHost4+"/")
	cmd.Run()
	if code := cmd.ProcessState.ExitCode(); code != 28 {
		t.Errorf("curl to a denied host with --deny-mode drop: exit %d, want 28 (timeout: no reset came back)", code)
	}
}

func TestPolicyCommands(t *testing.T) {
	msbtap, _ := testenv.Binaries(t)
	good := writePolicy(t, `{"default_action": "deny", "rules": [{"destination": {"group": "private"}, "protocols": ["tcp"], "ports": [{"start": 443, "end": 443}], "action": "allow"}]}`)
	if out, err := exec.Command(msbtap, "policy", "check", good).CombinedOutput(); err != nil {
		t.Errorf("check of a good file: %v\n%s", err, out)
	}
	bad := writePolicy(t, `{"default_action": "deny", "rules": [{"destination": "any", "action": "allow"}, {"destination": {"group": "lan"}, "action": "deny"}]}`)
	out, err := exec.Command(msbtap, "policy", "check", bad).CombinedOutput()
	if err == nil || !strings.Contains(string(out), `rules[1].destination: group: unknown group "lan"`) {
		t.Errorf("check of a bad file: %v\n%s", err, out)
	}
	out, err = exec.Command(msbtap, "policy", "explain", "--policy", good, "--dst", "10.1.2.3:443", "--proto", "tcp").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "allow\nby rules[0]") {
		t.Errorf("explain: %v\n%s", err, out)
	}
	out, _ = exec.Command(msbtap, "policy", "explain", "--policy", good, "--dst", "10.1.2.3:80").CombinedOutput()
	if !strings.HasPrefix(string(out), "deny\nby default_action deny") {
		t.Errorf("explain default: %s", out)
	}
}
