//go:build race

package stack

// raceEnabled: the race detector's instrumentation allocates.
const raceEnabled = true
