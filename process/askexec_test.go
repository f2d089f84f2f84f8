package process

import (
	"strings"
	"testing"

	"github.com/msbtap/msbtap/ask"
)

func TestParseAskAnswer(t *testing.T) {
	for in, want := range map[string]ask.Answer{
		"allow\n": {Allow: true}, " Allow  Always \nignored": {Allow: true, Always: true},
		"deny": {}, "DENY always": {Always: true},
	} {
		if got, err := parseAskAnswer(in); err != nil || got != want {
			t.Errorf("%q: got %+v %v, want %+v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "yes", "allow please", "maybe\nallow"} {
		if _, err := parseAskAnswer(in); err == nil {
			t.Errorf("%q: no error", in)
		}
	}
}

// TestAskExecEnv: --ask-exec never sees msbtap's environment, where
// secrets' values may be.
func TestAskExecEnv(t *testing.T) {
	t.Setenv("MSBTAP_TEST_SECRET", "s3cr3t")
	for _, kv := range askExecEnv() {
		if !strings.HasPrefix(kv, "PATH=") {
			t.Errorf("--ask-exec gets %q", kv)
		}
	}
}
