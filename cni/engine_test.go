package cni

import (
	"bytes"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/msbtap/msbtap/plan"
)

// TestDocsParse: every configuration shipped under docs/cni passes the
// plugin's own checks (the shipped conflist was refused by every ADD once),
// and the DaemonSet's init step is the plugin's install mode, not a shell
// its FROM-scratch image does not have.
func TestDocsParse(t *testing.T) {
	files, _ := filepath.Glob("../docs/cni/*")
	if len(files) == 0 {
		t.Fatal("no files under docs/cni")
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		switch filepath.Ext(f) {
		case ".conflist":
			if err := CheckConflist(b); err != nil {
				t.Errorf("%s: %v", f, err)
			}
			var l struct{ CNIVersion string }
			json.Unmarshal(b, &l)
			if l.CNIVersion != "1.0.0" {
				t.Errorf("%s: cniVersion %s: Debian's containerd and podman read results up to 1.0.0", f, l.CNIVersion)
			}
		case ".yaml":
			if strings.Contains(string(b), "/bin/sh") || !strings.Contains(string(b), `"/msbtap-cni", "install"`) {
				t.Errorf("%s: the init step must be msbtap-cni install (the image has no shell)", f)
			}
		}
		if filepath.Base(f) == "Dockerfile" && !strings.Contains(string(b), `ENTRYPOINT ["/msbtap-cni", "install"]`) {
			t.Errorf("%s: the entry point must be msbtap-cni install", f)
		}
	}
}

// TestResultVersions: ADD answers in the version the runtime asked for,
// for every version the plugin claims.
func TestResultVersions(t *testing.T) {
	p, _ := plan.ForSlot(1030)
	args := &skel.CmdArgs{IfName: "eth0", Netns: "/run/netns/x"}
	for _, v := range version.All.SupportedVersions() {
		r, err := result(p, args).GetAsVersion(v)
		if err != nil {
			t.Errorf("%s: %v", v, err)
			continue
		}
		var buf bytes.Buffer
		if err := r.PrintTo(&buf); err != nil {
			t.Fatal(err)
		}
		var got struct{ CNIVersion string }
		json.Unmarshal(buf.Bytes(), &got)
		if got.CNIVersion != v {
			t.Errorf("asked for %s, answered %s", v, got.CNIVersion)
		}
		if _, err := version.NewResult(v, buf.Bytes()); err != nil {
			t.Errorf("%s: the runtime cannot read the answer: %v", v, err)
		}
	}
}

// TestDelNeedsOnlyState: a pod whose configuration stopped validating
// after its ADD (a policy file deleted, a bad field) can still be
// removed: DEL frees its slot and state.
func TestDelNeedsOnlyState(t *testing.T) {
	stateDir := t.TempDir()
	conf := `{"cniVersion": "1.0.0", "name": "n", "type": "msbtap-cni", "stateDir": "` + stateDir + `",
		"policy": "/no/such/policy.json", "mtu": 5}`
	if _, err := ParseConf([]byte(conf), ""); err == nil {
		t.Fatal("the configuration should not validate")
	}
	c := &NetConf{StateDir: stateDir, SlotRange: []int{2000, 2001}}
	slot, err := allocSlot(c, "pod-a")
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(stateDir, "pod-a")
	os.MkdirAll(dir, 0o700)
	writeState(dir, &state{ContainerID: "pod-a", Slot: slot})
	if err := Del(&skel.CmdArgs{ContainerID: "pod-a", StdinData: []byte(conf)}); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	if _, err := os.Stat(dir); err == nil {
		t.Error("state left")
	}
	if ents, _ := os.ReadDir(filepath.Join(stateDir, "slots")); len(ents) != 0 {
		t.Errorf("%d slots left", len(ents))
	}
	if err := Del(&skel.CmdArgs{ContainerID: "../x", StdinData: []byte(conf)}); err == nil {
		t.Error("DEL took a container id with a path")
	}
}

// TestBusyMetricsPortSkipsSlot: a port another process holds costs its
// slot, not the pod.
func TestBusyMetricsPortSkipsSlot(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	port := l.Addr().(*net.TCPAddr).Port
	c := &NetConf{StateDir: t.TempDir(), SlotRange: []int{3000, 3003}, MetricsHost: "127.0.0.1", MetricsPortBase: port}
	s, err := allocSlot(c, "pod-b")
	if err != nil || s != 3001 {
		t.Fatalf("slot %d %v, want 3001 (3000's port %d is busy)", s, err, port)
	}
	if a := c.metricsAddr(s); a != "127.0.0.1:"+strconv.Itoa(port+1) {
		t.Errorf("metrics at %s", a)
	}
	if _, err := os.Stat(filepath.Join(c.StateDir, "slots", "3000")); err == nil {
		t.Error("the skipped slot stays held")
	}
	if _, err := ParseConf([]byte(`{"metricsHost": "127.0.0.1", "metricsPortBase": 65000, "slotRange": [1024, 65535]}`), ""); err == nil {
		t.Error("a metrics range past 65535 accepted")
	}
}

// TestPolicyFromAnnotation: containerd's pod annotations pick a policy by
// name, with the same checks as CNI_ARGS.
func TestPolicyFromAnnotation(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "strict.json"), []byte(`{"default_action": "deny"}`), 0o644)
	conf := func(name string) []byte {
		return []byte(`{"type": "msbtap-cni", "policyDir": "` + dir + `", "runtimeConfig": {"io.kubernetes.cri.pod-annotations": {"` + PolicyAnnotation + `": "` + name + `", "other": "x"}}}`)
	}
	c, err := ParseConf(conf("strict"), "")
	if err != nil || string(c.Policy) != `"`+dir+`/strict.json"` {
		t.Fatalf("annotation policy: %s %v", c.Policy, err)
	}
	if _, err := ParseConf(conf("../../etc/passwd"), ""); err == nil || !strings.Contains(err.Error(), "not a path") {
		t.Errorf("a path in the annotation: %v", err)
	}
	if _, err := ParseConf(conf("absent"), ""); err == nil {
		t.Error("a policy name with no file accepted")
	}
}

