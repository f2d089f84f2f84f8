package intercept

import (
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"testing"
	"time"
)

// TestHoldEOF: while a request is served, the end of the client's stream
// is held from the one-byte background read only; a past deadline takes
// that read back; once the request is done the end is reported.
func TestHoldEOF(t *testing.T) {
	client, server := net.Pipe()
	c := newHoldEOF(server)
	defer c.Close()
	c.state(http.StateActive)
	client.Close() // the client's side ends

	big := make([]byte, 4096)
	if _, err := c.Read(big); !errors.Is(err, io.EOF) {
		t.Fatalf("a body read got %v, want EOF at once", err)
	}
	got := make(chan error, 1)
	go func() { _, err := c.Read(make([]byte, 1)); got <- err }()
	select {
	case err := <-got:
		t.Fatalf("the background read returned %v while the request is served", err)
	case <-time.After(50 * time.Millisecond):
	}
	c.SetReadDeadline(time.Unix(1, 0)) // the server's abortPendingRead
	if err := <-got; !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("after a past deadline: %v", err)
	}
	c.SetReadDeadline(time.Time{})
	go func() { _, err := c.Read(make([]byte, 1)); got <- err }()
	time.Sleep(20 * time.Millisecond)
	c.state(http.StateIdle)
	select {
	case err := <-got:
		if !errors.Is(err, io.EOF) {
			t.Fatalf("once idle: %v, want EOF", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("the held read did not end when the request was done")
	}
}
