// Package integration holds the end-to-end tests: each builds its own world
// of network namespaces, attaches msbtap, and drives real clients (curl,
// dig, ping, iperf3) from inside the sandbox. They need root and skip,
// saying so, without it.
package integration

import (
	"os"
	"testing"

	"github.com/msbtap/msbtap/internal/testkit/testenv"
)

func TestMain(m *testing.M) {
	code := m.Run()
	testenv.Cleanup()
	os.Exit(code)
}
