package plan

import (
	"strings"
	"testing"
)

func TestForSlot(t *testing.T) {
	for _, tc := range []struct {
		slot                              int
		guestMAC, gwMAC, g4, gw4, g6, gw6 string
	}{
		{0, "02:6d:73:00:00:02", "02:6d:73:00:00:01", "100.96.0.2/30", "100.96.0.1", "fd42:6d73:62::2/64", "fd42:6d73:62::1"},
		{1, "02:6d:73:00:01:02", "02:6d:73:00:01:01", "100.96.0.6/30", "100.96.0.5", "fd42:6d73:62:1::2/64", "fd42:6d73:62:1::1"},
		{65535, "02:6d:73:ff:ff:02", "02:6d:73:ff:ff:01", "100.99.255.254/30", "100.99.255.253", "fd42:6d73:62:ffff::2/64", "fd42:6d73:62:ffff::1"},
	} {
		p, err := ForSlot(tc.slot)
		if err != nil {
			t.Fatalf("slot %d: %v", tc.slot, err)
		}
		for _, c := range []struct{ what, got, want string }{
			{"guest MAC", p.GuestMAC.String(), tc.guestMAC},
			{"gateway MAC", p.GatewayMAC.String(), tc.gwMAC},
			{"guest IPv4", p.GuestIPv4.String(), tc.g4},
			{"gateway IPv4", p.GatewayV4.String(), tc.gw4},
			{"guest IPv6", p.GuestIPv6.String(), tc.g6},
			{"gateway IPv6", p.GatewayV6.String(), tc.gw6},
		} {
			if c.got != c.want {
				t.Errorf("slot %d %s: got %s, want %s", tc.slot, c.what, c.got, c.want)
			}
		}
		if p.MTU != 1500 {
			t.Errorf("slot %d MTU: got %d, want 1500", tc.slot, p.MTU)
		}
	}
}

func TestForSlotOutOfRange(t *testing.T) {
	for _, s := range []int{-1, 65536} {
		if _, err := ForSlot(s); err == nil {
			t.Errorf("slot %d: got no error", s)
		}
	}
}

func TestOverrides(t *testing.T) {
	p, _ := ForSlot(3)
	q, err := p.Apply(Overrides{GuestIPv4: "10.9.8.2/24", GuestIPv6: "fd00:1::10", GuestMAC: "02:00:00:00:00:aa", MTU: 9000})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ what, got, want string }{
		{"guest IPv4", q.GuestIPv4.String(), "10.9.8.2/24"},
		{"gateway IPv4", q.GatewayV4.String(), "10.9.8.1"},
		{"guest IPv6", q.GuestIPv6.String(), "fd00:1::10/64"},
		{"gateway IPv6", q.GatewayV6.String(), "fd00:1::f"},
		{"guest MAC", q.GuestMAC.String(), "02:00:00:00:00:aa"},
		{"gateway MAC", q.GatewayMAC.String(), "02:6d:73:00:03:01"},
	} {
		if c.got != c.want {
			t.Errorf("%s: got %s, want %s", c.what, c.got, c.want)
		}
	}
	if q.MTU != 9000 {
		t.Errorf("MTU: got %d, want 9000", q.MTU)
	}
	if p.MTU != 1500 {
		t.Errorf("Apply changed the receiver")
	}
}

func TestOverrideErrors(t *testing.T) {
	p, _ := ForSlot(0)
	for _, tc := range []struct {
		name string
		o    Overrides
		want string
	}{
		{"v4 garbage", Overrides{GuestIPv4: "1.2.3"}, "guest_ipv4 "},
		{"v4 given v6", Overrides{GuestIPv4: "fd00::2"}, "guest_ipv4 "},
		{"v4 /32", Overrides{GuestIPv4: "10.0.0.2/32"}, "prefix"},
		{"v4 network addr gw", Overrides{GuestIPv4: "10.0.0.1/30"}, "gateway"},
		{"v6 given v4", Overrides{GuestIPv6: "10.0.0.2"}, "guest_ipv6 "},
		{"mac garbage", Overrides{GuestMAC: "zz"}, "guest_mac "},
		{"mac multicast", Overrides{GuestMAC: "01:00:5e:00:00:01"}, "multicast"},
		{"mac equals gateway", Overrides{GuestMAC: "02:6d:73:00:00:01"}, "gateway"},
		{"mtu small", Overrides{MTU: 576}, "mtu "},
		{"mtu big", Overrides{MTU: 70000}, "mtu "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := p.Apply(tc.o)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error mentioning %q", err, tc.want)
			}
		})
	}
}
