package doctor

import (
	"bytes"
	"errors"
	"io/fs"
	"strings"
	"testing"
	"time"
)

// fakeInfo is a file of the given mode.
type fakeInfo struct{ mode fs.FileMode }

func (f fakeInfo) Name() string       { return "x" }
func (f fakeInfo) Size() int64        { return 0 }
func (f fakeInfo) Mode() fs.FileMode  { return f.mode }
func (f fakeInfo) ModTime() time.Time { return time.Time{} }
func (f fakeInfo) IsDir() bool        { return f.mode.IsDir() }
func (f fakeInfo) Sys() any           { return nil }

// healthy is a host where every check passes; tests change one thing.
func healthy() (*Env, map[string]string, map[string]fs.FileMode) {
	files := map[string]string{
		"/proc/self/status":                      "Name:\tx\nSeccomp:\t0\nSeccomp_filters:\t0\n",
		"/proc/sys/kernel/seccomp/actions_avail": "kill_process kill_thread trap errno user_notif trace log allow",
		"/proc/sys/user/max_pid_namespaces":      "96369",
		"/proc/sys/user/max_user_namespaces":     "96369",
		"/proc/sys/net/ipv4/ping_group_range":    "0\t2147483647",
		"/proc/sys/net/ipv4/ip_local_port_range": "1024\t65535",
		"/proc/sys/net/ipv4/tcp_tw_reuse":        "1",
		"/proc/sys/net/ipv4/tcp_timestamps":      "1",
		"/proc/sys/fs/file-max":                  "9223372036854775807",
	}
	paths := map[string]fs.FileMode{
		"/dev/net/tun":        fs.ModeDevice | fs.ModeCharDevice | 0o666,
		"/proc/self/ns/pid":   fs.ModeSymlink,
		"/proc/self/ns/mnt":   fs.ModeSymlink,
		"/proc/self/ns/user":  fs.ModeSymlink,
		"/run/systemd/system": fs.ModeDir,
	}
	env := &Env{
		ReadFile: func(p string) ([]byte, error) {
			if s, ok := files[p]; ok {
				return []byte(s + "\n"), nil
			}
			return nil, &fs.PathError{Op: "open", Path: p, Err: fs.ErrNotExist}
		},
		Stat: func(p string) (fs.FileInfo, error) {
			if m, ok := paths[p]; ok {
				return fakeInfo{m}, nil
			}
			return nil, &fs.PathError{Op: "stat", Path: p, Err: fs.ErrNotExist}
		},
		LookPath: func(n string) (string, error) { return "/usr/bin/" + n, nil },
		NoFile:   func() (uint64, uint64, error) { return 1024, 1 << 20, nil },
		Root:     true,
		OpenTUN:  func() error { return nil },
		ProbeTC:  func() error { return nil },
	}
	return env, files, paths
}

func find(t *testing.T, rs []Result, name string) Result {
	t.Helper()
	for _, r := range rs {
		if r.Name == name {
			return r
		}
	}
	t.Fatalf("no check %q in %v", name, rs)
	return Result{}
}

func TestHealthyHost(t *testing.T) {
	env, _, _ := healthy()
	rs := Run(env, Options{VM: true})
	if len(rs) != 10 {
		t.Fatalf("got %d checks, want 10", len(rs))
	}
	var out bytes.Buffer
	if v := Print(&out, rs); v != OK {
		t.Fatalf("worst verdict %v, want ok:\n%s", v, out.String())
	}
	if strings.Contains(out.String(), "fix:") || !strings.HasSuffix(out.String(), "10 ok, 0 warn, 0 fail\n") {
		t.Errorf("output:\n%s", out.String())
	}
}

