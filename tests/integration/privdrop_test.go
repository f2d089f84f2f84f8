package integration

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/msbtap/msbtap/internal/testkit/testenv"
	"github.com/msbtap/msbtap/process"
)

// TestAgentNotRoot: once ready, the agent is a user of its own with no
// groups and CAP_NET_RAW only, under seccomp; and what it still does on
// files and sockets works: TCP relays, ICMP echo through its raw socket,
// the decision log and the capture rotating (by its keeper) into FILE.1,
// the control socket, a policy file only root can read coming back on
// SIGHUP; when it ends, its pid file and control socket are gone.
func TestAgentNotRoot(t *testing.T) {
	testenv.RequireTools(t, "curl", "ping")
	w := testenv.NewWorld(t)
	dir := openDir(t, 0o755)
	auditLog := filepath.Join(dir, "audit.log")
	capFile := filepath.Join(dir, "cap.pcap")
	pidFile := filepath.Join(dir, "msbtap.pid")
	sock := filepath.Join(dir, "ctl.sock")
	pol := filepath.Join(dir, "policy.json")
	allowInet := `{"default_action": "deny", "rules": [{"destination": {"cidr": "198.51.100.0/24"}, "action": "allow"}]}`
	if err := os.WriteFile(pol, []byte(allowInet), 0o600); err != nil {
		t.Fatal(err)
	}
	w.StartAgent(t, "--audit-log", auditLog, "--audit-log-max-size", "4KiB", "--pcap", capFile, "--pcap-max-size", "64KiB",
		"--pid-file", pidFile, "--control", sock, "--policy", pol)

	pid := w.AgentPID()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	id := strconv.Itoa(process.AgentIDBase + pid)
	ids := strings.Join([]string{id, id, id, id}, " ")
	netRaw := fmt.Sprintf("%016x", uint64(1)<<13)
	for k, want := range map[string]string{"Uid": ids, "Gid": ids, "Groups": "", "CapEff": netRaw, "CapPrm": netRaw,
		"CapAmb": "0000000000000000", "NoNewPrivs": "1", "Seccomp": "2"} {
		if got := statusField(string(status), k); got != want {
			t.Errorf("agent %s: %q, want %q", k, got, want)
		}
	}

	w.Guest.MustRun(t, "curl", "-sS", "--max-time", "10", "http://"+testenv.WebHost4+"/")
	w.Guest.MustRun(t, "ping", "-c", "40", "-i", "0.01", "-s", "1400", "-W", "2", testenv.WebHost4)
	// Distinct destinations the policy denies (refused at their first
	// packet, never dialed), each a line of its own in the decision log.
	w.Guest.MustRun(t, "sh", "-c", "for i in $(seq 1 40); do curl -s --max-time 1 http://192.0.2.$i/ >/dev/null; done; true")
	mustCtl(t, w, sock, "flows")

	// The policy file, now mode 0600 and root's, changes and comes back.
	if err := os.WriteFile(pol, []byte(`{"default_action": "deny"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	w.Agent.Process.Signal(syscall.SIGHUP)
	waitFor(t, 5*time.Second, "the policy reload", func() bool { return strings.Contains(w.AgentLog.String(), "policy reloaded") })
	if _, err := w.Guest.Run("curl", "-sS", "--max-time", "3", "http://"+testenv.WebHost4+"/"); err == nil {
		t.Error("after the reload to deny, curl still got through")
	}

	if err := w.StopAgent(t); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{auditLog, auditLog + ".1", capFile, capFile + ".1"} {
		b, err := os.ReadFile(f)
		if err != nil || len(b) == 0 {
			t.Errorf("%s: %v, %d bytes: want it rotated and written", f, err, len(b))
			continue
		}
		if strings.HasSuffix(f, ".pcap") || strings.HasSuffix(f, ".pcap.1") {
			if !bytes.HasPrefix(b, []byte{0xd4, 0xc3, 0xb2, 0xa1}) && !bytes.HasPrefix(b, []byte{0x4d, 0x3c, 0xb2, 0xa1}) {
				t.Errorf("%s: no pcap header", f)
			}
		} else if !bytes.HasPrefix(b, []byte("{")) {
			t.Errorf("%s: not JSON lines: %.80q", f, b)
		}
	}
	// The keeper removes them as the agent ends.
	waitFor(t, 5*time.Second, "the pid file and control socket removed", func() bool {
		_, e1 := os.Lstat(pidFile)
		_, e2 := os.Lstat(sock)
		return os.IsNotExist(e1) && os.IsNotExist(e2)
	})
}

func statusField(status, key string) string {
	for _, l := range strings.Split(status, "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && k == key {
			return strings.Join(strings.Fields(v), " ")
		}
	}
	return ""
}

// TestCgoBuildStarts: msbtap built with cgo (what go install makes where
// a C compiler is) starts, drops to its own uid on every thread and
// relays.
func TestCgoBuildStarts(t *testing.T) {
	testenv.RequireTools(t, "curl", "ping", "gcc")
	w := testenv.NewWorld(t)
	bin := filepath.Join(t.TempDir(), "msbtap-cgo")
	build := exec.Command("go", "build", "-o", bin, "./cmd/msbtap")
	build.Dir = filepath.Join("..", "..")
	build.Env = append(os.Environ(), "CGO_ENABLED=1")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("cgo build: %v\n%s", err, out)
	}
	if out, err := exec.Command("go", "version", "-m", bin).Output(); err != nil || !strings.Contains(string(out), "CGO_ENABLED=1") {
		t.Fatalf("not a cgo build: %v\n%s", err, out)
	}
	w.Msbtap = bin
	w.StartAgent(t, "--pid-file", filepath.Join(openDir(t, 0o755), "pid"))
	pid := w.AgentPID()
	id := strconv.Itoa(process.AgentIDBase + pid)
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, task := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/status", pid, task.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if got := statusField(string(b), "Uid"); got != strings.Join([]string{id, id, id, id}, " ") {
			t.Errorf("thread %s: Uid %q, want %s", task.Name(), got, id)
		}
		if got := statusField(string(b), "Seccomp"); got != "2" {
			t.Errorf("thread %s: Seccomp %q", task.Name(), got)
		}
	}
	w.Guest.MustRun(t, "curl", "-sS", "--max-time", "10", "http://"+testenv.WebHost4+"/")
	w.Guest.MustRun(t, "ping", "-c", "2", "-W", "2", testenv.WebHost4)
}

// TestKilledAgentLeavesNothing: an agent killed with SIGKILL (no teardown
// of its own) still leaves no pid file, control socket or TAP behind: its
// keeper removes the files as the agent's end of their socket closes, and
// ends.
func TestKilledAgentLeavesNothing(t *testing.T) {
	w := testenv.NewWorld(t)
	dir := openDir(t, 0o755)
	pidFile := filepath.Join(dir, "msbtap.pid")
	sock := filepath.Join(dir, "ctl.sock")
	w.StartAgent(t, "--pid-file", pidFile, "--control", sock)
	pid := w.AgentPID()
	var keepers []int
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, task := range tasks {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", pid, task.Name()))
		for _, f := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(f); err == nil {
				if cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", c)); strings.Contains(string(cmdline), process.KeeperArg) {
					keepers = append(keepers, c)
				}
			}
		}
	}
	if len(keepers) != 1 {
		t.Fatalf("keepers among the agent's children: %v, want one", keepers)
	}
	cmd := w.Agent
	w.Agent = nil // no SIGTERM at cleanup: it is killed here
	cmd.Process.Kill()
	waitFor(t, 5*time.Second, "the pid file and control socket removed", func() bool {
		_, e1 := os.Lstat(pidFile)
		_, e2 := os.Lstat(sock)
		return os.IsNotExist(e1) && os.IsNotExist(e2)
	})
	waitFor(t, 5*time.Second, "the keeper gone", func() bool {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", keepers[0]))
		return err != nil || strings.Contains(string(b), ") Z ")
	})
	waitFor(t, 5*time.Second, "the TAP gone", func() bool {
		_, err := w.Guest.Run("ip", "link", "show", "eth0")
		return err != nil
	})
}

// TestVMModeAgentHasNoNetAdmin: in VM mode the running agent keeps no
// CAP_NET_ADMIN on the host (the keeper removes the TAPs at the end), and
// even after SIGKILL both TAPs are gone.
func TestVMModeAgentHasNoNetAdmin(t *testing.T) {
	w := testenv.NewWorld(t)
	name := fmt.Sprintf("pdvm%d", os.Getpid()%100000)
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	cmd := w.Host.Command(w.Msbtap, "run", "--vm", "--tap", name, "--dns-upstream", testenv.DNSHost4, "--ready-fd", "3")
	var log testenv.Buffer
	cmd.Stdout, cmd.Stderr = &log, &log
	cmd.ExtraFiles = []*os.File{pw}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
		if t.Failed() {
			t.Logf("msbtap log:\n%s", log.String())
		}
	})
	ready := make(chan string, 1)
	go func() { b := make([]byte, 6); n, _ := pr.Read(b); ready <- string(b[:n]) }()
	select {
	case s := <-ready:
		if s != "ready\n" {
			t.Fatalf("ready fd said %q", s)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("not ready after 15 s")
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	netRaw := fmt.Sprintf("%016x", uint64(1)<<13)
	if got := statusField(string(status), "CapEff"); got != netRaw {
		t.Errorf("VM-mode agent CapEff %s, want %s (CAP_NET_RAW only)", got, netRaw)
	}
	for _, n := range []string{name, name + "-msb"} {
		if _, err := w.Host.Run("ip", "link", "show", n); err != nil {
			t.Fatalf("%s missing while the agent runs: %v", n, err)
		}
	}
	cmd.Process.Kill()
	waitFor(t, 5*time.Second, "both TAPs removed", func() bool {
		_, e1 := w.Host.Run("ip", "link", "show", name)
		_, e2 := w.Host.Run("ip", "link", "show", name+"-msb")
		return e1 != nil && e2 != nil
	})
}
