package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/msbtap/msbtap/policy"
)

// WriteLearned writes the policy learn mode recorded (if it is on) to the
// --learn file now.
func (a *Agent) WriteLearned() {
	if a.learner == nil {
		a.log.Warn("not in learn mode (--learn), nothing to write")
		return
	}
	a.writeLearned()
}

// writeLearned writes the policy learn mode recorded to the --learn file,
// atomically: a reader sees the old file or the new one, never half.
func (a *Agent) writeLearned() {
	f := a.learner.Policy(policy.LearnOptions{SuffixDepth: a.cfg.LearnSuffixDepth})
	if err := a.writePolicyFile("learn", a.cfg.Learn, f); err != nil {
		a.log.Error("write the learned policy", "file", a.cfg.Learn, "err", err)
		return
	}
	if n := a.learner.Dropped(); n > 0 {
		a.log.Warn("learn mode: destinations past its bound were not recorded", "dropped", n, "bound", policy.DefaultLearnMax)
	}
	a.log.Info("learned policy written", "file", a.cfg.Learn, "rules", len(f.Rules))
}

// writePolicyFile writes f to path (the --learn file, or the policy
// file), through Files once the process is no longer root.
func (a *Agent) writePolicyFile(which, path string, f *policy.File) error {
	files := a.filesOr()
	if files == nil {
		return WritePolicyFile(path, f)
	}
	b, err := json.Marshal(f)
	if err != nil {
		return err
	}
	return files.WritePolicy(which, b)
}

// WritePolicyFile writes f as an indented policy file at path through a
// temporary file in the same directory, renamed over path. A file already
// there keeps its mode and owner (a root-only policy stays so); a new one
// is 0644.
func WritePolicyFile(path string, f *policy.File) error {
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("create: %w", err)
	}
	mode := os.FileMode(0o644)
	_, err = tmp.Write(append(b, '\n'))
	if st, serr := os.Lstat(path); serr == nil && st.Mode().IsRegular() {
		mode = st.Mode().Perm()
		// The owner too where it is another's and can be given back: the
		// keeper (no CAP_CHOWN, no chown under its filter) cannot, and its
		// file then stays root's, with the mode kept.
		if sys, ok := st.Sys().(*syscall.Stat_t); ok && (int(sys.Uid) != os.Getuid() || int(sys.Gid) != os.Getgid()) {
			_ = tmp.Chown(int(sys.Uid), int(sys.Gid))
		}
	}
	err = errors.Join(err, tmp.Chmod(mode), tmp.Sync(), tmp.Close())
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return err
	}
	return nil
}
