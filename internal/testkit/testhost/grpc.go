package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"time"

	"golang.org/x/net/http2"
)

// The gRPC-style service of the HTTP servers: POST /test.Echo/Say with
// content-type application/grpc and one length-prefixed message, answered
// with one message and the grpc-status trailer, over HTTP/2 (h2c with
// prior knowledge on the plain HTTP ports), as a gRPC server does.
const grpcPath = "/test.Echo/Say"

// grpcFrame is one gRPC message: a zero compression flag, the length, the
// bytes.
func grpcFrame(msg []byte) []byte {
	b := make([]byte, 5, 5+len(msg))
	binary.BigEndian.PutUint32(b[1:], uint32(len(msg)))
	return append(b, msg...)
}

// readGRPCFrame reads one message.
func readGRPCFrame(r io.Reader) ([]byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	if hdr[0] != 0 {
		return nil, fmt.Errorf("compressed message")
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if n > 1<<20 {
		return nil, fmt.Errorf("message of %d bytes", n)
	}
	msg := make([]byte, n)
	_, err := io.ReadFull(r, msg)
	return msg, err
}

func grpcSay(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost || r.Header.Get("Content-Type") != "application/grpc" || r.ProtoMajor != 2 {
		http.Error(w, "want a gRPC call over HTTP/2", http.StatusUnsupportedMediaType)
		return
	}
	msg, err := readGRPCFrame(r.Body)
	w.Header().Set("Content-Type", "application/grpc")
	w.Header().Set("Trailer", "Grpc-Status, Grpc-Message")
	if err != nil {
		w.Header().Set("Grpc-Status", "3") // INVALID_ARGUMENT
		w.Header().Set("Grpc-Message", err.Error())
		return
	}
	w.Write(grpcFrame([]byte(fmt.Sprintf("said %q to %s", msg, r.Host))))
	w.Header().Set("Grpc-Status", "0")
	w.Header().Set("Grpc-Message", "")
}

// grpcClient: grpc ADDR AUTHORITY... makes one unary call per authority,
// all on one cleartext HTTP/2 connection (prior knowledge, as gRPC's
// insecure credentials do), and prints a line per call: "AUTHORITY ok
// REPLY" or "AUTHORITY failed: WHY". It exits 1 if any call failed.
func grpcClient(args []string) {
	if len(args) < 2 {
		log.Fatal("usage: testhost grpc ADDR AUTHORITY...")
	}
	conn, err := net.DialTimeout("tcp", args[0], 5*time.Second)
	if err != nil {
		log.Fatal(err)
	}
	tr := &http2.Transport{AllowHTTP: true, DialTLSContext: func(context.Context, string, string, *tls.Config) (net.Conn, error) {
		return nil, fmt.Errorf("one connection only")
	}}
	cc, err := tr.NewClientConn(conn)
	if err != nil {
		log.Fatal(err)
	}
	defer cc.Close()
	failed := false
	for _, authority := range args[1:] {
		reply, err := grpcCall(cc, authority)
		if err != nil {
			failed = true
			fmt.Printf("%s failed: %v\n", authority, err)
			continue
		}
		fmt.Printf("%s ok %s\n", authority, reply)
	}
	if failed {
		os.Exit(1)
	}
}

func grpcCall(cc *http2.ClientConn, authority string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://grpc.invalid"+grpcPath, bytes.NewReader(grpcFrame([]byte("hello"))))
	req.Host = authority
	req.Header.Set("Content-Type", "application/grpc")
	req.Header.Set("Te", "trailers")
	resp, err := cc.RoundTrip(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return "", fmt.Errorf("HTTP %d %q", resp.StatusCode, bytes.TrimSpace(b))
	}
	msg, err := readGRPCFrame(resp.Body)
	if err != nil {
		return "", err
	}
	io.Copy(io.Discard, resp.Body) // the trailers come after the body
	if st := resp.Trailer.Get("Grpc-Status"); st != "0" {
		return "", fmt.Errorf("grpc-status %q (%s)", st, resp.Trailer.Get("Grpc-Message"))
	}
	return string(msg), nil
}
