package agent

import (
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/msbtap/msbtap/policy"
)

// Terminated is the error Run returns after a fatal violation stopped the
// sandbox; msbtap exits with status 3.
type Terminated struct {
	Proto, Src, Dst, Domain, Rule string
	// Secret names the secret whose placeholder went where it may not.
	Secret string
}

func (t *Terminated) Error() string {
	return fmt.Sprintf("sandbox terminated: %s flow %s -> %s violated %s", t.Proto, t.Src, t.Dst, t.Rule)
}

// terminatorConfig is what the terminator needs of the agent.
type terminatorConfig struct {
	onTerminate string
	guestPID    int
	// cut cuts the sandbox's network at once (deny everything, reset every
	// open flow).
	cut func()
	// notify, if set, hears "terminated" before anything else happens.
	notify *os.File
}

// terminator carries out the termination hook: once, on the first fatal
// decision, it stops the sandbox and hands the violation to Run, which
// runs --on-terminate and returns a *Terminated.
type terminator struct {
	c      terminatorConfig
	runner *hookRunner // runs --on-terminate; started before privileges drop
	holder *policy.Holder
	log    *slog.Logger
	pgid   atomic.Int64

	mu      sync.Mutex // mu protects pending
	pending *Terminated
	once    sync.Once
	firing  atomic.Bool // set before the sandbox is killed
	fired   chan Terminated
}

func newTerminator(c terminatorConfig, holder *policy.Holder, log *slog.Logger) *terminator {
	return &terminator{c: c, holder: holder, log: log, fired: make(chan Terminated, 1)}
}

func (t *terminator) setProcessGroup(pgid int) { t.pgid.Store(int64(pgid)) }

// record keeps the first fatal violation for the hook, which the gateway
// fires right after reporting it.
func (t *terminator) record(f policy.Flow, d policy.Decision) { t.recordSecret(f, d, "") }

// recordSecret is record for a violation that involves a secret.
func (t *terminator) recordSecret(f policy.Flow, d policy.Decision, secret string) {
	v := &Terminated{Proto: protoLabel(f), Src: addrLabel(f.Src.String()), Dst: addrLabel(f.Dst.String()),
		Domain: f.Domain, Rule: ruleLabel(d, t.holder.Load()), Secret: secret}
	t.mu.Lock()
	if t.pending == nil {
		t.pending = v
	}
	t.mu.Unlock()
}

// hook is the shared state's termination hook. It runs on the packet path:
// first it cuts the network (nothing more gets out, every open flow is
// reset), then it stops the sandbox's processes, then it wakes Run, which
// runs --on-terminate.
func (t *terminator) hook() {
	t.once.Do(func() {
		t.firing.Store(true)
		t.mu.Lock()
		v := t.pending
		t.mu.Unlock()
		if v == nil {
			v = &Terminated{Rule: "termination hook"}
		}
		if t.c.notify != nil {
			t.c.notify.WriteString("terminated\n")
		}
		if t.c.cut != nil {
			t.c.cut()
		}
		t.kill()
		t.fired <- *v
	})
}

func (t *terminator) kill() {
	if pg := t.pgid.Load(); pg > 0 {
		_ = syscall.Kill(-int(pg), syscall.SIGKILL)
	}
	if t.c.guestPID > 0 {
		_ = syscall.Kill(t.c.guestPID, syscall.SIGKILL)
	}
}

// finish logs the violation, runs --on-terminate, and returns it.
func (t *terminator) finish(v Terminated) error {
	t.log.Error("policy violation: sandbox terminated", "proto", v.Proto, "src", v.Src,
		"dst", v.Dst, "domain", v.Domain, "rule", v.Rule, "secret", v.Secret)
	if t.runner != nil {
		env := []string{
			"MSBTAP_VIOLATION_PROTO=" + v.Proto,
			"MSBTAP_VIOLATION_SRC=" + v.Src,
			"MSBTAP_VIOLATION_DST=" + v.Dst,
			"MSBTAP_VIOLATION_DOMAIN=" + safeName(v.Domain),
			"MSBTAP_VIOLATION_RULE=" + v.Rule,
		}
		if v.Secret != "" {
			env = append(env, "MSBTAP_VIOLATION_SECRET="+v.Secret) // a declared name: letters, digits, _
		}
		if err := t.runner.run(t.c.onTerminate, env); err != nil {
			t.log.Error("--on-terminate failed", "err", err)
		}
		t.runner = nil
	}
	return &v
}

// safeName keeps only letters, digits, '-' and '.' of a name that came from
// the guest's bytes, so that a shell running --on-terminate cannot be made
// to run any of it.
func safeName(s string) string {
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' {
			b = append(b, c)
		}
	}
	return string(b)
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
