package units

import "testing"

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"4096": 4096, "64KiB": 64 << 10, "64MiB": 64 << 20, "1GiB": 1 << 30,
		"20MB": 20e6, "1.5K": 1536, "512B": 512, "2G": 2 << 30} {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("%s: got %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "MiB", "-1M", "lots", "1TB"} {
		if _, err := ParseSize(bad); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

// TestFormatSize: a size is written in its largest exact binary unit, and
// reads back as the same number.
func TestFormatSize(t *testing.T) {
	for n, want := range map[int64]string{64 << 20: "64MiB", 100 << 20: "100MiB", 1536: "1536", 64 << 10: "64KiB", 2 << 30: "2GiB", 0: "0", 4096: "4KiB"} {
		got := FormatSize(n)
		if back, err := ParseSize(got); got != want || err != nil || back != n {
			t.Errorf("FormatSize(%d) = %q (reads back as %d, %v), want %q", n, got, back, err, want)
		}
	}
}

func TestParseRate(t *testing.T) {
	for in, want := range map[string]float64{"100mbit": 12.5e6, "50mbit": 6.25e6, "1gbit": 125e6, "500kbit": 62500, "20MB": 20e6, "1MiB": 1 << 20, "4096": 4096} {
		if got, err := ParseRate(in); err != nil || got != want {
			t.Errorf("%s: got %v, %v; want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "fast", "-1mbit", "0", "mbit"} {
		if _, err := ParseRate(bad); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}
