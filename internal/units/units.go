// Package units parses the sizes and rates msbtap's settings take.
package units

import (
	"fmt"
	"strconv"
	"strings"
)

// ParseSize parses a byte count with an optional unit: 4096, 64KiB, 64MiB,
// 1GiB (powers of 1024), or 64KB, 64MB, 1GB (powers of 1000); K, M and G
// alone are powers of 1024.
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9},
		{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"B", 1}} {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSuffix(t, u.suffix), u.mult
			break
		}
	}
	n, err := strconv.ParseFloat(strings.TrimSpace(t), 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("%q is not a size", s)
	}
	return int64(n * float64(mult)), nil
}

// FormatSize writes a byte count as ParseSize reads it back: in the
// largest power of 1024 that divides it (64MiB), else in bytes.
func FormatSize(n int64) string {
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if n != 0 && n%u.mult == 0 {
			return strconv.FormatInt(n/u.mult, 10) + u.suffix
		}
	}
	return strconv.FormatInt(n, 10)
}

// ParseRate parses a rate: bits a second with a unit (500kbit, 100mbit,
// 1gbit; powers of 1000), or bytes a second with one (20MB, 1.5MiB, or a
// bare number of bytes). It returns bytes a second.
func ParseRate(s string) (float64, error) {
	t := strings.ToLower(strings.TrimSpace(s))
	for _, u := range []struct {
		suffix string
		bits   float64
	}{{"kbit", 1e3}, {"mbit", 1e6}, {"gbit", 1e9}, {"bit", 1}} {
		if strings.HasSuffix(t, u.suffix) {
			n, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(t, u.suffix)), 64)
			if err != nil || n <= 0 {
				return 0, fmt.Errorf("%q is not a rate", s)
			}
			return n * u.bits / 8, nil
		}
	}
	n, err := ParseSize(strings.TrimSuffix(strings.TrimSpace(s), "/s"))
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("%q is not a rate (like 100mbit or 20MB)", s)
	}
	return float64(n), nil
}
