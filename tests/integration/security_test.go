package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/msbtap/msbtap/internal/testkit/testenv"
)

// TestHostAddressesGainedLater: an address the host gains after msbtap
// started, and an address the host answers through a local route, are the
// host: refused under public-only, though they look public.
func TestHostAddressesGainedLater(t *testing.T) {
	w := testenv.NewWorld(t)
	w.StartAgent(t) // public-only
	w.Host.MustRun(t, "ip", "addr", "add", "198.51.100.200/32", "dev", "lo")
	w.Host.MustRun(t, "ip", "route", "add", "local", "198.51.100.208/29", "dev", "lo")
	ready := filepath.Join(t.TempDir(), "host-late-ready")
	w.Host.Start(t, w.Testhost, "serve", "--http", "198.51.100.200:8081", "--http", "198.51.100.210:8081", "--ready", ready)
	waitFor(t, 10*time.Second, "host servers", func() bool { _, err := os.Stat(ready); return err == nil })
	for _, addr := range []string{"198.51.100.200:8081", "198.51.100.210:8081"} {
		if out, err := w.Host.Run(w.Testhost, "dial", addr); err != nil {
			t.Fatalf("the host's own server %s is not up: %s", addr, out)
		}
		if ok, out := reach(t, w, "tcp", addr); ok {
			t.Errorf("%s, local to the host, reached from the sandbox: %s", addr, out)
		}
	}
	// A public test host is still reachable.
	if ok, out := reach(t, w, "tcp", testenv.WebHost4+":80"); !ok {
		t.Errorf("public host: %s", out)
	}
}

// TestEmbeddedIPv4Refused: IPv6 addresses that carry a private or metadata
// IPv4 address (NAT64, 6to4, IPv4-compatible) are refused under
// public-only, and the decision says so.
func TestEmbeddedIPv4Refused(t *testing.T) {
	w := testenv.NewWorld(t)
	audit := filepath.Join(t.TempDir(), "audit.jsonl")
	w.StartAgent(t, "--audit-log", audit)
	for _, addr := range []string{"[64:ff9b::a9fe:a9fe]:80", "[64:ff9b::a4d:2]:80", "[2002:a9fe:a9fe::1]:80", "[::a9fe:a9fe]:80", "[2001::1]:80"} {
		if ok, out := reach(t, w, "tcp", addr); ok {
			t.Errorf("%s: got through: %s", addr, out)
		}
	}
	w.StopAgent(t)
	b, _ := os.ReadFile(audit)
	if n := strings.Count(string(b), `"action":"deny"`); n < 5 {
		t.Errorf("want a deny decision for each of 5 addresses, got %d:\n%s", n, b)
	}
	if strings.Contains(string(b), `"action":"allow"`) {
		t.Errorf("an embedded address was allowed:\n%s", b)
	}
}

// TestPingGatewayUnderEveryPresetButNone: the gateway answers its own echo
// under public-only (the first check a user makes), not under none.
func TestPingGatewayUnderEveryPresetButNone(t *testing.T) {
	testenv.RequireTools(t, "ping")
	w := testenv.NewWorld(t)
	for _, tc := range []struct {
		policy string
		want   bool
	}{{"public-only", true}, {"non-local", true}, {"none", false}} {
		w.StartAgent(t, "--policy", tc.policy)
		for _, gw := range []string{"100.96.0.1", "fd42:6d73:62::1"} {
			if ok, out := reach(t, w, "ping", gw); ok != tc.want {
				t.Errorf("%s: ping %s: got %v, want %v\n%s", tc.policy, gw, ok, tc.want, out)
			}
		}
		w.StopAgent(t)
	}
}

