package integration

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/msbtap/msbtap/internal/testkit/testenv"
)

// python3 is Debian's (make deps): the PATH of a root shell may lead to a
// python3 under /root, which the unprivileged command cannot run.
const python3 = "/usr/bin/python3"

// envProbe, run as the command itself (so that nothing but the sandbox's
// init made its environment), prints what C's getenv returns for each
// name in argv, then its environment as execve gave it.
const envProbe = `
import ctypes, sys
libc = ctypes.CDLL(None)
libc.getenv.restype = ctypes.c_char_p
for n in sys.argv[1:]:
    v = libc.getenv(n.encode())
    print("GETENV", n, "<unset>" if v is None else v.decode(), flush=True)
for kv in open("/proc/self/environ", "rb").read().split(b"\0"):
    if kv:
        print("ENVIRON", kv.decode(errors="replace"), flush=True)
`

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// rootEnv is the test's environment as root's without sudo: no SUDO_*.
func rootEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "SUDO_") {
			env = append(env, kv)
		}
	}
	return append(env, extra...)
}

// TestCommandEnvAllowList: run `sudo -E` style (a large inherited
// environment holding two secrets' values, an ssh-agent socket, a D-Bus
// address and more), the command's environment holds only the allow-list,
// its user's HOME/USER/LOGNAME/SHELL, --env, the CA bundle and the
// placeholders, each name once. Neither C's getenv nor /proc/self/environ
// nor the agent's log shows a secret's value, for --secret (source and name
// alike) and for a secrets file's from_env (another variable); --env
// naming a source variable is refused.
func TestCommandEnvAllowList(t *testing.T) {
	testenv.RequireTools(t, python3)
	w := testenv.NewWorld(t)
	value, ghValue := randomValue(t), randomValue(t)
	secrets := filepath.Join(t.TempDir(), "secrets.json")
	os.WriteFile(secrets, []byte(`{"secrets": [{"name": "GH_TOKEN", "from_env": "REAL_GH", "hosts": ["`+testenv.TestDomain+`"]}]}`), 0o600)
	extraValue := randomHex(8)
	env := rootEnv("TOKEN="+value, "REAL_GH="+ghValue, "COPY_OF_TOKEN="+value, "HOME=/root", "USER=root", "LOGNAME=root",
		"SHELL=/bin/bash", "SSH_AUTH_SOCK=/tmp/ssh-"+randomHex(4)+"/agent.1", "DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/0/bus",
		"XDG_RUNTIME_DIR=/run/user/0", "TERM=xterm-msbtap", "LANG=C.UTF-8", "LC_TIME=C", "TZ=UTC", "EXTRA_OK="+extraValue)
	for i := range 400 {
		env = append(env, fmt.Sprintf("FILLER_%d=%s", i, randomHex(128)))
	}
	names := []string{"TOKEN", "GH_TOKEN", "REAL_GH", "COPY_OF_TOKEN", "SSH_AUTH_SOCK", "XDG_RUNTIME_DIR", "HOME", "USER", "EXTRA_OK", "SET_HERE"}
	cmd := w.Host.Command(append([]string{w.Msbtap, "run", "--dns-upstream", testenv.DNSHost4,
		"--secret", "TOKEN@" + testenv.TestDomain, "--secrets", secrets,
		"--env", "EXTRA_OK", "--env", "SET_HERE=a,b=c", "--env", "NOT_IN_MSBTAPS_ENV",
		"--", python3, "-c", envProbe}, names...)...)
	cmd.Env = env
	b, err := cmd.CombinedOutput()
	out := string(b)
	if err != nil {
		t.Fatalf("msbtap run: %v\n%s", err, out)
	}
	if strings.Contains(out, value) || strings.Contains(out, ghValue) {
		t.Errorf("a secret's value is in the command's environment or the agent's log:\n%s", out)
	}
	environ, getenv := map[string]string{}, map[string]string{}
	for _, l := range strings.Split(out, "\n") {
		if kv, ok := strings.CutPrefix(l, "ENVIRON "); ok {
			k, v, _ := strings.Cut(kv, "=")
			if _, dup := environ[k]; dup {
				t.Errorf("%s twice in the command's environment", k)
			}
			environ[k] = v
		}
		if nv, ok := strings.CutPrefix(l, "GETENV "); ok {
			n, v, _ := strings.Cut(nv, " ")
			getenv[n] = v
		}
	}
	nobody, err := user.LookupId("65534")
	if err != nil {
		t.Fatal(err)
	}
	for k, want := range map[string]string{"HOME": nobody.HomeDir, "USER": nobody.Username, "LOGNAME": nobody.Username,
		"TERM": "xterm-msbtap", "LANG": "C.UTF-8", "LC_TIME": "C", "TZ": "UTC", "EXTRA_OK": extraValue, "SET_HERE": "a,b=c"} {
		if environ[k] != want {
			t.Errorf("%s=%q, want %q", k, environ[k], want)
		}
	}
	for _, k := range []string{"REAL_GH", "COPY_OF_TOKEN", "SSH_AUTH_SOCK", "DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR", "FILLER_0",
		"NOT_IN_MSBTAPS_ENV", "SUDO_USER"} {
		if v, ok := environ[k]; ok {
			t.Errorf("%s=%q reached the command", k, v)
		}
	}
	for k, n := range map[string]int{"TOKEN": len(value), "GH_TOKEN": len(ghValue)} {
		if ph := environ[k]; len(ph) != n || getenv[k] != ph {
			t.Errorf("%s: environ %q, getenv %q: want the placeholder in both", k, ph, getenv[k])
		}
	}
	if getenv["REAL_GH"] != "<unset>" || getenv["SSH_AUTH_SOCK"] != "<unset>" {
		t.Errorf("getenv: %v", getenv)
	}
	if environ["SSL_CERT_FILE"] == "" || len(environ) > 40 {
		t.Errorf("%d variables, SSL_CERT_FILE %q:\n%v", len(environ), environ["SSL_CERT_FILE"], environ)
	}

	// Asking for a source variable by name is refused before anything
	// starts, and the error holds no value.
	for _, e := range []string{"REAL_GH", "TOKEN", "REAL_GH=x"} {
		cmd := w.Host.Command(w.Msbtap, "run", "--dns-upstream", testenv.DNSHost4, "--secret", "TOKEN@"+testenv.TestDomain,
			"--secrets", secrets, "--env", e, "--", "true")
		cmd.Env = env
		b, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(b), "secret") || strings.Contains(string(b), value) || strings.Contains(string(b), ghValue) {
			t.Errorf("--env %s: %v\n%s", e, err, b)
		}
	}
}

