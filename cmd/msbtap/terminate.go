package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/rings"
)

// violation is the flow that made the sandbox stop.
type violation struct {
	flow     policy.Flow
	decision policy.Decision
	rule     string
}

// terminator carries out the termination hook: once, on the first fatal
// decision, it hands the violation to the main loop, which stops the
// sandbox, runs --on-terminate and exits with status 3.
type terminator struct {
	o      runOptions
	log    *slog.Logger
	shared *rings.Shared
	pgid   atomic.Int64

	mu      sync.Mutex // mu protects pending
	pending *violation
	once    sync.Once
	firing  atomic.Bool // set before the sandbox is killed
	fired   chan violation
}

func newTerminator(o runOptions, log *slog.Logger) *terminator {
	return &terminator{o: o, log: log, fired: make(chan violation, 1)}
}

func (t *terminator) setProcessGroup(pgid int) { t.pgid.Store(int64(pgid)) }

// Fire records a fatal violation and triggers the shared state's
// termination hook, as the seed engine's trigger_termination does.
func (t *terminator) Fire(f policy.Flow, d policy.Decision, e *policy.Engine) {
	v := violation{flow: f, decision: d, rule: ruleLabel(d, e)}
	t.mu.Lock()
	if t.pending == nil {
		t.pending = &v
	}
	t.mu.Unlock()
	if t.shared == nil || !t.shared.TriggerTermination() {
		t.hook()
	}
}

// hook is installed with SetTerminationHook. It runs on the packet path, so
// it only stops the sandbox's processes (at once, so nothing more gets out)
// and wakes the main loop.
func (t *terminator) hook() {
	t.once.Do(func() {
		t.firing.Store(true)
		t.mu.Lock()
		v := t.pending
		t.mu.Unlock()
		if v == nil {
			v = &violation{rule: "termination hook"}
		}
		t.kill()
		t.fired <- *v
	})
}

func (t *terminator) kill() {
	if pg := t.pgid.Load(); pg > 0 {
		_ = syscall.Kill(-int(pg), syscall.SIGKILL)
	}
	if t.o.guestPID > 0 {
		_ = syscall.Kill(t.o.guestPID, syscall.SIGKILL)
	}
}

// finish logs the violation, runs --on-terminate, and returns exit status 3.
func (t *terminator) finish(v violation, cmdDone chan error) error {
	t.log.Error("policy violation: sandbox terminated", "proto", protoLabel(v.flow), "src", v.flow.Src,
		"dst", v.flow.Dst, "domain", v.flow.Domain, "rule", v.rule)
	if t.o.onTerminate != "" {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, "/bin/sh", "-c", t.o.onTerminate)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		cmd.Env = append(os.Environ(),
			"MSBTAP_VIOLATION_PROTO="+protoLabel(v.flow),
			"MSBTAP_VIOLATION_SRC="+addrLabel(v.flow.Src.String()),
			"MSBTAP_VIOLATION_DST="+addrLabel(v.flow.Dst.String()),
			"MSBTAP_VIOLATION_DOMAIN="+v.flow.Domain,
			"MSBTAP_VIOLATION_RULE="+v.rule,
		)
		if err := cmd.Run(); err != nil {
			t.log.Error("--on-terminate failed", "err", err)
		}
	}
	return withStatus(3, fmt.Errorf("sandbox terminated: %s flow %s -> %s violated %s", protoLabel(v.flow), v.flow.Src, v.flow.Dst, v.rule))
}

func protoLabel(f policy.Flow) string {
	if f.DNS {
		return "dns"
	}
	return f.Proto.String()
}

func addrLabel(s string) string {
	if s == "invalid AddrPort" {
		return ""
	}
	return s
}

// ruleLabel names the deciding rule: its index and description.
func ruleLabel(d policy.Decision, e *policy.Engine) string {
	switch d.Rule {
	case policy.RuleBlockList:
		return "dns block list"
	case policy.RuleRebind:
		return "dns rebinding protection"
	}
	if e == nil {
		return strconv.Itoa(d.Rule)
	}
	return e.Describe(d.Rule)
}
