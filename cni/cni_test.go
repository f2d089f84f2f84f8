package cni

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestParseConf(t *testing.T) {
	c, err := ParseConf([]byte(`{"cniVersion": "1.1.0", "name": "n", "type": "msbtap-cni"}`), "")
	if err != nil || c.StateDir != DefaultStateDir || c.SlotRange[0] != 1024 {
		t.Fatalf("minimal: %+v %v", c, err)
	}
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "strict.json"), []byte(`{"default_action": "deny"}`), 0o644)
	c, err = ParseConf([]byte(`{"type": "msbtap-cni", "policyDir": "`+dir+`"}`), "IgnoreUnknown=1;MSBTAP_POLICY=strict")
	if err != nil || string(c.Policy) != `"`+dir+`/strict.json"` {
		t.Fatalf("pod policy: %v %v", c, err)
	}
	for _, tc := range []struct{ conf, args, want string }{
		{`{"mtu": 100}`, "", "mtu 100"},
		{`{"slotRange": [9, 2]}`, "", "slotRange"},
		{`{"denyMode": "silent"}`, "", "denyMode"},
		{`{"policy": "nope"}`, "", "nope"},
		{`{"policy": {"default_action": "x"}}`, "", "default_action"},
		{`{"policyDir": "/p"}`, "MSBTAP_POLICY=../../etc/passwd", "not a path"},
		{`{}`, "MSBTAP_POLICY=x", "no policyDir"},
		{`{"metricsHost": "127.0.0.1"}`, "", "metricsPortBase"},
		{`{"runtimeConfig": {"portMappings": [{"hostPort": 0, "containerPort": 80}]}}`, "", "portMappings"},
		{`{"runtimeConfig": {"portMappings": [{"hostPort": 80, "containerPort": 80, "protocol": "sctp"}]}}`, "", "sctp"},
	} {
		if _, err := ParseConf([]byte(tc.conf), tc.args); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s %s: %v, want an error naming %q", tc.conf, tc.args, err, tc.want)
		}
	}
}

func TestPortMappingSpecs(t *testing.T) {
	for pm, want := range map[PortMapping]string{
		{HostPort: 8080, ContainerPort: 80}:                                       "0.0.0.0:8080:80/tcp",
		{HostPort: 5353, ContainerPort: 53, Protocol: "UDP", HostIP: "127.0.0.1"}: "127.0.0.1:5353:53/udp",
		{HostPort: 8443, ContainerPort: 443, HostIP: "::1"}:                       "[::1]:8443:443/tcp",
	} {
		if got, err := pm.spec(); err != nil || got != want {
			t.Errorf("%+v: %q %v, want %q", pm, got, err, want)
		}
	}
}

func TestSlotsAreExclusive(t *testing.T) {
	c := &NetConf{StateDir: t.TempDir(), SlotRange: []int{10, 29}}
	var mu sync.Mutex
	got := map[int]string{}
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := "c" + string(rune('a'+i))
			s, err := allocSlot(c, id)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if prev, dup := got[s]; dup {
				t.Errorf("slot %d given to %s and %s", s, prev, id)
			}
			got[s] = id
		}()
	}
	wg.Wait()
	if _, err := allocSlot(c, "one-too-many"); err == nil {
		t.Error("a slot past the range")
	}
	releaseSlot(c, 10, "someone-else") // not the holder: kept
	if _, err := filepath.Glob(filepath.Join(c.StateDir, "slots", "10")); err != nil {
		t.Fatal(err)
	}
	releaseSlotsOf(c, got[10])
	if s, err := allocSlot(c, "again"); err != nil || s != 10 {
		t.Errorf("a released slot: %d %v", s, err)
	}
	if err := checkID("../../etc"); err == nil {
		t.Error("a container id with a path")
	}
}
