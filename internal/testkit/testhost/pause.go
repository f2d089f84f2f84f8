package main

import (
	"os"
	"os/signal"
	"syscall"
)

// pause is a pod's sandbox process for the engine tests (what the
// registry's pause image does): it waits for SIGTERM or SIGINT, reaping
// any child handed to it as PID 1.
func pause() {
	sigc := make(chan os.Signal, 4)
	signal.Notify(sigc, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sigc {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