// TestInstallMode: the DaemonSet's entry point copies the three files and
// refuses a configuration list that would fail every ADD.
func TestInstallMode(t *testing.T) {
	src, bin, conf := t.TempDir(), t.TempDir(), t.TempDir()
	for _, f := range []string{"plugin", "agent"} {
		os.WriteFile(filepath.Join(src, f), []byte("#!/bin/sh\n"+f+"\n"), 0o700)
	}
	good, _ := os.ReadFile("../docs/cni/10-msbtap.conflist")
	os.WriteFile(filepath.Join(src, "10-msbtap.conflist"), good, 0o600)
	in := Install{Plugin: filepath.Join(src, "plugin"), Agent: filepath.Join(src, "agent"), Conflist: filepath.Join(src, "10-msbtap.conflist"), BinDir: bin, ConfDir: conf}
	if err := in.Run(); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{filepath.Join(bin, "msbtap-cni"), filepath.Join(bin, "msbtap"), filepath.Join(conf, "10-msbtap.conflist")} {
		if st, err := os.Stat(f); err != nil || (filepath.Dir(f) == bin && st.Mode().Perm() != 0o755) {
			t.Errorf("%s: %v %v", f, st, err)
		}
	}
	if ents, _ := os.ReadDir(bin); len(ents) != 2 {
		t.Errorf("%d files in the bin dir (temporary files left?)", len(ents))
	}
	os.WriteFile(in.Conflist, []byte(`{"cniVersion": "1.0.0", "name": "x", "plugins": [{"type": "msbtap-cni", "mtu": 1}]}`), 0o600)
	if err := in.Run(); err == nil || !strings.Contains(err.Error(), "mtu") {
		t.Errorf("a bad conflist installed: %v", err)
	}
}

// TestSupervisorRestarts: the supervisor passes the first "ready" on,
// restarts an agent killed by a signal at once, and stops it on SIGTERM;
// an agent that fails before it is ready is not restarted.
func TestSupervisorRestarts(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	dir := t.TempDir()
	ns := filepath.Join(dir, "ns")
	os.WriteFile(ns, nil, 0o600)
	// The fake agent: counts its starts, says ready, and sleeps.
	script := `n=$(cat ` + dir + `/count 2>/dev/null || echo 0); echo $((n+1)) > ` + dir + `/count; echo $$ > ` + dir + `/pid; echo ready >&3; exec 3>&-; exec sleep 60`
	cmd := exec.Command(os.Args[0], "-test.run=^TestSuperviseHelper$")
	cmd.Env = append(os.Environ(), "MSBTAP_SUPERVISE_HELPER=1", "MSBTAP_SUPERVISE_NS="+ns, "MSBTAP_SUPERVISE_SCRIPT="+script)
	pr, pw, _ := os.Pipe()
	cmd.ExtraFiles = []*os.File{pw}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	buf := make([]byte, 16)
	n, _ := pr.Read(buf)
	if strings.TrimSpace(string(buf[:n])) != "ready" {
		t.Fatalf("no ready from the supervisor: %q", buf[:n])
	}
	first := agentPID(dir)
	exec.Command("kill", "-9", strconv.Itoa(first)).Run()
	deadline := time.Now().Add(2 * time.Second)
	for agentPID(dir) == first && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	second := agentPID(dir)
	if second == first {
		t.Fatal("the agent was not restarted within 2 s")
	}
	cmd.Process.Signal(os.Interrupt)
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("supervisor: %v", err)
		}
	case <-time.After(15 * time.Second):
		cmd.Process.Kill()
		t.Fatal("the supervisor did not stop")
	}
	if exec.Command("kill", "-0", strconv.Itoa(second)).Run() == nil {
		// The sleep may be a zombie of init for a moment.
		time.Sleep(200 * time.Millisecond)
		if b, _ := os.ReadFile("/proc/" + strconv.Itoa(second) + "/stat"); len(b) > 0 && !strings.Contains(string(b), ") Z") {
			t.Error("the agent outlived its supervisor")
			exec.Command("kill", "-9", strconv.Itoa(second)).Run()
		}
	}
	// An agent that fails at once: no restart, its status comes back.
	var errb bytes.Buffer
	if code := Supervise([]string{"--netns", ns, "--", "sh", "-c", "echo $$ >> " + dir + "/fails; exit 7"}, &errb); code != 7 {
		t.Errorf("status %d, want 7 (%s)", code, errb.String())
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "fails")); strings.Count(string(b), "\n") != 1 {
		t.Errorf("a failing agent ran %d times", strings.Count(string(b), "\n"))
	}
}

// TestSuperviseHelper is the supervisor process of TestSupervisorRestarts.
func TestSuperviseHelper(t *testing.T) {
	if os.Getenv("MSBTAP_SUPERVISE_HELPER") != "1" {
		t.Skip("run by TestSupervisorRestarts")
	}
	os.Exit(Supervise([]string{"--netns", os.Getenv("MSBTAP_SUPERVISE_NS"), "--", "sh", "-c", os.Getenv("MSBTAP_SUPERVISE_SCRIPT")}, os.Stderr))
}
