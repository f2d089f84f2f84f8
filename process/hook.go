package process

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"time"
)

// HookRunnerArg is the hidden first argument that makes msbtap run as the
// --on-terminate runner; main hands control to HookRunner when it sees it.
const HookRunnerArg = "__msbtap-hook-runner"

// hookTimeout bounds --on-terminate.
const hookTimeout = 30 * time.Second

// hookRequest is what the agent hands the runner on a fatal violation.
type hookRequest struct {
	Command string
	Env     []string
}

// hookRunner is a process started before msbtap drops its capabilities and
// loads its seccomp filter, so that --on-terminate runs with the
// privileges msbtap started with. It waits on a pipe: the violation, or
// nothing (EOF) when the sandbox ends without one.
type hookRunner struct {
	cmd  *exec.Cmd
	w    *os.File
	done chan error
}

func startHookRunner() (*hookRunner, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find msbtap's own binary: %w", err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer r.Close()
	cmd := exec.Command(self, HookRunnerArg)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.ExtraFiles = []*os.File{r}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		w.Close()
		return nil, fmt.Errorf("start the --on-terminate runner: %w", err)
	}
	h := &hookRunner{cmd: cmd, w: w, done: make(chan error, 1)}
	go func() { h.done <- cmd.Wait() }()
	return h, nil
}

// run has the runner run command with env, and waits (at most hookTimeout).
func (h *hookRunner) run(command string, env []string) error {
	err := json.NewEncoder(h.w).Encode(hookRequest{Command: command, Env: env})
	h.w.Close()
	if err != nil {
		return err
	}
	select {
	case err := <-h.done:
		return err
	case <-time.After(hookTimeout):
		syscall.Kill(h.cmd.Process.Pid, syscall.SIGKILL) // a plain kill: the seccomp list has no pidfd signals
		<-h.done
		return fmt.Errorf("still running after %s: killed", hookTimeout)
	}
}

// close ends a runner that was not needed.
func (h *hookRunner) close() {
	h.w.Close()
	select {
	case <-h.done:
	case <-time.After(hookTimeout):
		syscall.Kill(h.cmd.Process.Pid, syscall.SIGKILL)
	}
}

// HookRunner is the runner's main: it reads one request from fd 3 and
// replaces itself with /bin/sh -c COMMAND; on EOF it exits. It never
// returns.
func HookRunner() {
	var req hookRequest
	if err := json.NewDecoder(os.NewFile(3, "hook")).Decode(&req); err != nil {
		os.Exit(0) // no violation
	}
	err := syscall.Exec("/bin/sh", []string{"/bin/sh", "-c", req.Command}, append(os.Environ(), req.Env...))
	fmt.Fprintf(os.Stderr, "msbtap: --on-terminate: %v\n", err)
	os.Exit(127)
}
