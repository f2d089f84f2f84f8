package process

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/agent"
	"github.com/msbtap/msbtap/harden"
	"github.com/msbtap/msbtap/internal/safefile"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/secrets"
)

// KeeperArg is the hidden first argument that makes msbtap run as the
// keeper; main hands control to Keeper when it sees it.
const KeeperArg = "__msbtap-keeper"

// The keeper does for the agent, once the agent is no longer root, the few
// things on files that need root where they live: it rotates the decision
// log and the capture (FILE moved to FILE.1, FILE created anew and handed
// over), and when the agent ends, however it ends, it removes the pid
// file, the control socket, the CA bundle's directory and in VM mode the
// TAP devices (so that the agent keeps no CAP_NET_ADMIN on the host); on SIGHUP it
// reads the policy file and the secrets file (and the files the secrets
// come from) again, which may be root's only. It is msbtap
// itself, started during set-up, talking to the agent over a socket pair;
// it takes the paths once, from the agent still in set-up (keeperPaths),
// and afterwards only the requests below, by name: a hijacked agent can
// make it rotate its own files, nothing else. It runs as root with
// CAP_DAC_OVERRIDE and CAP_FOWNER only, no_new_privs and the seccomp list
// (files allowed), in its own process group, ignoring the terminal's
// signals, and ends when the agent's end of the socket closes.

// keeperPaths are the files the keeper works on.
type keeperPaths struct {
	Audit, Pcap              string // rotated
	PIDFile, Control, Bundle string // removed at the end, if they are still the ones set up
	Policy, Secrets          string // read again on SIGHUP
	// Learn gets learn mode's policy (write-learn); with SavePolicy, the
	// policy file gets the rules "always" answers add (save-policy). Both
	// are written whole and only as valid policies.
	Learn      string
	SavePolicy bool
	// Links are network devices removed at the end (VM mode: the VM's
	// TAP and the agent's), if they are still the ones set up.
	Links []string
}

type keeperRequest struct {
	Op    string       `json:"op"` // arm, rotate-audit, rotate-pcap, read-policy, read-secrets, write-learn, save-policy, cleanup
	Paths *keeperPaths `json:"paths,omitempty"`
}

type keeperReply struct {
	Err string `json:"err,omitempty"`
}

// keeper is the agent's side; it does the network's file work
// (agent.Files) once armed.
type keeper struct {
	mu   sync.Mutex
	fd   int // the agent's end of the socket pair
	cmd  *exec.Cmd
	done chan struct{}
}

// startKeeper starts the keeper process; it waits for arm. With links it
// keeps CAP_NET_ADMIN, to remove network devices at the end.
func startKeeper(links bool) (*keeper, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find msbtap's own binary: %w", err)
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("keeper socket: %w", err)
	}
	theirs := os.NewFile(uintptr(fds[1]), "keeper")
	defer theirs.Close()
	args := []string{KeeperArg}
	if links {
		args = append(args, "links")
	}
	cmd := exec.Command(self, args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.ExtraFiles = []*os.File{theirs}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // no ^C from the terminal: it outlives the agent to clean up
	if err := cmd.Start(); err != nil {
		unix.Close(fds[0])
		return nil, fmt.Errorf("start the keeper: %w", err)
	}
	k := &keeper{fd: fds[0], cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); close(k.done) }()
	return k, nil
}

// call sends one request and waits for the reply, and the descriptor that
// comes with it, if any.
func (k *keeper) call(req keeperRequest) (*os.File, error) { return k.callWith(req, nil) }

// callWith is call, passing the keeper the descriptor of in (if not nil)
// with the request.
func (k *keeper) callWith(req keeperRequest, in *os.File) (*os.File, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.fd < 0 {
		return nil, errors.New("the keeper is gone")
	}
	b, _ := json.Marshal(req)
	var rights []byte
	if in != nil {
		rights = unix.UnixRights(int(in.Fd()))
	}
	if err := unix.Sendmsg(k.fd, b, rights, nil, 0); err != nil {
		return nil, fmt.Errorf("keeper: %w", err)
	}
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := unix.Recvmsg(k.fd, buf, oob, unix.MSG_CMSG_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("keeper: %w", err)
	}
	if n == 0 {
		return nil, errors.New("the keeper is gone")
	}
	var f *os.File
	if oobn > 0 {
		if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil && len(msgs) == 1 {
			if fds, err := unix.ParseUnixRights(&msgs[0]); err == nil && len(fds) == 1 {
				f = os.NewFile(uintptr(fds[0]), "keeper-file")
			}
		}
	}
	var rep keeperReply
	if err := json.Unmarshal(buf[:n], &rep); err != nil {
		return nil, fmt.Errorf("keeper: %w", err)
	}
	if rep.Err != "" {
		if f != nil {
			f.Close()
		}
		return nil, errors.New(rep.Err)
	}
	return f, nil
}

