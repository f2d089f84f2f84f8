package integration

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/msbtap/msbtap/internal/testkit/testenv"
)

var (
	vmImageOnce sync.Once
	vmImageDir  string
	vmImageErr  error
)

// vmImage builds (once, cached under build/vm) the test guest: Debian's
// kernel and a busybox initramfs. It skips the test, saying why, where QEMU
// or the packages cannot be had.
func vmImage(t *testing.T) (kernel, initrd string) {
	t.Helper()
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("skipping: qemu-system-x86_64 not installed (`make deps` as root installs qemu-system-x86)")
	}
	vmImageOnce.Do(func() {
		root := repoRoot()
		vmImageDir = filepath.Join(root, "build", "vm")
		out, err := exec.Command(filepath.Join(root, "scripts", "build-vm-image.sh"), vmImageDir).CombinedOutput()
		if err != nil {
			vmImageErr = err
			t.Logf("build-vm-image.sh: %v\n%s", err, out)
		}
	})
	if vmImageErr != nil {
		t.Skipf("skipping: cannot assemble the guest image from Debian packages: %v", vmImageErr)
	}
	return filepath.Join(vmImageDir, "vmlinuz"), filepath.Join(vmImageDir, "initramfs.gz")
}

func repoRoot() string {
	wd, _ := os.Getwd()
	return filepath.Join(wd, "..", "..")
}

// TestVMEndToEnd boots a real Linux guest under QEMU (TCG) on msbtap's VM
// TAP. Inside, the guest gets its address by DHCP, resolves a name through
// the agent, fetches a file from a test host and fails to reach a denied
// address; it reports on the serial console. Meanwhile the host's IP stack
// must never see a guest frame: every frame the VM TAP receives is stolen
// by the tc redirect.
func TestVMEndToEnd(t *testing.T) {
	w := testenv.NewWorld(t)
	kernel, initrd := vmImage(t)
	root := repoRoot()
	flags := []string{filepath.Join(root, "scripts", "launch-qemu.sh"), "3", "--", "--dns-upstream", testenv.DNSHost4, "--log-level", "debug"}
	if fp := os.Getenv("MSBTAP_TEST_FAST_PATH"); fp != "" {
		flags = append(flags, "--fast-path", fp) // as testenv's StartAgent
	}
	cmd := w.Host.Command(flags...)
	cmd.Env = append(os.Environ(),
		"MSBTAP="+w.Msbtap, "KERNEL="+kernel, "INITRD="+initrd, "QEMU_ACCEL=tcg",
		"APPEND=msbtap.resolve="+testenv.TestDomain+
			" msbtap.fetch=http://"+testenv.TestDomain+"/"+
			" msbtap.deny="+testenv.PrivHost4+":80"+
			" msbtap.deny=169.254.169.254:80"+
			" msbtap.hold=3")
	out, done := startCmd(t, cmd)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("launcher and serial console:\n%s", out.String())
		}
	})

	// While the VM runs, sample the VM TAP: link RX packets against the
	// packets the tc filter redirected, and the host's neighbours on it.
	// Only a sample whose three reads all succeeded counts: once the VM is
	// gone msbtap removes the TAP, and a read then fails.
	var linkRX, redirected, samples int
	var neigh string
	sample := func() {
		l, err1 := w.Host.Run("ip", "-s", "link", "show", "msbtap3")
		f, err2 := w.Host.Run("tc", "-s", "filter", "show", "dev", "msbtap3", "ingress")
		n, err3 := w.Host.Run("ip", "neigh", "show", "dev", "msbtap3")
		if err1 != nil || err2 != nil || err3 != nil {
			return
		}
		lm := regexp.MustCompile(`RX:[^\n]*\n\s*(\d+)\s+(\d+)`).FindStringSubmatch(l)
		fm := regexp.MustCompile(`Sent \d+ bytes (\d+) pkt`).FindStringSubmatch(f)
		if lm == nil || fm == nil {
			return
		}
		linkRX, _ = strconv.Atoi(lm[2])
		redirected, _ = strconv.Atoi(fm[1])
		neigh = n
		samples++
	}
	timeout := time.After(4 * time.Minute)
wait:
	for {
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("launcher: %v", err)
			}
			break wait
		case <-timeout:
			t.Fatal("the VM did not finish within 4 minutes")
		case <-time.After(200 * time.Millisecond):
			if strings.Contains(out.String(), "MSBTAP-VM: dhcp") {
				sample()
			}
		}
	}
	serial := out.String()
	for _, want := range []string{
		"MSBTAP-VM: dhcp ok 100.96.0.14/30 mtu 1500",
		"MSBTAP-VM: resolve ok " + testenv.TestDomain + " " + testenv.WebHost4,
		"MSBTAP-VM: fetch ok hello from testhost",
		"MSBTAP-VM: deny ok " + testenv.PrivHost4 + ":80",
		"MSBTAP-VM: deny ok 169.254.169.254:80",
		"MSBTAP-VM: done",
	} {
		if !strings.Contains(serial, want) {
			t.Errorf("serial console lacks %q", want)
		}
	}
	t.Logf("VM TAP while the guest ran (%d samples): %d frames received, %d redirected by tc", samples, linkRX, redirected)
	if samples == 0 || linkRX == 0 {
		t.Error("could not sample the VM TAP while the guest ran")
	} else if redirected < linkRX {
		t.Errorf("the VM TAP received %d frames but tc redirected only %d: the host stack saw some", linkRX, redirected)
	}
	if strings.TrimSpace(neigh) != "" {
		t.Errorf("the host learned neighbours on the VM TAP: %s", neigh)
	}
	// Everything msbtap made is gone.
	if out, err := w.Host.Run("ip", "-o", "link"); err == nil && strings.Contains(out, "msbtap3") {
		t.Errorf("TAPs left behind:\n%s", out)
	}
}
