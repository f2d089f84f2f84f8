package inspect

import (
	"strings"
	"testing"
)

func TestParseAuthority(t *testing.T) {
	for _, tc := range []struct{ in, name, out string }{
		{"Example.COM", "example.com", "example.com"},
		{"example.com.:8080", "example.com", "example.com:8080"},
		{"example.com:080", "example.com", "example.com:80"},
		{"198.51.100.7:80", "198.51.100.7", "198.51.100.7:80"},
		{"[2001:DB8::1]:443", "2001:db8::1", "[2001:db8::1]:443"},
		{"[2001:db8::1]", "2001:db8::1", "[2001:db8::1]"},
		{"Bücher.Test", "xn--bcher-kva.test", "xn--bcher-kva.test"},
	} {
		a, err := ParseAuthority(tc.in)
		if err != nil || a.Name != tc.name || a.String() != tc.out {
			t.Errorf("%q: %q %q %v, want %q %q", tc.in, a.Name, a.String(), err, tc.name, tc.out)
		}
	}
	for _, bad := range []string{"allowed.test.:80.evil", "allowed.test:80:81", "a.test:", "a.test:0", "a.test:65536",
		"a.test:+80", "a.test:8a", "a.test: 80", "a.test:123456", "::1", "[::1", "[::1]x", "[fe80::1%eth0]:80",
		"[198.51.100.7]", "a b.test", "evil\x00.test", "a..test", ":80", "allowed.test evil.test", "a_b.test"} {
		if a, err := ParseAuthority(bad); err == nil {
			t.Errorf("%q: accepted as %q", bad, a.String())
		}
	}
}

// TestHTTPHostChecked: a Host that does not parse the one strict way is
// an error, not a host read leniently.
func TestHTTPHostChecked(t *testing.T) {
	for _, host := range []string{"allowed.test.:80.evil", "allowed.test:0", "allowed.test:http", "a..test", "evil\x01.test"} {
		req := "GET / HTTP/1.1\r\nHost: " + host + "\r\n\r\n"
		if h, _, err := Classify([]byte(req)); err == nil {
			t.Errorf("Host %q: %+v, want an error", host, h)
		}
	}
	h, _, err := Classify([]byte("GET http://Other.Test.:8080/ HTTP/1.1\r\nHost: WEB.test\r\n\r\n"))
	if err != nil || strings.Join(h.Names, ",") != "web.test,other.test" {
		t.Errorf("%+v %v", h, err)
	}
}

// TestSNIChecked: a server name no host has is an error.
func TestSNIChecked(t *testing.T) {
	for _, name := range []string{"a_b.test", "a..test", "-a.test"} {
		if h, _, err := Classify(clientHello(t, name)); err == nil {
			t.Errorf("SNI %q: %+v, want an error", name, h)
		}
	}
}
