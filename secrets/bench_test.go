package secrets

import (
	"bytes"
	"io"
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
