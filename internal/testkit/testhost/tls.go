package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"os"
	"strings"
	"time"
)

// testCA is a CA the test host makes at start, for its HTTPS servers.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(name string) *testCA {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		log.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		log.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert, key}
}

func (ca *testCA) pem() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw})
}

// leaf issues one certificate for all names.
func (ca *testCA) leaf(names []string) tls.Certificate {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		log.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: names[0]},
		DNSNames: names, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		log.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der, ca.cert.Raw}, PrivateKey: key}
}

// serveHTTPS serves the HTTP handler, plus /echo, over TLS (HTTP/2 and
// HTTP/1.1) on addr with a certificate for names.
func serveHTTPS(addr string, cert tls.Certificate) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{Handler: httpHandler(), TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2", "http/1.1"}}}
	go srv.ServeTLS(ln, "", "")
}

// echoRequest answers with what it received, as JSON.
func echoRequest(w http.ResponseWriter, r *http.Request) {
	h := sha256.New()
	n, _ := io.Copy(h, r.Body)
	out := map[string]any{
		"proto": r.Proto, "method": r.Method, "host": r.Host, "path": r.URL.Path, "query": r.URL.RawQuery,
		"headers": r.Header, "body_len": n, "body_sha256": hex.EncodeToString(h.Sum(nil)),
		"transfer_encoding": r.TransferEncoding, "content_length": r.ContentLength,
	}
	if r.TLS != nil {
		out["sni"], out["alpn"] = r.TLS.ServerName, r.TLS.NegotiatedProtocol
	}
	if u, p, ok := r.BasicAuth(); ok {
		out["basic_user"], out["basic_pass"] = u, p
		out["basic_pass_sha256"] = hexSHA([]byte(p))
	}
	// What it received, as hashes: a test can check a value arrived
	// although msbtap scrubs it from the answer.
	hs := map[string][]string{}
	for k, vs := range r.Header {
		for _, v := range vs {
			hs[k] = append(hs[k], hexSHA([]byte(v)))
		}
	}
	out["headers_sha256"], out["query_sha256"] = hs, hexSHA([]byte(r.URL.RawQuery))
	w.Header().Set("Content-Type", "application/json")
	// Echo a header back, for tests of what msbtap does to responses.
	if v := r.Header.Get("X-Echo-Back"); v != "" {
		w.Header().Set("X-Echoed", v)
	}
	json.NewEncoder(w).Encode(out)
}

// setupTLS starts the HTTPS servers: trusted ones (by a CA whose
// certificate goes to caOut) and untrusted ones (by a CA nobody is told
// of).
func setupTLS(trusted, untrusted []string, names, caOut string) {
	if len(trusted) == 0 && len(untrusted) == 0 {
		return
	}
	ns := strings.Split(names, ",")
	ca := newTestCA("testhost CA")
	if caOut != "" {
		if err := os.WriteFile(caOut, ca.pem(), 0o644); err != nil {
			log.Fatal(err)
		}
	}
	for _, a := range trusted {
		serveHTTPS(a, ca.leaf(ns))
	}
	other := newTestCA("untrusted CA")
	for _, a := range untrusted {
		serveHTTPS(a, other.leaf(ns))
	}
}

// bannerServer speaks first, as SSH does: a banner, then it echoes the
// client's line.
func bannerServer(c net.Conn) {
	io.WriteString(c, "SSH-2.0-testhost\r\n")
	buf := make([]byte, 256)
	n, _ := c.Read(buf)
	c.Write(buf[:n])
}

// bannerClient ADDR: read the banner, send a line, print what came back.
func bannerClient(args []string) {
	c, err := net.DialTimeout("tcp", args[0], 5*time.Second)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 256)
	n, err := c.Read(buf)
	if err != nil {
		log.Fatal(err)
	}
	banner := strings.TrimSpace(string(buf[:n]))
	io.WriteString(c, "SSH-2.0-client\r\n")
	n, err = c.Read(buf)
	if err != nil {
		log.Fatal(err)
	}
	os.Stdout.WriteString(banner + " / " + strings.TrimSpace(string(buf[:n])) + "\n")
}

// tlsDial ADDR SNI [ALPN]: a TLS handshake that trusts anything, with the
// server name SNI ("" for none); prints the certificate's issuer and
// subject, or the error.
func tlsDial(args []string) {
	if len(args) < 2 {
		log.Fatal("usage: testhost tlsdial ADDR SNI [ALPN]")
	}
	cfg := &tls.Config{ServerName: args[1], InsecureSkipVerify: true}
	if len(args) > 2 {
		cfg.NextProtos = strings.Split(args[2], ",")
	}
	d := &net.Dialer{Timeout: 5 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", args[0], cfg)
	if err != nil {
		os.Stdout.WriteString("error: " + err.Error() + "\n")
		os.Exit(1)
	}
	defer c.Close()
	st := c.ConnectionState()
	leaf := st.PeerCertificates[0]
	os.Stdout.WriteString("issuer=" + leaf.Issuer.CommonName + " subject=" + leaf.Subject.CommonName + " alpn=" + st.NegotiatedProtocol + "\n")
}

// send ADDR [halfclose]: send standard input to ADDR and print what comes
// back until the server closes (for hand-made requests); with halfclose,
// shut the write side once standard input ends, as `nc -N` does.
func sendClient(args []string) {
	c, err := net.DialTimeout("tcp", args[0], 5*time.Second)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.Copy(c, os.Stdin)
	if len(args) > 1 && args[1] == "halfclose" {
		c.(*net.TCPConn).CloseWrite()
	}
	_, err = io.Copy(os.Stdout, c)
	if err != nil {
		os.Stdout.WriteString("\nerror: " + err.Error() + "\n")
	}
}
