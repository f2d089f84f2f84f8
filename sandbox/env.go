package sandbox

import (
	"bufio"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
)

// Inherited are the variables of msbtap's own environment the command
// gets as they are (LC_* too, see inherited). HOME, USER, LOGNAME and
// SHELL are not among them: they describe the user the command runs as
// (see Account). Everything else — the caller's tokens, SSH_AUTH_SOCK,
// DBUS_*, XDG_RUNTIME_DIR, LD_PRELOAD — stays out unless --env names it.
var Inherited = []string{"PATH", "TERM", "LANG", "TZ"}

// DefaultPath is the command's PATH when msbtap has none.
const DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// IsInherited reports whether the command gets msbtap's own value of name
// without asking.
func IsInherited(name string) bool { return inherited(name) }

func inherited(name string) bool {
	for _, n := range Inherited {
		if name == n {
			return true
		}
	}
	return strings.HasPrefix(name, "LC_")
}

// EnvOptions are what the command's environment is made of.
type EnvOptions struct {
	// Host is msbtap's own environment (os.Environ()); of a name given
	// twice, the first counts (as for os.Getenv).
	Host []string
	// User is the user the command runs as: HOME, USER, LOGNAME, SHELL.
	User Account
	// Own are msbtap's variables for the command (the CA bundle's).
	Own []string
	// Extra are the --env entries in order: NAME takes the value from Host
	// (nothing if Host has none), NAME=VALUE sets it; a later entry wins.
	// They win over Own and User.
	Extra []string
	// Final are set last and win over everything (the secrets'
	// placeholders).
	Final []string
	// Forbidden names never take their value from Host, whatever Extra
	// says: the secrets' source variables. (A Final entry may still use
	// the name, with its own value.)
	Forbidden []string
}

// Environ builds the command's environment from an allow-list: the
// Inherited variables of Host, the User's, Own, Extra and Final, each name
// once, sorted.
func Environ(o EnvOptions) ([]string, error) {
	forbidden := map[string]bool{}
	for _, n := range o.Forbidden {
		forbidden[n] = true
	}
	host := map[string]string{}
	for _, kv := range o.Host {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			continue
		}
		if _, dup := host[k]; !dup && !forbidden[k] {
			host[k] = v
		}
	}
	env := map[string]string{}
	for k, v := range host {
		if inherited(k) {
			env[k] = v
		}
	}
	if _, ok := env["PATH"]; !ok {
		env["PATH"] = DefaultPath
	}
	env["HOME"], env["USER"], env["LOGNAME"], env["SHELL"] = o.User.Home, o.User.Name, o.User.Name, o.User.Shell
	set := func(kv, what string) error {
		k, v, ok := strings.Cut(kv, "=")
		if err := CheckEnvName(k); err != nil {
			return fmt.Errorf("%s %q: %w", what, kv, err)
		}
		if !ok {
			return fmt.Errorf("%s %q: want NAME=VALUE", what, kv)
		}
		env[k] = v
		return nil
	}
	for _, kv := range o.Own {
		if err := set(kv, "variable"); err != nil {
			return nil, err
		}
	}
	for _, e := range o.Extra {
		k, v, hasValue := strings.Cut(e, "=")
		if err := CheckEnvName(k); err != nil {
			return nil, fmt.Errorf("env %q: %w", e, err)
		}
		if forbidden[k] {
			return nil, fmt.Errorf("env %q: a secret's source variable never reaches the command", k)
		}
		if strings.IndexByte(v, 0) >= 0 {
			return nil, fmt.Errorf("env %q: the value holds a NUL byte", k)
		}
		if !hasValue {
			hv, ok := host[k]
			if !ok {
				delete(env, k) // unset here, unset there (as docker run -e NAME)
				continue
			}
			v = hv
		}
		env[k] = v
	}
	for _, kv := range o.Final {
		if err := set(kv, "variable"); err != nil {
			return nil, err
		}
	}
	out := make([]string, 0, len(env))
	for k, v := range env {
		if strings.IndexByte(v, 0) >= 0 {
			continue // execve would refuse the whole environment
		}
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out, nil
}

// CheckEnvName accepts the portable names of environment variables:
// letters, digits and underscores, not starting with a digit.
func CheckEnvName(name string) error {
	if name == "" {
		return fmt.Errorf("empty variable name")
	}
	for i, c := range []byte(name) {
		if c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (i > 0 && c >= '0' && c <= '9') {
			continue
		}
		return fmt.Errorf("variable name %q: want letters, digits and underscores, not starting with a digit", name)
	}
	return nil
}

// EnvName is the name of an --env entry (NAME or NAME=VALUE).
func EnvName(entry string) string {
	k, _, _ := strings.Cut(entry, "=")
	return k
}

// Account is what the command's environment says about its user.
type Account struct {
	Name, Home, Shell string
}

// LookupAccount reads the user database (/etc/passwd) for uid; a uid
// with no entry is named by its number, with HOME / and SHELL /bin/sh.
func LookupAccount(uid int) Account {
	return lookupAccount("/etc/passwd", uid)
}

func lookupAccount(passwd string, uid int) Account {
	a := Account{Name: strconv.Itoa(uid), Home: "/", Shell: "/bin/sh"}
	f, err := os.Open(passwd)
	if err != nil {
		return a
	}
	defer f.Close()
	want := strconv.Itoa(uid)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// name:password:uid:gid:gecos:home:shell
		fs := strings.Split(sc.Text(), ":")
		if len(fs) != 7 || fs[2] != want || fs[0] == "" || strings.HasPrefix(fs[0], "+") || strings.HasPrefix(fs[0], "-") {
			continue
		}
		a.Name = fs[0]
		if fs[5] != "" {
			a.Home = fs[5]
		}
		if fs[6] != "" {
			a.Shell = fs[6]
		}
		return a
	}
	return a
}
