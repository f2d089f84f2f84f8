package cni

import (
	"testing"
	"time"
)

// TestSupervisorKeepsTerminationFatal: an agent that ends with msbtap's
// status after a fatal violation (3) is not restarted, even after it was
// ready: the sandbox stays cut off, and the supervisor ends with that
// status.
func TestSupervisorKeepsTerminationFatal(t *testing.T) {
	r := startSupervisor(t, `echo run >> $DIR/runs; echo ready >&3; exec 3>&-; sleep 0.2; exit 3`)
	r.wantExit(t, exitTerminated, "it kept going after a fatal violation")
	time.Sleep(300 * time.Millisecond) // a restart would have run by now
	if n := r.runs(); n != 1 {
		t.Errorf("the terminated agent ran %d times", n)
	}
}

// TestSupervisorHeedsTerminatedFD: an agent that reported a fatal
// violation on its --terminated-fd and then died of a signal (killed, or
// crashed while it tore down) is not restarted either.
func TestSupervisorHeedsTerminatedFD(t *testing.T) {
	r := startSupervisor(t, `echo run >> $DIR/runs; echo ready >&3; exec 3>&-; sleep 0.1; echo terminated >&4; kill -9 $$`)
	r.wantExit(t, exitTerminated, "it restarted an agent that reported a fatal violation")
	if n := r.runs(); n != 1 {
		t.Errorf("the terminated agent ran %d times", n)
	}
}
