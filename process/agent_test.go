package process

import (
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestSafeName: a name from the guest's bytes reaches --on-terminate's
// environment with nothing a shell could act on.
func TestSafeName(t *testing.T) {
	for in, want := range map[string]string{
		"files.pythonhosted.org":        "files.pythonhosted.org",
		"x.$(touch /tmp/pwned).example": "x.touchtmppwned.example",
		"a`id`;b|c&&d>e\n'\"\\":         "aidbcde",
		"xn--bcher-kva.example":         "xn--bcher-kva.example",
	} {
		if got := safeName(in); got != want {
			t.Errorf("safeName(%q) = %q, want %q", in, got, want)
		}
	}
}