// TestCommandRootSeesNoSecretsFile: even as --user root, with the secrets
// file's directory bound in, the command finds the file masked (root
// without capabilities still reads root's 0600 files).
func TestCommandRootSeesNoSecretsFile(t *testing.T) {
	w := testenv.NewWorld(t)
	dir := tempDirIn(t, "/tmp", 0o700)
	value := randomValue(t)
	valueFile, secrets := filepath.Join(dir, "value"), filepath.Join(dir, "secrets.json")
	os.WriteFile(valueFile, []byte(value), 0o600)
	os.WriteFile(secrets, []byte(`{"secrets": [{"name": "TOKEN", "from_file": "`+valueFile+`", "hosts": ["`+testenv.TestDomain+`"]}]}`), 0o600)
	cmd := w.Host.Command(w.Msbtap, "run", "--dns-upstream", testenv.DNSHost4, "--secrets", secrets, "--user", "root", "--bind-ro", dir,
		"--", "sh", "-c", "echo files: $(ls "+dir+"); cat "+secrets+" "+valueFile+"; echo done")
	cmd.Env = rootEnv()
	b, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(b), "files: secrets.json value") || !strings.Contains(string(b), "done") {
		t.Fatalf("msbtap run: %v\n%s", err, b)
	}
	if strings.Contains(string(b), value) || strings.Contains(string(b), "from_file") {
		t.Errorf("the command read the secrets:\n%s", b)
	}
}

