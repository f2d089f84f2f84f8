package intercept

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"github.com/msbtap/msbtap/flow"
	"github.com/msbtap/msbtap/policy"
)

// The cost of interception next to splicing, on loopback: one 8 MiB
// download over a fresh connection per iteration (throughput), and a new
// connection with one small request per iteration (connection rate).
func benchTransfer(b *testing.B, mode Mode, size int) {
	w := newWorld(b, mode, allowWeb)
	pool := x509.NewCertPool()
	pool.AddCert(w.ca.Cert())
	if mode != All {
		pool = nil // spliced: the upstream's own certificate
	}
	b.SetBytes(int64(size))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		guest, wait := w.serve(b)
		c := tls.Client(guest, &tls.Config{ServerName: "example.com", RootCAs: pool, InsecureSkipVerify: pool == nil, NextProtos: []string{"http/1.1"}})
		c.SetDeadline(time.Now().Add(30 * time.Second))
		req, _ := http.NewRequest("GET", "https://example.com/bytes?n="+strconv.Itoa(size), nil)
		req.Header.Set("Connection", "close")
		if err := req.Write(c); err != nil {
			b.Fatal(err)
		}
		n, _ := io.Copy(io.Discard, c)
		if n < int64(size) {
			b.Fatalf("%d bytes", n)
		}
		c.Close()
		wait()
	}
}

func BenchmarkSplicedDownload8M(b *testing.B)     { benchTransfer(b, Auto, 8<<20) }
func BenchmarkInterceptedDownload8M(b *testing.B) { benchTransfer(b, All, 8<<20) }
func BenchmarkSplicedConnection(b *testing.B)     { benchTransfer(b, Auto, 1) }
func BenchmarkInterceptedConnection(b *testing.B) { benchTransfer(b, All, 1) }

// The cost of reading plain HTTP for the domain deny rules: a new flow to
// port 80 with one small request per iteration, spliced after its first
// bytes (no deny rules: the stack would not even hand such a flow over)
// and proxied request by request (deny rules).
func benchPlainHTTP(b *testing.B, policyJSON string) {
	w := newPlainWorld(b, Auto, policyJSON)
	w.dst = netip.AddrPortFrom(w.dst.Addr(), 80)
	// One listener for the sandbox's ends: a new one per flow costs the
	// kernel a search for a free port longer than the flow itself.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		guest, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		inside, err := ln.Accept()
		if err != nil {
			b.Fatal(err)
		}
		up, err := net.Dial("tcp", w.upAddr)
		if err != nil {
			b.Fatal(err)
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			w.h.Handle(context.Background(), flow.Of(policy.Flow{ID: 1, Proto: policy.TCP, Dst: w.dst}, w.decided), inside, up)
		}()
		wait := func() { <-done; inside.Close() }
		guest.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(guest, "GET /x HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(guest), nil)
		if err != nil || resp.StatusCode != 200 {
			b.Fatalf("%v %v", resp, err)
		}
		io.Copy(io.Discard, resp.Body)
		guest.Close()
		wait()
	}
}

func BenchmarkPlainHTTPSpliced(b *testing.B) {
	benchPlainHTTP(b, `{"default_action": "allow"}`)
}

func BenchmarkPlainHTTPDenyChecked(b *testing.B) {
	benchPlainHTTP(b, `{"default_action": "allow", "rules": [{"destination": {"domain": "evil.test"}, "action": "deny"}]}`)
}