// TestDNSOverTCPCapped: held TCP connections to port 53 (of any address)
// stop at the DNS cap instead of taking the agent's memory; queries over
// TCP still work once they are gone; zone transfers are not forwarded.
func TestDNSOverTCPCapped(t *testing.T) {
	testenv.RequireTools(t, "dig")
	w := testenv.NewWorld(t)
	w.StartAgent(t, "--policy", writePolicy(t, `{"default_action": "deny"}`))
	out := w.Guest.MustRun(t, w.Testhost, "hold", "198.51.100.99:53", "60", "2")
	if strings.TrimSpace(out) != "open=16 refused=44" {
		t.Errorf("60 held DNS-over-TCP connections: %s, want open=16 refused=44", out)
	}
	w.StopAgent(t)
	w.StartAgent(t)
	if out := w.Guest.MustRun(t, "dig", "+short", "+tcp", "@100.96.0.1", testenv.TestDomain); strings.TrimSpace(out) != testenv.WebHost4 {
		t.Errorf("DNS over TCP: %q", out)
	}
	out, _ = w.Guest.Run("dig", "+time=3", "+tries=1", "@100.96.0.1", "example.test", "AXFR")
	if strings.Contains(out, "XFR size") || !strings.Contains(out, "NOTIMP") && !strings.Contains(out, "failed") {
		t.Errorf("AXFR: want it refused (NOTIMP), got:\n%s", out)
	}
}

// TestTerminationCutsTheNetworkFirst: in --netns mode with no process to
// stop, a fatal violation resets the sandbox's open connections and refuses
// new ones at once, while --on-terminate still runs; then msbtap exits 3.
func TestTerminationCutsTheNetworkFirst(t *testing.T) {
	w := testenv.NewWorld(t)
	pol := writePolicy(t, `{"default_action": "allow", "rules": [
		{"destination": {"group": "private"}, "protocols": ["tcp"], "action": "terminate"}]}`)
	marker := filepath.Join(t.TempDir(), "hook-ran")
	cmd := w.Host.Command(w.Msbtap, "run", "--netns", w.Guest.Name, "--policy", pol, "--dns-upstream", testenv.DNSHost4,
		"--on-terminate", "sleep 4; touch "+marker)
	out, done := startCmd(t, cmd)
	waitFor(t, 10*time.Second, "msbtap ready", func() bool { return strings.Contains(out.String(), "ready") })

	// An open connection, idle: it must see a reset, not a silent hang.
	held := w.Guest.Command(w.Testhost, "hold", testenv.WebHost4+":7001", "1", "15")
	heldOut := &testenv.Buffer{}
	held.Stdout = heldOut
	if err := held.Start(); err != nil {
		t.Fatal(err)
	}
	heldDone := make(chan error, 1)
	go func() { heldDone <- held.Wait() }()
	time.Sleep(500 * time.Millisecond)

	w.Guest.Run(w.Testhost, "dial", testenv.PrivHost4+":80") // the violation
	start := time.Now()
	select {
	case <-heldDone:
		if got := strings.TrimSpace(heldOut.String()); got != "open=0 refused=1" {
			t.Errorf("the open connection: %q, want it reset", got)
		}
		if took := time.Since(start); took > 2*time.Second {
			t.Errorf("the open connection was reset after %s", took)
		}
	case <-time.After(3 * time.Second):
		t.Error("the open connection still stands 3 s after the violation")
	}
	// While --on-terminate runs, nothing new gets out.
	if ok, o := reach(t, w, "tcp", testenv.WebHost4+":80"); ok {
		t.Errorf("a new connection got out during termination: %s", o)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("--on-terminate ran before the network was cut and checked")
	}
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		t.Fatalf("msbtap did not exit\n%s", out.String())
	}
	if cmd.ProcessState.ExitCode() != 3 {
		t.Errorf("exit status %d, want 3", cmd.ProcessState.ExitCode())
	}
	if _, err := os.Stat(marker); err != nil {
		t.Errorf("--on-terminate did not run: %v", err)
	}
}

