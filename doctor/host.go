package doctor

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"

	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/netns"
	"github.com/msbtap/msbtap/tap"
)

// Host returns the Env of this machine, as the calling process sees it
// (sysctls are read in its own network namespace: run doctor where the
// agents run).
func Host() *Env {
	return &Env{
		ReadFile: os.ReadFile,
		Stat:     os.Stat,
		LookPath: exec.LookPath,
		NoFile: func() (uint64, uint64, error) {
			var l unix.Rlimit
			if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &l); err != nil {
				return 0, 0, err
			}
			return l.Cur, l.Max, nil
		},
		Root: os.Geteuid() == 0,
		OpenTUN: func() error {
			f, err := os.OpenFile("/dev/net/tun", os.O_RDWR, 0)
			if err != nil {
				return err
			}
			return f.Close()
		},
		ProbeTC: probeTC,
	}
}

// probeTC joins two TAPs the way msbtap run --vm does, in a namespace of
// its own that goes away with them.
func probeTC() error {
	ns, err := netns.New()
	if err != nil {
		return err
	}
	defer ns.Close()
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		return err
	}
	name := "doc" + hex.EncodeToString(b[:])
	return netns.Do(ns, func() error {
		t, err := tap.CreateVMTap(name, -1, 1500, false)
		if t != nil {
			err = errors.Join(err, t.Close())
		}
		return err
	})
}