// TestCommandNotRootByDefault: run by root without sudo, the command is
// nobody and cannot create a file in /etc; --user root is an explicit
// opt-in.
func TestCommandNotRootByDefault(t *testing.T) {
	w := testenv.NewWorld(t)
	etc := "/etc/msbtap-test-" + randomHex(8)
	t.Cleanup(func() { os.Remove(etc) })
	run := func(env []string, args ...string) string {
		t.Helper()
		cmd := w.Host.Command(append([]string{w.Msbtap, "run", "--dns-upstream", testenv.DNSHost4, "--log-level", "warn"}, args...)...)
		cmd.Env = env
		b, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("msbtap run %v: %v\n%s", args, err, b)
		}
		return string(b)
	}
	script := "echo uid=$(id -u) gid=$(id -g); touch " + etc + " && echo TOUCHED; true"
	for _, env := range [][]string{rootEnv(), rootEnv("SUDO_USER=root", "SUDO_UID=0", "SUDO_GID=0")} {
		out := run(env, "--", "sh", "-c", script)
		if !strings.Contains(out, "uid=65534 gid=65534") || strings.Contains(out, "TOUCHED") {
			t.Errorf("want nobody, and no file in /etc:\n%s", out)
		}
		if _, err := os.Stat(etc); err == nil {
			t.Errorf("the command created %s", etc)
		}
	}
	if out := run(rootEnv(), "--user", "root", "--", "id", "-u"); strings.TrimSpace(out) != "0" {
		t.Errorf("--user root: %q", out)
	}
}

// hostService is a Unix socket on the host anyone could connect to;
// connects counts who did.
type hostService struct {
	path     string
	connects atomic.Int32
}

func listenUnix(t *testing.T, path string) *hostService {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	os.Chmod(path, 0o777)
	s := &hostService{path: path}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s.connects.Add(1)
			c.Write([]byte("HOST-SERVICE\n"))
			c.Close()
		}
	}()
	return s
}