// TestCommandIsConfined: the command msbtap starts has no capabilities and
// no_new_privs, sees only its own PID namespace (so neither msbtap nor any
// host process), and cannot enter another network namespace: the one-line
// escape `nsenter --net=/proc/$PPID/ns/net` no longer works.
func TestCommandIsConfined(t *testing.T) {
	testenv.RequireRoot(t)
	msbtap, _ := testenv.Binaries(t)
	script := `grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):' /proc/self/status
echo "pid1: $(tr '\0' ' ' </proc/1/cmdline)"
echo "procs: $(ls /proc | grep -c '^[0-9]')"
nsenter --net=/proc/$PPID/ns/net ip -o link 2>&1 | head -3
echo "links: $(ip -o link | wc -l)"`
	out, err := exec.Command(msbtap, "run", "--", "sh", "-c", script).CombinedOutput()
	if err != nil {
		t.Fatalf("msbtap run: %v\n%s", err, out)
	}
	s := string(out)
	for _, want := range []string{"CapInh:\t0000000000000000", "CapPrm:\t0000000000000000", "CapEff:\t0000000000000000",
		"CapBnd:\t0000000000002000", "CapAmb:\t0000000000000000", "NoNewPrivs:\t1", "links: 2"} {
		if !strings.Contains(s, want) {
			t.Errorf("want %q in:\n%s", want, s)
		}
	}
	if !strings.Contains(s, "pid1: /") || !strings.Contains(s, "__msbtap-sandbox-init") {
		t.Errorf("PID 1 is not the sandbox's init:\n%s", s)
	}
	if m := regexp.MustCompile(`procs: (\d+)`).FindStringSubmatch(s); m == nil || len(m[1]) > 1 {
		t.Errorf("the sandbox sees more than its own few processes:\n%s", s)
	}
	if !strings.Contains(s, "Operation not permitted") && !strings.Contains(s, "Permission denied") {
		t.Errorf("nsenter into another network namespace was not refused:\n%s", s)
	}
}

// TestCommandRunsAsUser: --user picks the user; an unprivileged command can
// still ping and bind a port below 1024 inside its sandbox.
func TestCommandRunsAsUser(t *testing.T) {
	testenv.RequireTools(t, "ping", "iperf3")
	w := testenv.NewWorld(t)
	script := fmt.Sprintf(`id -u; id -g
ping -c 1 -W 2 %s >/dev/null && echo ping-ok
timeout 1 iperf3 -s -p 80 2>&1 | grep -q 'listening on 80' && echo bind-ok`, testenv.WebHost4)
	out, err := w.Host.Run(w.Msbtap, "run", "--user", "nobody", "--dns-upstream", testenv.DNSHost4, "--", "sh", "-c", script)
	if err != nil {
		t.Fatalf("msbtap run: %v\n%s", err, out)
	}
	// The agent's log shares the output: count the command's own lines.
	n := 0
	for _, l := range strings.Split(out, "\n") {
		if l == "65534" {
			n++
		}
	}
	if n != 2 {
		t.Errorf("want uid and gid 65534 in:\n%s", out)
	}
	for _, want := range []string{"ping-ok", "bind-ok"} {
		if !strings.Contains(out, want) {
			t.Errorf("want %q in:\n%s", want, out)
		}
	}
	// The user who ran sudo is the default.
	cmd := w.Host.Command(w.Msbtap, "run", "--", "id", "-u")
	cmd.Env = append(os.Environ(), "SUDO_UID=65534", "SUDO_GID=65534")
	if b, err := cmd.Output(); err != nil || strings.TrimSpace(string(b)) != "65534" {
		t.Errorf("with SUDO_UID: %v %q", err, b)
	}
}

// TestAgentRunsHardened: once set up, msbtap holds only CAP_NET_RAW (no
// CAP_KILL: it has no command or --guest-pid to stop here), with
// no_new_privs and its seccomp filter; --seccomp off leaves the filter out.
func TestAgentRunsHardened(t *testing.T) {
	w := testenv.NewWorld(t)
	status := func() string {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", w.AgentPID()))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	want := fmt.Sprintf("CapEff:\t%016x", uint64(1)<<13) // CAP_NET_RAW
	w.StartAgent(t)
	s := status()
	for _, want := range []string{want, "NoNewPrivs:\t1", "Seccomp:\t2"} {
		if !strings.Contains(s, want) {
			t.Errorf("want %q in the agent's status", want)
		}
	}
	if ok, out := reach(t, w, "tcp", testenv.WebHost4+":80"); !ok {
		t.Errorf("traffic under the filter: %s", out)
	}
	w.StopAgent(t)
	w.StartAgent(t, "--seccomp", "off")
	if s := status(); !strings.Contains(s, "Seccomp:\t0") || !strings.Contains(s, want) {
		t.Errorf("--seccomp off: want no filter and the same capabilities:\n%s", s)
	}
}
