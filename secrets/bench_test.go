package secrets

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"math/rand/v2"
	"testing"
)

// The cost of a body secret: an 8 MiB body (one placeholder in it) copied
// as it is, and through the streaming replacer.
var benchBody = func() []byte {
	b := bytes.Repeat([]byte("0123456789abcdef"), 8<<20/16)
	copy(b[4<<20:], "PLACEHOLDERxxxxxxxxxxxxxxx")
	return b
}()

func BenchmarkBodyPlain(b *testing.B) {
	b.SetBytes(int64(len(benchBody)))
	for i := 0; i < b.N; i++ {
		io.Copy(io.Discard, struct{ io.Reader }{bytes.NewReader(benchBody)}) // no WriteTo: read as a body is
	}
}

func BenchmarkBodyWithSecret(b *testing.B) {
	b.SetBytes(int64(len(benchBody)))
	for i := 0; i < b.N; i++ {
		r := newReplacer(io.NopCloser(bytes.NewReader(benchBody)), []byte("PLACEHOLDERxxxxxxxxxxxxxxx"), []byte("the-real-value-of-26-bytes"), func() error { return nil })
		io.Copy(io.Discard, r)
	}
}

// The cost of the response side on a secret's host: an 8 MiB body
// scrubbed as it comes (identity, what msbtap asks for), and the same
// body sent gzip-encoded anyway, decoded and scrubbed.
func benchScrubber(b *testing.B) *scrubber {
	s, err := New([]Spec{{Name: "K", FromEnv: "K", Hosts: []string{"api.test"}}}, func(string) string { return "sk-the-real-value-0123456789" })
	if err != nil {
		b.Fatal(err)
	}
	return s.Scrubber("api.test").(*scrubber)
}

func BenchmarkResponseScrub(b *testing.B) {
	sc := benchScrubber(b)
	b.SetBytes(int64(len(benchBody)))
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		io.Copy(io.Discard, sc.Body(bytes.NewReader(benchBody)))
	}
}

// benchJSON is 8 MiB of an API's JSON: records with random ids and
// hashes, which gzip compresses about as real answers do.
var benchJSON = func() []byte {
	var b bytes.Buffer
	r := rand.New(rand.NewPCG(1, 2))
	for b.Len() < 8<<20 {
		fmt.Fprintf(&b, `{"id": "%016x", "object": "chat.completion.chunk", "created": %d, "sha": "%032x%032x", "text": "the quick brown fox %d"},`+"\n",
			r.Uint64(), 1700000000+r.IntN(1e6), r.Uint64(), r.Uint64(), r.IntN(1000))
	}
	return b.Bytes()
}()

func BenchmarkResponseScrubJSON(b *testing.B) {
	sc := benchScrubber(b)
	b.SetBytes(int64(len(benchJSON)))
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		io.Copy(io.Discard, sc.Body(bytes.NewReader(benchJSON)))
	}
}

func BenchmarkResponseScrubGzipJSON(b *testing.B) {
	sc := benchScrubber(b)
	var z bytes.Buffer
	zw := gzip.NewWriter(&z)
	zw.Write(benchJSON)
	zw.Close()
	b.ReportMetric(float64(len(benchJSON))/float64(z.Len()), "ratio")
	b.SetBytes(int64(len(benchJSON)))
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		zr, _ := gzip.NewReader(bytes.NewReader(z.Bytes()))
		io.Copy(io.Discard, sc.Body(zr))
	}
}
