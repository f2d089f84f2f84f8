package process

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/msbtap/msbtap/ask"
)

// AskRunnerArg is the hidden first argument that makes msbtap run as the
// --ask-exec runner; main hands control to AskRunner when it sees it.
const AskRunnerArg = "__msbtap-ask-runner"

// askExecOutput bounds what --ask-exec may print.
const askExecOutput = 4096

// askRunner is a process started before msbtap loads its seccomp filter
// (which forbids running programs), as the user --ask-exec runs as. The
// agent writes it one question per line; it runs the command for each
// (the question as JSON on stdin) and writes back the answer.
type askRunner struct {
	cmd *exec.Cmd
	mu  sync.Mutex // mu protects w, waits and next
	w   io.WriteCloser
	// waits are the questions sent, by request number.
	waits map[uint64]chan askReply
	next  uint64
	done  chan struct{}
}

type askRequest struct {
	N        uint64       `json:"n"`
	Question ask.Question `json:"question"`
}

type askReply struct {
	N      uint64 `json:"n"`
	Answer string `json:"answer,omitempty"`
	Error  string `json:"error,omitempty"`
}

func startAskRunner(command string, uid, gid int, timeout time.Duration) (*askRunner, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find msbtap's own binary: %w", err)
	}
	cmd := exec.Command(self, AskRunnerArg, command, timeout.String())
	// Not msbtap's environment: it may hold secrets' values (--secret),
	// and the runner is not protected as the agent is.
	cmd.Env = askExecEnv()
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if uid > 0 {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	}
	w, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	r, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start the --ask-exec runner: %w", err)
	}
	ar := &askRunner{cmd: cmd, w: w, waits: map[uint64]chan askReply{}, done: make(chan struct{})}
	go ar.read(r)
	return ar, nil
}

func (ar *askRunner) read(r io.Reader) {
	defer close(ar.done)
	dec := json.NewDecoder(r)
	for {
		var rep askReply
		if err := dec.Decode(&rep); err != nil {
			return
		}
		ar.mu.Lock()
		ch := ar.waits[rep.N]
		delete(ar.waits, rep.N)
		ar.mu.Unlock()
		if ch != nil {
			ch <- rep
		}
	}
}

// ask has the runner ask the command about q.
func (ar *askRunner) ask(ctx context.Context, q ask.Question) (ask.Answer, error) {
	ch := make(chan askReply, 1)
	ar.mu.Lock()
	ar.next++
	n := ar.next
	ar.waits[n] = ch
	err := json.NewEncoder(ar.w).Encode(askRequest{N: n, Question: q})
	ar.mu.Unlock()
	defer func() { ar.mu.Lock(); delete(ar.waits, n); ar.mu.Unlock() }()
	if err != nil {
		return ask.Answer{}, fmt.Errorf("the --ask-exec runner: %w", err)
	}
	select {
	case rep := <-ch:
		if rep.Error != "" {
			return ask.Answer{}, errors.New(rep.Error)
		}
		return parseAskAnswer(rep.Answer)
	case <-ar.done:
		return ask.Answer{}, errors.New("the --ask-exec runner is gone")
	case <-ctx.Done():
		return ask.Answer{}, ctx.Err()
	}
}

func (ar *askRunner) close() {
	ar.w.Close() // the runner ends at EOF
	select {
	case <-ar.done:
	case <-time.After(2 * time.Second):
		ar.cmd.Process.Kill()
	}
	ar.cmd.Wait()
}

// askExecEnv is the environment --ask-exec runs in: a PATH, and nothing
// else of msbtap's.
func askExecEnv() []string {
	path := os.Getenv("PATH")
	if path == "" {
		path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	}
	return []string{"PATH=" + path}
}

// parseAskAnswer reads what --ask-exec printed: allow, allow always, deny
// or deny always (its first line, case and spaces aside).
func parseAskAnswer(s string) (ask.Answer, error) {
	line, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	switch strings.Join(strings.Fields(strings.ToLower(line)), " ") {
	case "allow":
		return ask.Answer{Allow: true}, nil
	case "allow always":
		return ask.Answer{Allow: true, Always: true}, nil
	case "deny":
		return ask.Answer{}, nil
	case "deny always":
		return ask.Answer{Always: true}, nil
	}
	return ask.Answer{}, fmt.Errorf("--ask-exec printed %q: want allow, allow always, deny or deny always", line)
}

// AskRunner is the runner's main: one question per line on stdin, each
// run through /bin/sh -c COMMAND (os.Args[2]) with the question as JSON on
// its stdin, at most os.Args[3] each, the answer written back on stdout.
// It returns never: it exits at EOF.
func AskRunner() {
	command := os.Args[2]
	timeout, err := time.ParseDuration(os.Args[3])
	if err != nil {
		timeout = ask.DefaultTimeout
	}
	var mu sync.Mutex
	out := json.NewEncoder(os.Stdout)
	sc := bufio.NewScanner(os.Stdin)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var wg sync.WaitGroup
	for sc.Scan() {
		var req askRequest
		if err := json.Unmarshal(sc.Bytes(), &req); err != nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			rep := askReply{N: req.N}
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			in, _ := json.Marshal(req.Question)
			cmd := exec.CommandContext(ctx, "/bin/sh", "-c", command)
			cmd.Stdin = bytes.NewReader(append(in, '\n'))
			cmd.Stderr = os.Stderr
			var b limitedBuffer
			cmd.Stdout = &b
			if err := cmd.Run(); err != nil {
				rep.Error = fmt.Sprintf("--ask-exec: %v", err)
			} else {
				rep.Answer = b.String()
			}
			mu.Lock()
			out.Encode(rep)
			mu.Unlock()
		}()
	}
	wg.Wait()
	os.Exit(0)
}

// limitedBuffer keeps the first askExecOutput bytes written to it.
type limitedBuffer struct{ bytes.Buffer }

func (l *limitedBuffer) Write(p []byte) (int, error) {
	if room := askExecOutput - l.Len(); room > 0 {
		l.Buffer.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}