func tempDirIn(t *testing.T, parent string, perm os.FileMode) string {
	t.Helper()
	d, err := os.MkdirTemp(parent, "msbtap-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	os.Chmod(d, perm)
	return d
}

// TestCommandPrivateDirs: the command's /tmp, /run, /var/run and /dev/shm
// are its own and empty: a host Unix socket open to everyone under /tmp
// and under /run cannot be reached, a host file in /dev/shm is not there.
// --bind shares a directory under /tmp read-write, --bind-ro one
// read-only; the CA bundle msbtap writes in its temporary directory is
// still there for the command.
func TestCommandPrivateDirs(t *testing.T) {
	testenv.RequireTools(t, python3)
	w := testenv.NewWorld(t)
	tmpSvc := listenUnix(t, filepath.Join(tempDirIn(t, "/tmp", 0o755), "s.sock"))
	runSvc := listenUnix(t, filepath.Join(tempDirIn(t, "/run", 0o755), "s.sock"))
	shm := "/dev/shm/msbtap-test-" + randomHex(8)
	os.WriteFile(shm, []byte("host shm\n"), 0o644)
	t.Cleanup(func() { os.Remove(shm) })
	rw, ro := tempDirIn(t, "/tmp", 0o777), tempDirIn(t, "/tmp", 0o777)
	roText := randomHex(8)
	os.WriteFile(filepath.Join(ro, "in.txt"), []byte(roText+"\n"), 0o644)

	script := fmt.Sprintf(`for s in %[1]s %[2]s /var%[2]s; do
  %[3]s -c 'import socket, sys
c = socket.socket(socket.AF_UNIX)
c.settimeout(3)
try:
    c.connect(sys.argv[1]); print("CONNECTED", sys.argv[1], c.recv(64))
except OSError as e:
    print("NOT-REACHED", sys.argv[1], e.__class__.__name__)' "$s"
done
cat %[4]s 2>/dev/null && echo SHM-VISIBLE
echo "SHM-ENTRIES $(ls -A /dev/shm | wc -l)"
echo "RUN-ENTRIES $(ls -A /run | tr '\n' ' ')"
echo rw > %[5]s/out && echo RW-OK
echo "RO-READ $(cat %[6]s/in.txt)"
echo x > %[6]s/new || echo RO-REFUSED
echo "CA-CERTS $(grep -c 'BEGIN CERTIFICATE' "$SSL_CERT_FILE")"`,
		tmpSvc.path, runSvc.path, python3, shm, rw, ro)
	cmd := w.Host.Command(w.Msbtap, "run", "--dns-upstream", testenv.DNSHost4, "--bind", rw, "--bind-ro", ro, "--", "sh", "-c", script)
	cmd.Env = rootEnv()
	b, err := cmd.CombinedOutput()
	out := string(b)
	if err != nil {
		t.Fatalf("msbtap run: %v\n%s", err, out)
	}
	for _, want := range []string{"NOT-REACHED " + tmpSvc.path, "NOT-REACHED " + runSvc.path, "NOT-REACHED /var" + runSvc.path,
		"SHM-ENTRIES 0", "RUN-ENTRIES lock \n", "RW-OK", "RO-READ " + roText, "RO-REFUSED"} {
		if !strings.Contains(out, want) {
			t.Errorf("want %q in:\n%s", want, out)
		}
	}
	for _, bad := range []string{"CONNECTED", "SHM-VISIBLE", "CA-CERTS 0", "CA-CERTS \n"} {
		if strings.Contains(out, bad) {
			t.Errorf("%q in:\n%s", bad, out)
		}
	}
	if n := tmpSvc.connects.Load() + runSvc.connects.Load(); n != 0 {
		t.Errorf("the host's services got %d connections", n)
	}
	if got, _ := os.ReadFile(filepath.Join(rw, "out")); string(got) != "rw\n" {
		t.Errorf("--bind: the host sees %q", got)
	}
	if _, err := os.Stat(filepath.Join(ro, "new")); err == nil {
		t.Errorf("--bind-ro: the command wrote into it")
	}
	// The binds are seen at their path only: nothing else of the host's
	// /tmp comes along.
	cmd = w.Host.Command(w.Msbtap, "run", "--dns-upstream", testenv.DNSHost4, "--log-level", "warn", "--tls-intercept", "off",
		"--bind-ro", ro, "--", "ls", "-A", "/tmp")
	cmd.Env = rootEnv()
	cmd.Dir = "/" // a working directory below /tmp (a clone there) would come along too
	if b, err := cmd.CombinedOutput(); err != nil || strings.TrimSpace(string(b)) != filepath.Base(ro) {
		t.Errorf("/tmp with one bind: %v %q", err, b)
	}
}

// TestCommandTrustsCAOverToolConfig: under interception, npm whose global
// npmrc names its own cafile (a corporate CA, say: here the test
// internet's, which is not the one the sandbox is shown) still installs a
// package by name from an HTTPS registry, because msbtap exports
// npm_config_cafile; git with http.sslCAInfo in its global config reaches
// the server too (GIT_SSL_CAINFO). Every tool variable names a bundle that
// verifies the intercepted host and holds the system's roots.
func TestCommandTrustsCAOverToolConfig(t *testing.T) {
	testenv.RequireTools(t, "npm", "node", "git", "curl")
	w := testenv.NewWorld(t)
	conf := tempDirIn(t, "/tmp", 0o755)
	corpCA, _ := os.ReadFile(w.TestCA)
	os.WriteFile(filepath.Join(conf, "corp-ca.pem"), corpCA, 0o644)
	os.WriteFile(filepath.Join(conf, "npmrc"), []byte("cafile="+filepath.Join(conf, "corp-ca.pem")+"\nupdate-notifier=false\nfund=false\naudit=false\n"), 0o644)
	os.WriteFile(filepath.Join(conf, "gitconfig"), []byte("[http]\n\tsslCAInfo = "+filepath.Join(conf, "corp-ca.pem")+"\n"), 0o644)
	pkg := "msbtap-probe-" + randomHex(4)
	host := "https://" + testenv.TestDomain
	script := fmt.Sprintf(`export HOME=/tmp/home
mkdir -p $HOME /tmp/proj && cd /tmp/proj && echo '{"name": "proj", "version": "1.0.0"}' > package.json
npm install --registry %[1]s/npm/ %[2]s >npm.log 2>&1; echo "NPM-EXIT $?"; tail -5 npm.log
node -e 'console.log("REQUIRE " + require("%[2]s"))'
git ls-remote %[1]s/no-such-repo.git 2>&1 | tail -2 | sed 's/^/GIT /'
for v in %[3]s; do
  eval f=\$$v
  echo "VAR $v $(curl -sS -o /dev/null -w '%%{http_code}' --max-time 10 --cacert "$f" %[1]s/)"
done
echo "BUNDLE-CERTS $(grep -c 'BEGIN CERTIFICATE' "$SSL_CERT_FILE")"`,
		host, pkg, strings.Join(agentBundleVariables, " "))
	cmd := w.Host.Command(w.Msbtap, "run", "--dns-upstream", testenv.DNSHost4, "--tls-intercept", "all", "--tls-upstream-ca", w.TestCA,
		"--bind-ro", conf, "--env", "NPM_CONFIG_GLOBALCONFIG="+filepath.Join(conf, "npmrc"), "--env", "GIT_CONFIG_GLOBAL="+filepath.Join(conf, "gitconfig"),
		"--", "sh", "-c", script)
	cmd.Env = rootEnv()
	start := time.Now()
	b, err := cmd.CombinedOutput()
	out := string(b)
	if err != nil {
		t.Fatalf("msbtap run: %v\n%s", err, out)
	}
	t.Logf("npm, git and curl in the sandbox: %v", time.Since(start).Round(time.Millisecond))
	for _, want := range []string{"NPM-EXIT 0", "REQUIRE " + pkg + " ok"} {
		if !strings.Contains(out, want) {
			t.Errorf("want %q in:\n%s", want, out)
		}
	}
	if !strings.Contains(out, "GIT ") || strings.Contains(out, "SSL certificate problem") || strings.Contains(out, "unable to get local issuer") {
		t.Errorf("git did not trust the sandbox's CA:\n%s", out)
	}
	for _, v := range agentBundleVariables {
		if !strings.Contains(out, "VAR "+v+" 200") {
			t.Errorf("%s: want a bundle curl verifies the intercepted host with:\n%s", v, out)
		}
	}
	if sys, err := os.ReadFile("/etc/ssl/certs/ca-certificates.crt"); err == nil {
		want := strings.Count(string(sys), "BEGIN CERTIFICATE") + 1
		if !strings.Contains(out, fmt.Sprintf("BUNDLE-CERTS %d\n", want)) {
			t.Errorf("want the system's %d roots plus msbtap's CA in the bundle:\n%s", want-1, out)
		}
	}
}

// agentBundleVariables are agent.BundleVariables, written out: the test
// says what a user relies on.
var agentBundleVariables = []string{"SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
	"npm_config_cafile", "PIP_CERT", "GIT_SSL_CAINFO", "CARGO_HTTP_CAINFO", "AWS_CA_BUNDLE", "DENO_CERT"}

// TestCommandKeepsWorkDirBelowTmp: started in a directory below /tmp (a
// checkout there, as CI's), the command works in it and sees its files,
// while the rest of the host's /tmp stays out; started in /tmp itself it
// gets its own empty one.
func TestCommandKeepsWorkDirBelowTmp(t *testing.T) {
	w := testenv.NewWorld(t)
	work := filepath.Join(t.TempDir(), "checkout")
	os.MkdirAll(work, 0o755)
	os.Chmod(filepath.Dir(work), 0o755)
	os.WriteFile(filepath.Join(work, "Makefile"), []byte("all:\n"), 0o644)
	run := func(dir string) (string, error) {
		cmd := w.Host.Command(w.Msbtap, "run", "--dns-upstream", testenv.DNSHost4, "--log-level", "warn", "--tls-intercept", "off",
			"--", "sh", "-c", "pwd; ls; ls -A /tmp | wc -l")
		cmd.Env = rootEnv()
		cmd.Dir = dir
		b, err := cmd.CombinedOutput()
		return string(b), err
	}
	out, err := run(work)
	if err != nil || !strings.Contains(out, work+"\n") || !strings.Contains(out, "Makefile") {
		t.Fatalf("in %s: %v\n%s", work, err, out)
	}
	// The command sees its directory's ancestors under /tmp only as the
	// path to it: one entry in /tmp.
	if lines := strings.Split(strings.TrimSpace(out), "\n"); lines[len(lines)-1] != "1" {
		t.Errorf("/tmp holds more than the path to the working directory:\n%s", out)
	}
	// Started in /tmp itself, it works in its own empty one.
	if out, err := run("/tmp"); err != nil || out != "/tmp\n0\n" {
		t.Errorf("started in /tmp: %v %q", err, out)
	}
}
