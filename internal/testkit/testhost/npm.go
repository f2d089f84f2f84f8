package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha1"
	"crypto/sha512"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"strings"
	"time"
)

// handleNPM makes /npm/ a small npm registry: every package name exists,
// at version 1.0.0, as a package whose index.js exports "NAME ok". A
// client runs `npm install --registry https://HOST/npm/ NAME`: it fetches
// the package document (/npm/NAME), then the tarball it names
// (/npm/NAME/-/NAME-1.0.0.tgz), checked against the document's hashes.
func handleNPM(mux *http.ServeMux) {
	mux.HandleFunc("/npm/", func(w http.ResponseWriter, r *http.Request) {
		rest := strings.TrimPrefix(r.URL.Path, "/npm/")
		name, file, isTarball := strings.Cut(rest, "/-/")
		if name == "" || strings.ContainsAny(name, "/@") {
			http.NotFound(w, r)
			return
		}
		tgz := npmTarball(name)
		if isTarball {
			if file != name+"-1.0.0.tgz" {
				http.NotFound(w, r)
				return
			}
			w.Header().Set("Content-Type", "application/octet-stream")
			w.Write(tgz)
			return
		}
		sha1sum, sha512sum := sha1.Sum(tgz), sha512.Sum512(tgz)
		version := map[string]any{"name": name, "version": "1.0.0", "main": "index.js",
			"dist": map[string]any{
				"tarball":   "https://" + r.Host + "/npm/" + name + "/-/" + name + "-1.0.0.tgz",
				"shasum":    hex.EncodeToString(sha1sum[:]),
				"integrity": "sha512-" + base64.StdEncoding.EncodeToString(sha512sum[:]),
			}}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"name": name, "dist-tags": map[string]string{"latest": "1.0.0"},
			"versions": map[string]any{"1.0.0": version}})
	})
}

// npmTarball is the package, the same bytes on every call.
func npmTarball(name string) []byte {
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	pkg, _ := json.Marshal(map[string]string{"name": name, "version": "1.0.0", "main": "index.js"})
	files := []struct{ name, body string }{
		{"package/package.json", string(pkg) + "\n"},
		{"package/index.js", "module.exports = " + jsString(name+" ok") + ";\n"},
	}
	mtime := time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, f := range files {
		tw.WriteHeader(&tar.Header{Name: f.name, Mode: 0o644, Size: int64(len(f.body)), ModTime: mtime, Typeflag: tar.TypeReg})
		tw.Write([]byte(f.body))
	}
	tw.Close()
	gz.Close()
	return buf.Bytes()
}

func jsString(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}
