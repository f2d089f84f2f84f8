package cni

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// Restart policy of the supervisor: the first restart comes at once (a pod
// must be back on the network within a couple of seconds), later ones back
// off up to restartMax; an agent that ran restartReset resets the backoff.
const (
	restartFirst = 20 * time.Millisecond
	restartMax   = 5 * time.Second
	restartReset = time.Minute
)

// exitTerminated is msbtap's status after a fatal violation: the sandbox
// is meant to stay cut off, so the supervisor never restarts it.
const exitTerminated = 3

// agentPID is the pid the agent wrote to its pid file in dir, or 0.
func agentPID(dir string) int {
	b, err := os.ReadFile(filepath.Join(dir, "pid"))
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return n
}

// Supervise is `msbtap-cni supervise --netns PATH -- MSBTAP ARGS...`: it
// runs the agent and restarts it, with the same arguments (namespace,
// slot, TAP name, policy), whenever it dies of anything but a clean exit
// or a fatal violation, as long as the namespace exists. The agent's first
// "ready" is passed on to the supervisor's own fd 3 (the plugin waits on
// it); SIGTERM or SIGINT stops the agent and then the supervisor.
func Supervise(args []string, stderr io.Writer) int {
	logf := func(format string, a ...any) {
		fmt.Fprintf(stderr, "msbtap-cni supervise: "+format+"\n", a...)
	}
	var nsPath string
	for len(args) > 0 && args[0] != "--" {
		if args[0] == "--netns" && len(args) > 1 {
			nsPath, args = args[1], args[2:]
			continue
		}
		logf("unknown argument %q (want --netns PATH -- COMMAND...)", args[0])
		return 2
	}
	if len(args) < 2 || nsPath == "" {
		logf("want --netns PATH -- COMMAND...")
		return 2
	}
	argv := args[1:]
	// The agent gets SIGTERM if the supervisor dies (Pdeathsig), which
	// Linux ties to the thread that forked it: keep one thread for that.
	runtime.LockOSThread()
	sigc := make(chan os.Signal, 2)
	signal.Notify(sigc, syscall.SIGTERM, syscall.SIGINT)
	readyOut := os.NewFile(3, "ready")
	backoff := restartFirst
	for first := true; ; first = false {
		started := time.Now()
		code, stopped, err := runAgent(argv, readyOut, sigc)
		readyOut = nil // only the first start reports
		switch {
		case err != nil:
			logf("start %s: %v", argv[0], err)
			return 1
		case stopped:
			return 0
		case first && !readyReported.Load():
			// It never came up: ADD reports the failure, nothing to keep.
			return code
		case code == 0 || code == exitTerminated:
			return code
		}
		if _, err := os.Stat(nsPath); err != nil {
			logf("the agent exited (%d) and its namespace %s is gone: not restarting", code, nsPath)
			return 0
		}
		if time.Since(started) > restartReset {
			backoff = restartFirst
		}
		logf("the agent exited (status %d) after %s; restarting in %s", code, time.Since(started).Round(time.Millisecond), backoff)
		select {
		case <-sigc:
			return 0
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, restartMax)
	}
}

// readyReported is set once the agent's first "ready" was passed on.
var readyReported atomic.Bool

// runAgent runs argv once with a ready pipe as its fd 3, passing its
// "ready" line to readyOut (if any). It returns the exit status (128+N
// for a signal), or stopped when sigc asked the supervisor to stop.
func runAgent(argv []string, readyOut *os.File, sigc chan os.Signal) (code int, stopped bool, err error) {
	pr, pw, err := os.Pipe()
	if err != nil {
		return 0, false, err
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	cmd.ExtraFiles = []*os.File{pw}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		pw.Close()
		pr.Close()
		return 0, false, err
	}
	pw.Close()
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		defer pr.Close()
		s, _ := bufio.NewReader(pr).ReadString('\n')
		if strings.TrimSpace(s) == "ready" && readyOut != nil {
			readyReported.Store(true)
			readyOut.WriteString("ready\n")
			readyOut.Close()
		}
	}()
	done := make(chan error, 1)
	go func() {
		err := cmd.Wait()
		<-readDone // the pipe ends with the agent
		done <- err
	}()
	for {
		select {
		case <-sigc:
			cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				cmd.Process.Kill()
				<-done
			}
			return 0, true, nil
		case err := <-done:
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
					return 128 + int(ws.Signal()), false, nil
				}
				return ee.ExitCode(), false, nil
			}
			if err != nil {
				return 1, false, nil
			}
			return 0, false, nil
		}
	}
}