func TestChecks(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(e *Env, files map[string]string, paths map[string]fs.FileMode)
		opts   Options
		check  string
		want   Verdict
		detail string // in the detail
		fix    string // in the fix
		also   string // another check the change moves, if any
	}{
		{"no tun", func(e *Env, f map[string]string, p map[string]fs.FileMode) { delete(p, "/dev/net/tun") },
			Options{}, "tun", Fail, "does not exist", "mknod /dev/net/tun c 10 200", ""},
		{"tun not a device", func(e *Env, f map[string]string, p map[string]fs.FileMode) { p["/dev/net/tun"] = 0o644 },
			Options{}, "tun", Fail, "not a character device", "mknod", ""},
		{"tun refuses", func(e *Env, f map[string]string, p map[string]fs.FileMode) {
			e.OpenTUN = func() error { return &fs.PathError{Op: "open", Path: "/dev/net/tun", Err: fs.ErrPermission} }
		}, Options{}, "tun", Fail, "permission denied", "--device /dev/net/tun", ""},
		{"tun not root", func(e *Env, f map[string]string, p map[string]fs.FileMode) { e.Root = false },
			Options{}, "tun", Warn, "not root", "as root", "tc u32 (VM mode)"},
		{"tc missing, namespace mode", func(e *Env, f map[string]string, p map[string]fs.FileMode) {
			e.ProbeTC = func() error { return errors.New("add u32 filter: operation not supported") }
		}, Options{}, "tc u32 (VM mode)", Warn, "operation not supported", "CONFIG_NET_CLS_U32", ""},
		{"tc missing, VM mode", func(e *Env, f map[string]string, p map[string]fs.FileMode) {
			e.ProbeTC = func() error { return errors.New("add u32 filter: operation not supported") }
		}, Options{VM: true}, "tc u32 (VM mode)", Fail, "cannot join", "act_mirred", ""},
		{"no seccomp", func(e *Env, f map[string]string, p map[string]fs.FileMode) { f["/proc/self/status"] = "Name:\tx\n" },
			Options{}, "seccomp", Fail, "no seccomp", "--seccomp off", ""},
		{"seccomp without errno", func(e *Env, f map[string]string, p map[string]fs.FileMode) {
			f["/proc/sys/kernel/seccomp/actions_avail"] = "kill_process allow"
		}, Options{}, "seccomp", Fail, "errno", "CONFIG_SECCOMP_FILTER", ""},
		{"no pid namespaces", func(e *Env, f map[string]string, p map[string]fs.FileMode) { delete(p, "/proc/self/ns/pid") },
			Options{}, "pid namespaces", Fail, "-- COMMAND", "CONFIG_PID_NS", ""},
		{"pid namespaces capped at 0", func(e *Env, f map[string]string, p map[string]fs.FileMode) {
			f["/proc/sys/user/max_pid_namespaces"] = "0"
		},
			Options{}, "pid namespaces", Fail, "max_pid_namespaces is 0", "max_pid_namespaces=65536", ""},
		{"user namespaces off", func(e *Env, f map[string]string, p map[string]fs.FileMode) {
			f["/proc/sys/user/max_user_namespaces"] = "0"
		},
			Options{}, "user namespaces", Warn, "does not need them", "max_user_namespaces=65536", ""},
		{"debian unprivileged userns off", func(e *Env, f map[string]string, p map[string]fs.FileMode) {
			f["/proc/sys/kernel/unprivileged_userns_clone"] = "0"
		}, Options{}, "user namespaces", Warn, "unprivileged_userns_clone", "unprivileged_userns_clone=1", ""},
		{"apparmor restricts userns", func(e *Env, f map[string]string, p map[string]fs.FileMode) {
			f["/proc/sys/kernel/apparmor_restrict_unprivileged_userns"] = "1"
		}, Options{}, "user namespaces", Warn, "AppArmor", "apparmor_restrict_unprivileged_userns=0", ""},
		{"ping group excludes root", func(e *Env, f map[string]string, p map[string]fs.FileMode) {
			f["/proc/sys/net/ipv4/ping_group_range"] = "1\t0"
		},
			Options{}, "ping_group_range", Warn, "raw ICMP sockets", "ping_group_range='0 0'", ""},
		{"default port range without reuse", func(e *Env, f map[string]string, p map[string]fs.FileMode) {
			f["/proc/sys/net/ipv4/ip_local_port_range"] = "32768\t60999"
			f["/proc/sys/net/ipv4/tcp_tw_reuse"] = "2"
		}, Options{}, "ephemeral ports", Warn, "about 235 new connections a second", "ip_local_port_range='1024 65535'", "tcp_tw_reuse"},
		{"default port range with reuse", func(e *Env, f map[string]string, p map[string]fs.FileMode) {
			f["/proc/sys/net/ipv4/ip_local_port_range"] = "32768\t60999"
		}, Options{}, "ephemeral ports", OK, "tcp_tw_reuse=1", "", ""},
		{"tw_reuse loopback only", func(e *Env, f map[string]string, p map[string]fs.FileMode) {
			f["/proc/sys/net/ipv4/tcp_tw_reuse"] = "2"
		},
			Options{}, "tcp_tw_reuse", Warn, "loopback only", "tcp_tw_reuse=1", ""},
		{"tw_reuse off", func(e *Env, f map[string]string, p map[string]fs.FileMode) {
			f["/proc/sys/net/ipv4/tcp_tw_reuse"] = "0"
		},
			Options{}, "tcp_tw_reuse", Warn, "0 (off)", "tcp_tw_reuse=1", ""},
		{"timestamps off", func(e *Env, f map[string]string, p map[string]fs.FileMode) {
			f["/proc/sys/net/ipv4/tcp_timestamps"] = "0"
		},
			Options{}, "tcp_tw_reuse", Warn, "tcp_timestamps is 0", "tcp_timestamps=1", ""},
		{"fd limit below the cap", func(e *Env, f map[string]string, p map[string]fs.FileMode) {
			e.NoFile = func() (uint64, uint64, error) { return 1024, 1024, nil }
		}, Options{MaxConnections: 4096}, "open files", Fail, "EMFILE", "ulimit -Hn 5440", ""},
		{"fd limit below the tables", func(e *Env, f map[string]string, p map[string]fs.FileMode) {
			e.NoFile = func() (uint64, uint64, error) { return 1024, 1024, nil }
		}, Options{}, "open files", Warn, "about 1600", "LimitNOFILE=1600", ""},
		{"fd limit fine", func(e *Env, f map[string]string, p map[string]fs.FileMode) {
			e.NoFile = func() (uint64, uint64, error) { return 1024, 524288, nil }
		}, Options{MaxConnections: 1000}, "open files", OK, "--max-connections 1000", "", ""},
		{"file-max small", func(e *Env, f map[string]string, p map[string]fs.FileMode) { f["/proc/sys/fs/file-max"] = "50000" },
			Options{}, "open files", Warn, "fewer than 64", "fs.file-max=", ""},
		{"no systemd", func(e *Env, f map[string]string, p map[string]fs.FileMode) { delete(p, "/run/systemd/system") },
			Options{}, "systemd (CNI)", Warn, "detached", "KillMode=process", ""},
		{"no systemd-run", func(e *Env, f map[string]string, p map[string]fs.FileMode) {
			e.LookPath = func(string) (string, error) { return "", errors.New("not found") }
		}, Options{}, "systemd (CNI)", Warn, "systemd-run", "systemd-run", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env, files, paths := healthy()
			tc.change(env, files, paths)
			rs := Run(env, tc.opts)
			r := find(t, rs, tc.check)
			if r.Verdict != tc.want || !strings.Contains(r.Detail, tc.detail) || !strings.Contains(r.Fix, tc.fix) {
				t.Errorf("got %v %q (fix %q), want %v with %q (fix with %q)", r.Verdict, r.Detail, r.Fix, tc.want, tc.detail, tc.fix)
			}
			for _, o := range rs {
				if o.Name != tc.check && o.Name != tc.also && o.Verdict != OK {
					t.Errorf("check %s changed too: %v %s", o.Name, o.Verdict, o.Detail)
				}
			}
			var out bytes.Buffer
			worst := Print(&out, rs)
			if worst != tc.want {
				t.Errorf("worst verdict %v, want %v", worst, tc.want)
			}
			if tc.want != OK && !strings.Contains(out.String(), "fix: "+r.Fix) {
				t.Errorf("output has no fix line:\n%s", out.String())
			}
		})
	}
}

func TestConnectRate(t *testing.T) {
	// The figure: the default range sustains about 240 a second.
	if got := connectRate(32768, 60999); got != 235 {
		t.Errorf("connectRate(default) = %d, want 235", got)
	}
}