// ReadPolicy has the keeper open the policy file.
func (k *keeper) ReadPolicy() ([]byte, error) {
	f, err := k.call(keeperRequest{Op: "read-policy"})
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, 64<<20))
}

// ReadSecrets has the keeper read the secrets file and its values (a
// read-secrets reply: an agent.SecretsRead on a pipe).
func (k *keeper) ReadSecrets() (*agent.SecretsRead, error) {
	f, err := k.call(keeperRequest{Op: "read-secrets"})
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var s agent.SecretsRead
	if err := json.NewDecoder(io.LimitReader(f, 64<<20)).Decode(&s); err != nil {
		return nil, fmt.Errorf("keeper: %w", err)
	}
	return &s, nil
}

// WritePolicy has the keeper write a policy file ("learn": the --learn
// file, "policy": the policy file, for --ask-save), atomically; the
// policy goes through a pipe (it may pass the socket's message size).
func (k *keeper) WritePolicy(which string, b []byte) error {
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	go func() { w.Write(b); w.Close() }()
	op := "write-learn"
	if which == "policy" {
		op = "save-policy"
	}
	_, err = k.callWith(keeperRequest{Op: op}, r)
	return err
}

// arm hands the keeper its paths, once, while the agent is still root.
func (k *keeper) arm(p keeperPaths) error {
	_, err := k.call(keeperRequest{Op: "arm", Paths: &p})
	return err
}

// Rotate has the keeper rotate the decision log ("audit") or the capture
// ("pcap") and returns the new file.
func (k *keeper) Rotate(what string) (*os.File, error) {
	f, err := k.call(keeperRequest{Op: "rotate-" + what})
	if err == nil && f == nil {
		err = errors.New("the keeper sent no file")
	}
	return f, err
}

// finish has the keeper remove what it must and end, and waits for it.
func (k *keeper) finish() {
	k.call(keeperRequest{Op: "cleanup"})
	k.mu.Lock()
	if k.fd >= 0 {
		unix.Close(k.fd)
		k.fd = -1
	}
	k.mu.Unlock()
	<-k.done
}

// Keeper is the keeper's main: it hardens itself and serves the agent on
// fd 3. It never returns.
func Keeper() {
	signal.Ignore(syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGPIPE)
	// Only what changing files in root's directories takes, and removing
	// network devices if it is to.
	keep := []uintptr{unix.CAP_DAC_OVERRIDE, unix.CAP_FOWNER}
	if len(os.Args) > 2 && os.Args[2] == "links" {
		keep = append(keep, unix.CAP_NET_ADMIN)
	}
	if err := harden.Apply(harden.Options{Keep: keep, Seccomp: true, Files: true}); err != nil {
		fmt.Fprintf(os.Stderr, "msbtap keeper: %v\n", err)
		os.Exit(1)
	}
	keeperServe(3)
	os.Exit(0)
}

