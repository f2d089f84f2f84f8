package intercept

import (
	"crypto/tls"
	"crypto/x509"
	"io"
	"net/http"
	"strconv"
	"testing"
	"time"
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
