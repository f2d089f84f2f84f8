package main

import "testing"

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"4096": 4096, "64KiB": 64 << 10, "64MiB": 64 << 20, "1GiB": 1 << 30,
		"20MB": 20e6, "1.5K": 1536, "512B": 512, "2G": 2 << 30} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("%s: got %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "MiB", "-1M", "lots", "1TB"} {
		if _, err := parseSize(bad); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}
