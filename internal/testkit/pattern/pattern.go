// Package pattern produces the deterministic byte streams the integration
// tests send through the agent and check at the far end.
package pattern

import (
	"crypto/sha256"
	"encoding/hex"
	"io"
	"math/rand/v2"
)

// Reader returns n deterministic pseudo-random bytes.
func Reader(n int64) io.Reader {
	return io.LimitReader(rand.NewChaCha8([32]byte{'m', 's', 'b', 't', 'a', 'p'}), n)
}

// SHA256 returns the hex SHA-256 of Reader(n).
func SHA256(n int64) string {
	h := sha256.New()
	io.Copy(h, Reader(n))
	return hex.EncodeToString(h.Sum(nil))
}
