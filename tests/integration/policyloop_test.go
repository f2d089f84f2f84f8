package integration

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/msbtap/msbtap/internal/testenv"
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
	all := append(append([]string{}, names...), elsewhereName)
	args := []string{w.Testhost, "serve", "--https", registryHost4 + ":443", "--http", registryHost4 + ":80",
		"--tls-names", strings.Join(all, ","), "--tls-ca-out", ca, "--dns", registryDNS4 + ":53", "--ready", ready}
	for _, n := range all {
		args = append(args, "--record", n+"="+registryHost4)
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
