package portspec

import (
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string
	}{
		{"8080:80", []string{"127.0.0.1:8080→80/tcp"}},
		{"8080:80/udp", []string{"127.0.0.1:8080→80/udp"}},
		{"8080:80/tcp6", []string{"127.0.0.1:8080→80/tcp6"}},
		{"[::1]:5353:53/udp6", []string{"[::1]:5353→53/udp6"}},
		{"0.0.0.0:8080:80/tcp", []string{"0.0.0.0:8080→80/tcp"}},
		{"[::1]:8080:80", []string{"[::1]:8080→80/tcp"}},
		{"8000-8002:9000-9002", []string{"127.0.0.1:8000→9000/tcp", "127.0.0.1:8001→9001/tcp", "127.0.0.1:8002→9002/tcp"}},
	} {
		got, err := Parse(tc.in)
		if err != nil {
			t.Errorf("%s: %v", tc.in, err)
			continue
		}
		var s []string
		for _, p := range got {
			s = append(s, p.String())
		}
		if strings.Join(s, " ") != strings.Join(tc.want, " ") {
			t.Errorf("%s: got %v, want %v", tc.in, s, tc.want)
		}
	}
	for _, bad := range []string{"", "80", "a:b", "8080:80/sctp", "8080:80/tcp4", "8080:80/", "0:80", "8080:0", "65536:1", "8000-8001:80", "9-8:9-8", "::1:80:80", "[::1:80:80", "1.2.3:80:80", "[10.0.0.1]:80:80"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

// FuzzParse: no spec makes the parser panic, and every spec it
// accepts names ports 1..65535 and a known protocol.
func FuzzParse(f *testing.F) {
	for _, s := range []string{"8080:80", "127.0.0.1:8000-8002:9000-9002/udp", "[::1]:8080:80/tcp6", "1:1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ps, err := Parse(s)
		if err != nil {
			return
		}
		for _, p := range ps {
			if p.Host.Port() == 0 || p.GuestPort == 0 || (p.Proto != "tcp" && p.Proto != "udp") {
				t.Fatalf("%q gave %+v", s, p)
			}
		}
	})
}
