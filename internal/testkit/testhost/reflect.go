package main

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"strconv"

	"github.com/msbtap/msbtap/internal/testkit/pattern"
)

// responseRoutes are the handlers for tests of what msbtap does to
// responses.
func responseRoutes(mux *http.ServeMux) {
	// /reflect/KIND sends the request's X-Key header back in one place
	// of the response (the way a host echoes a credential it got): body,
	// gzip (a gzip body, sent as Content-Encoding: gzip whatever was
	// asked), 103 (an Early Hints Link), trailer, redirect (Location and
	// body). X-Key-Sha256 says what it got, without the value.
	mux.HandleFunc("/reflect/{kind}", func(w http.ResponseWriter, r *http.Request) {
		v := r.Header.Get("X-Key")
		w.Header().Set("X-Key-Sha256", hexSHA([]byte(v)))
		switch r.PathValue("kind") {
		case "body":
			fmt.Fprintf(w, "you sent %s\n", v)
		case "gzip":
			w.Header().Set("Content-Encoding", "gzip")
			w.Write(gzipBytes([]byte("gzip: you sent " + v + "\n")))
		case "103":
			// Link stays in the final header too: Go's HTTP/2 server
			// encodes a 1xx's header map while the handler goes on.
			w.Header().Set("Link", "</style.css?key="+v+">; rel=preload")
			w.WriteHeader(http.StatusEarlyHints)
			io.WriteString(w, "hints sent\n")
		case "trailer":
			w.Header().Set("Trailer", "X-Echo-Trailer")
			io.WriteString(w, "see the trailer\n")
			w.Header().Set("X-Echo-Trailer", v)
		case "redirect":
			w.Header().Set("Location", "/next?key="+v)
			w.WriteHeader(http.StatusFound)
			fmt.Fprintf(w, "<a href=\"/next?key=%s\">moved</a>\n", v)
		default:
			http.NotFound(w, r)
		}
	})
	// /bigheader?n=N answers with a header of N bytes.
	mux.HandleFunc("/bigheader", func(w http.ResponseWriter, r *http.Request) {
		n, err := strconv.Atoi(r.URL.Query().Get("n"))
		if err != nil || n < 0 || n > 64<<20 {
			http.Error(w, "bad n", http.StatusBadRequest)
			return
		}
		w.Header().Set("X-Big", string(bytes.Repeat([]byte("b"), n)))
		io.WriteString(w, "big header sent\n")
	})
	// /gz?n=N sends N pattern bytes gzip-compressed, as a .gz file
	// served with Content-Encoding: gzip whatever was asked; X-Body-Sha256
	// is the hash of the bytes sent.
	mux.HandleFunc("/gz", func(w http.ResponseWriter, r *http.Request) {
		n, err := strconv.ParseInt(r.URL.Query().Get("n"), 10, 64)
		if err != nil || n < 0 {
			http.Error(w, "bad n", http.StatusBadRequest)
			return
		}
		b, _ := io.ReadAll(pattern.Reader(n))
		z := gzipBytes(b)
		w.Header().Set("Content-Type", "application/gzip")
		w.Header().Set("Content-Encoding", "gzip")
		w.Header().Set("Content-Length", strconv.Itoa(len(z)))
		w.Header().Set("X-Body-Sha256", hexSHA(z))
		w.Write(z)
	})
}

func gzipBytes(b []byte) []byte {
	var z bytes.Buffer
	zw := gzip.NewWriter(&z)
	zw.Write(b)
	zw.Close()
	return z.Bytes()
}

func hexSHA(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}
