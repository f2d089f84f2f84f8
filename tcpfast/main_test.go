package tcpfast

import (
	"fmt"
	"os"
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if any goroutine outlives them; the
// fuzz target's shared translator and server are stopped first.
func TestMain(m *testing.M) {
	code := m.Run()
	if rig != nil {
		rig.ln.Close()
		rig.tr.Close()
	}
	if code == 0 {
		if err := goleak.Find(goleak.IgnoreTopFunction("github.com/msbtap/msbtap/tcpfast.getRig.func1.1")); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}