// keeperServe answers the agent on fd until the agent's end closes, then
// removes what it must.
func keeperServe(fd int) {
	var paths *keeperPaths
	var armed map[string]safefile.Stamp // what the files to remove were at arm
	var links map[string]int            // the devices to remove, by index at arm
	buf := make([]byte, 4096)
	ctl := make([]byte, unix.CmsgSpace(4))
	for {
		n, oobn, _, _, err := unix.Recvmsg(fd, buf, ctl, unix.MSG_CMSG_CLOEXEC)
		if err == unix.EINTR {
			continue
		}
		if err != nil || n == 0 { // the agent is gone
			keeperCleanup(armed, links)
			return
		}
		in := passedFile(ctl[:oobn]) // a policy to write, with write-learn and save-policy
		var req keeperRequest
		var rep keeperReply
		var file *os.File
		// The cases' errors go to err, reported below (not to one of the
		// switch's own, which would drop them).
		switch jerr := json.Unmarshal(buf[:n], &req); {
		case jerr != nil:
			rep.Err = "bad request"
		case req.Op == "arm" && paths == nil && req.Paths != nil:
			paths = req.Paths
			armed = map[string]safefile.Stamp{}
			for _, p := range []string{paths.PIDFile, paths.Control, paths.Bundle} {
				if st, ok := safefile.StampOf(p); ok {
					armed[p] = st
				}
			}
			links = map[string]int{}
			for _, n := range paths.Links {
				if l, err := netlink.LinkByName(n); err == nil {
					links[n] = l.Attrs().Index
				}
			}
		case paths == nil:
			rep.Err = "not armed"
		case req.Op == "rotate-audit" && paths.Audit != "" && paths.Audit != "-":
			file, err = safefile.Rotate(paths.Audit, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o600)
		case req.Op == "rotate-pcap" && paths.Pcap != "":
			file, err = safefile.Rotate(paths.Pcap, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
		case req.Op == "read-policy" && paths.Policy != "":
			file, err = os.Open(paths.Policy)
		case req.Op == "read-secrets" && paths.Secrets != "":
			file, err = keeperReadSecrets(paths.Secrets)
		case req.Op == "write-learn" && paths.Learn != "" && in != nil:
			err = keeperWritePolicy(paths.Learn, in)
		case req.Op == "save-policy" && paths.SavePolicy && paths.Policy != "" && in != nil:
			err = keeperWritePolicy(paths.Policy, in)
		case req.Op == "cleanup":
			keeperCleanup(armed, links)
			armed, links = nil, nil
		default:
			rep.Err = "refused: " + req.Op
		}
		if err != nil && rep.Err == "" {
			rep.Err = err.Error()
		}
		b, _ := json.Marshal(rep)
		var oob []byte
		if file != nil {
			oob = unix.UnixRights(int(file.Fd()))
		}
		unix.Sendmsg(fd, b, oob, nil, 0)
		if file != nil {
			file.Close()
		}
		if in != nil {
			in.Close()
		}
	}
}

// passedFile is the one descriptor a message's control data passed, or
// nil (more than one are all closed).
func passedFile(oob []byte) *os.File {
	if len(oob) == 0 {
		return nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	var fds []int
	for _, m := range msgs {
		if f, err := unix.ParseUnixRights(&m); err == nil {
			fds = append(fds, f...)
		}
	}
	if len(fds) != 1 {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return nil
	}
	return os.NewFile(uintptr(fds[0]), "passed")
}

// keeperWritePolicy writes the policy read from in to path, atomically,
// if it is a valid policy.
func keeperWritePolicy(path string, in *os.File) error {
	// Only from a pipe, and only for keeperReadTimeout: a socket (or a
	// pipe) whose far end never closes must not hold the keeper, whose
	// cleanup at the end runs however the agent ends.
	rc, err := in.SyscallConn()
	if err != nil {
		return err
	}
	dup, ferr := -1, error(nil)
	if err := rc.Control(func(fd uintptr) {
		var st unix.Stat_t
		if ferr = unix.Fstat(int(fd), &st); ferr == nil && st.Mode&unix.S_IFMT != unix.S_IFIFO {
			ferr = errors.New("the policy must come through a pipe")
		}
		if ferr == nil {
			dup, ferr = unix.Dup(int(fd))
		}
	}); err != nil {
		return err
	}
	if ferr != nil {
		return ferr
	}
	unix.SetNonblock(dup, true)
	p := os.NewFile(uintptr(dup), "policy")
	defer p.Close()
	if err := p.SetReadDeadline(time.Now().Add(keeperReadTimeout)); err != nil {
		return err
	}
	b, err := io.ReadAll(io.LimitReader(p, 64<<20))
	if err != nil {
		return err
	}
	f, err := policy.ParseFile(b)
	if err != nil {
		return fmt.Errorf("not a valid policy: %w", err)
	}
	return agent.WritePolicyFile(path, f)
}

// keeperReadTimeout bounds how long the keeper reads a policy the agent
// hands it.
var keeperReadTimeout = 10 * time.Second

// keeperReadSecrets reads the secrets file with the checks the agent
// makes at start (secrets.LoadFile) and the files its secrets come from,
// and hands them over through a pipe (they may pass the socket's message
// size).
func keeperReadSecrets(path string) (*os.File, error) {
	// One read, checked (owner, mode, a regular file, its size): the
	// bytes parsed are the bytes handed over, and every value file gets
	// the same checks as at start.
	b, err := safefile.ReadPrivate(path, secrets.MaxFileSize)
	if err != nil {
		return nil, err
	}
	f, err := secrets.ParseFile(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	out := agent.SecretsRead{File: b, Values: map[string][]byte{}}
	for _, sp := range f.Secrets {
		if sp.FromFile != "" {
			if out.Values[sp.FromFile], err = safefile.ReadPrivate(sp.FromFile, secrets.MaxFileSize); err != nil {
				return nil, fmt.Errorf("secret %s: %w", sp.Name, err)
			}
		}
	}
	b, _ = json.Marshal(out)
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	go func() { w.Write(b); w.Close() }()
	return r, nil
}

// keeperCleanup removes each file and device that is still the one armed.
func keeperCleanup(armed map[string]safefile.Stamp, links map[string]int) {
	for n, index := range links {
		if l, err := netlink.LinkByName(n); err == nil && l.Attrs().Index == index {
			netlink.LinkDel(l)
		}
	}
	for p, was := range armed {
		safefile.RemoveIfUnchanged(p, was) // another file now is left alone
	}
}
