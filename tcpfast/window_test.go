package tcpfast

import (
	"net"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// connectedFD is a connected, non-blocking TCP socket on loopback whose
// peer never reads.
func connectedFD(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err == nil {
			t.Cleanup(func() { c.Close() })
		}
	}()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	port := ln.Addr().(*net.TCPAddr).Port
	if err := unix.Connect(fd, &unix.SockaddrInet4{Port: port, Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		t.Fatal(err)
	}
	return fd
}

// TestWindowEstimateNeverOverAnnounces: the window the guest is given
// (recvWindow, which asks the socket's queue only when its estimate runs
// low) is never more than what the socket would take, however much was
// sent into it; and a send buffer not known is asked for, not taken as a
// shut window for good.
func TestWindowEstimateNeverOverAnnounces(t *testing.T) {
	fd := connectedFD(t)
	tr := &Translator{o: Options{}}
	sb, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF)
	if err != nil {
		t.Fatal(err)
	}
	var up, down atomic.Uint64
	c := &conn{t: tr, fd: fd, sndbuf: 0, outEst: 0, fl: Flow{Up: &up, Down: &down}}
	if w := c.recvWindow(); w == 0 {
		t.Fatalf("window 0 with an unknown send buffer (%d) and an empty queue", sb)
	}
	chunk := make([]byte, 1500)
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		took, ok := c.send(chunk, false)
		if !ok {
			t.Fatal("send reset the connection")
		}
		out, err := unix.IoctlGetInt(fd, unix.SIOCOUTQ)
		if err != nil {
			t.Fatal(err)
		}
		buf, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF)
		w := int(c.recvWindow())
		if free := buf - out; w > free {
			t.Fatalf("window %d announced with %d free (send buffer %d, queued %d)", w, free, buf, out)
		}
		if took == 0 {
			// Full: the peer never reads. (Its free space counts skb
			// overhead the queue does not show, so the last window may
			// be more than 0: the translator holds what does not fit.)
			return
		}
	}
	t.Fatal("the socket never filled")
}
