package cni

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestSupervisorKeepsTerminationFatal: an agent that ends with msbtap's
// status after a fatal violation (3) is not restarted, even after it was
// ready: the sandbox stays cut off, and the supervisor ends with that
// status.
func TestSupervisorKeepsTerminationFatal(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	dir := t.TempDir()
	ns := filepath.Join(dir, "ns")
	os.WriteFile(ns, nil, 0o600)
	script := `echo run >> ` + dir + `/runs; echo ready >&3; exec 3>&-; sleep 0.2; exit 3`
	cmd := exec.Command(os.Args[0], "-test.run=^TestSuperviseHelper$")
	cmd.Env = append(os.Environ(), "MSBTAP_SUPERVISE_HELPER=1", "MSBTAP_SUPERVISE_NS="+ns, "MSBTAP_SUPERVISE_SCRIPT="+script)
	pr, pw, _ := os.Pipe()
	defer pr.Close()
	cmd.ExtraFiles = []*os.File{pw}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != exitTerminated {
			t.Errorf("supervisor ended with %v, want status %d", err, exitTerminated)
		}
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatal("the supervisor kept going after a fatal violation")
	}
	time.Sleep(300 * time.Millisecond) // a restart would have run by now
	if b, _ := os.ReadFile(filepath.Join(dir, "runs")); strings.Count(string(b), "\n") != 1 {
		t.Errorf("the terminated agent ran %d times", strings.Count(string(b), "\n"))
	}
}

// TestSupervisorHeedsTerminatedFD: an agent that reported a fatal
// violation on its --terminated-fd and then died of a signal (killed, or
// crashed while it tore down) is not restarted either.
func TestSupervisorHeedsTerminatedFD(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	dir := t.TempDir()
	ns := filepath.Join(dir, "ns")
	os.WriteFile(ns, nil, 0o600)
	script := `echo run >> ` + dir + `/runs; echo ready >&3; exec 3>&-; sleep 0.1; echo terminated >&4; kill -9 $$`
	cmd := exec.Command(os.Args[0], "-test.run=^TestSuperviseHelper$")
	cmd.Env = append(os.Environ(), "MSBTAP_SUPERVISE_HELPER=1", "MSBTAP_SUPERVISE_NS="+ns, "MSBTAP_SUPERVISE_SCRIPT="+script)
	pr, pw, _ := os.Pipe()
	defer pr.Close()
	cmd.ExtraFiles = []*os.File{pw}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != exitTerminated {
			t.Errorf("supervisor ended with %v, want status %d", err, exitTerminated)
		}
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatal("the supervisor restarted an agent that reported a fatal violation")
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "runs")); strings.Count(string(b), "\n") != 1 {
		t.Errorf("the terminated agent ran %d times", strings.Count(string(b), "\n"))
	}
}
