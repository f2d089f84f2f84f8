package integration

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/internal/testkit/testenv"
)

// TestCommandGetsNoInheritedDescriptors: descriptors msbtap inherited
// from whoever started it (here a pipe's write end as fd 4 and a directory
// of the host's /tmp as fd 5; fd 3 is taken over by the init's spec) do not reach the command: through the
// directory it would list and open the host's /tmp around its private one,
// through the pipe write to its starter.
func TestCommandGetsNoInheritedDescriptors(t *testing.T) {
	w := testenv.NewWorld(t)
	dir := tempDirIn(t, "/tmp", 0o755)
	marker := "marker-" + randomHex(8)
	if err := os.WriteFile(filepath.Join(dir, marker), []byte("host\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	df, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer df.Close()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	script := `ls -A /proc/self/fd/5/ 2>/dev/null; cat /proc/self/fd/5/` + marker + ` 2>/dev/null
{ echo LEAKED-THROUGH-4 >&4; } 2>/dev/null
readlink /proc/$$/fd/4 /proc/$$/fd/5
echo END`
	cmd := w.Host.Command(w.Msbtap, "run", "--dns-upstream", testenv.DNSHost4, "--log-level", "warn", "--tls-intercept", "off",
		"--", "sh", "-c", script)
	cmd.Env = rootEnv()
	cmd.ExtraFiles = []*os.File{pw, pw, df}
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		pw.Close()
		t.Fatal(err)
	}
	pw.Close()
	got := make(chan string, 1)
	go func() {
		b, _ := io.ReadAll(pr) // EOF once every holder of the write end is gone
		got <- string(b)
	}()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("msbtap run: %v\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "END") {
		t.Fatalf("the command did not run to its end:\n%s", out.String())
	}
	for _, bad := range []string{marker, dir, "pipe:"} {
		if strings.Contains(out.String(), bad) {
			t.Errorf("the command reached an inherited descriptor (%q):\n%s", bad, out.String())
		}
	}
	select {
	case s := <-got:
		if s != "" {
			t.Errorf("the command wrote %q into msbtap's inherited fd 4", s)
		}
	case <-time.After(10 * time.Second):
		t.Error("fd 4's write end is still held after msbtap exited")
	}
}

// stiProbe types a line into its terminal's input with TIOCSTI, as if the
// user had: on the terminal of the shell that started msbtap, that line
// would run there after msbtap exits, outside the sandbox.
const stiProbe = `
import fcntl, sys, termios
try:
    for c in sys.argv[1].encode() + b"\n":
        fcntl.ioctl(0, termios.TIOCSTI, bytes([c]))
    print("TIOCSTI-ACCEPTED", flush=True)
except OSError as e:
    print("TIOCSTI-REFUSED", e.errno, flush=True)
`

// openPty returns a new pseudo-terminal's master and its slave.
func openPty(t *testing.T) (master, slave *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals here: %v", err)
	}
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		m.Close()
		t.Fatal(err)
	}
	n, err := unix.IoctlGetUint32(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		m.Close()
		t.Fatal(err)
	}
	s, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		m.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close(); s.Close() })
	return m, s
}

// TestCommandCannotTypeIntoTerminal: msbtap run on a terminal that is
// its session's controlling one (a shell's, as the user runs it): the
// command cannot push input into it with TIOCSTI, which the shell would
// read and run, as root, outside the sandbox, once msbtap exits.
func TestCommandCannotTypeIntoTerminal(t *testing.T) {
	testenv.RequireTools(t, python3)
	w := testenv.NewWorld(t)
	master, slave := openPty(t)
	marker := "typed-by-the-sandbox-" + randomHex(6)
	cmd := w.Host.Command(w.Msbtap, "run", "--dns-upstream", testenv.DNSHost4, "--log-level", "warn", "--tls-intercept", "off",
		"--", python3, "-c", stiProbe, "echo "+marker)
	cmd.Env = rootEnv()
	cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	read := make(chan struct{})
	go func() {
		defer close(read)
		b := make([]byte, 4096)
		for {
			n, err := master.Read(b)
			out.Write(b[:n])
			if err != nil {
				return
			}
		}
	}()
	werr := cmd.Wait()
	// What the terminal holds as typed input: read it from the slave side
	// (nothing waits there once msbtap is gone).
	fd := int(slave.Fd()) // once: Fd makes the file blocking
	unix.SetNonblock(fd, true)
	typed := make([]byte, 4096)
	n, _ := unix.Read(fd, typed)
	slave.Close() // the master's reader gets EIO now
	select {
	case <-read:
	case <-time.After(5 * time.Second):
		t.Fatal("the terminal's output never ended")
	}
	if werr != nil {
		t.Fatalf("msbtap run: %v\n%s", werr, out.String())
	}
	if !strings.Contains(out.String(), "TIOCSTI-REFUSED") {
		t.Errorf("the command typed into msbtap's terminal:\n%s", out.String())
	}
	if n > 0 && strings.Contains(string(typed[:n]), marker) {
		t.Errorf("the terminal holds the command's input %q", typed[:n])
	}
}
