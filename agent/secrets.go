package agent

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"

	"github.com/miekg/dns"

	"github.com/msbtap/msbtap/control"
	"github.com/msbtap/msbtap/dnsproxy"
	"github.com/msbtap/msbtap/intercept"
	"github.com/msbtap/msbtap/internal/fielderr"
	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/sandbox"
	"github.com/msbtap/msbtap/secrets"
)

// SecretsConfig declares the secrets.
type SecretsConfig struct {
	// Flags are the secrets from --secret; File (--secrets) holds more,
	// and is re-read on SIGHUP.
	Flags []secrets.Spec
	File  string
	// EnvOut receives NAME=placeholder lines, for a VM or a namespace
	// msbtap did not start.
	EnvOut string
}

// buildSecrets reads the secrets and checks that interception can carry
// them.
func (a *Agent) buildSecrets() error {
	sc := a.cfg.Secrets
	specs, err := sc.specs()
	if err != nil {
		return fielderr.Wrap("secrets", err)
	}
	if len(specs) == 0 {
		return nil
	}
	if err := a.checkCommandEnv(specs); err != nil {
		return err
	}
	for _, sp := range specs {
		if sp.FromEnv != "" {
			a.secretSrc = append(a.secretSrc, sp.FromEnv)
		}
	}
	if a.cfg.TLS.Mode == intercept.Off {
		return fielderr.Bad("tls_intercept", "off", "secrets are injected into intercepted TLS: give --tls-intercept auto or all")
	}
	for _, sp := range specs {
		for _, h := range sp.Hosts {
			for _, b := range a.cfg.TLS.Bypass {
				if intercept.MatchesAny([]string{b}, strings.TrimPrefix(h, "*.")) || intercept.MatchesAny([]string{h}, strings.TrimPrefix(b, "*.")) {
					return fielderr.Bad("tls_bypass", b, "secret %s goes to %s, which would be spliced: a secret's host is never bypassed", sp.Name, h)
				}
			}
		}
	}
	st, err := secrets.New(specs, a.getenv)
	if err != nil {
		return fielderr.Wrap("secret", err)
	}
	// The values are in this process's memory from now on: whoever runs
	// the agent keeps it out of core dumps and ptrace (package process
	// sets PR_SET_DUMPABLE to 0 before the network is built).
	a.secrets = st
	if sc.EnvOut != "" {
		if err := writeFile(sc.EnvOut, []byte(strings.Join(st.Env(), "\n")+"\n"), 0o600); err != nil {
			return fielderr.Wrap("secrets_env_out", err)
		}
	}
	return nil
}

// checkCommandEnv refuses an --env that names a secret's source variable
// (its value would reach the command) or a secret's name (the command
// gets the placeholder there).
func (a *Agent) checkCommandEnv(specs []secrets.Spec) error {
	for _, e := range a.cfg.CommandEnv {
		n := sandbox.EnvName(e)
		for _, sp := range specs {
			switch n {
			case sp.FromEnv:
				return fielderr.Bad("env", e, "%s holds the value of secret %s, which never reaches the command (it gets a placeholder in %s)", n, sp.Name, sp.Name)
			case sp.Name:
				return fielderr.Bad("env", e, "%s is secret %s's placeholder, which msbtap sets", n, sp.Name)
			}
		}
	}
	return nil
}

// SecretSources are the variables the secrets are read from, and the
// one the upstream proxy's credentials are: none reaches the command.
func (a *Agent) SecretSources() []string {
	if v := a.cfg.Upstream.CredentialsEnv; v != "" && a.cfg.Upstream.Enabled() {
		return append(slices.Clip(a.secretSrc), v)
	}
	return a.secretSrc
}

// rewriter is what interception rewrites requests with: the secrets, if
// any.
func (a *Agent) rewriter() intercept.Rewriter {
	if a.secrets == nil {
		return nil
	}
	return a.secrets
}

// SecretVars are NAME=placeholder for the command.
func (a *Agent) SecretVars() []string {
	if a.secrets == nil {
		return nil
	}
	return a.secrets.Env()
}

// specs are the flags' secrets and the file's.
func (sc SecretsConfig) specs() ([]secrets.Spec, error) {
	specs := append([]secrets.Spec(nil), sc.Flags...)
	if sc.File != "" {
		f, err := secrets.LoadFile(sc.File)
		if err != nil {
			return nil, err
		}
		specs = append(specs, f.Secrets...)
	}
	seen := map[string]bool{}
	for _, s := range specs {
		if seen[s.Name] {
			return nil, fmt.Errorf("secret %s declared twice", s.Name)
		}
		seen[s.Name] = true
	}
	return specs, nil
}

// ReloadSecrets re-reads the secrets file (on SIGHUP): new values and hosts
// apply to new requests; an invalid file leaves the old secrets in force.
func (a *Agent) ReloadSecrets() {
	sc := a.cfg.Secrets
	if sc.File == "" || a.secrets == nil {
		return
	}
	var specs []secrets.Spec
	var err error
	if files := a.filesOr(); files != nil {
		specs, err = a.keeperSpecs(files)
	} else {
		specs, err = sc.specs()
	}
	if err == nil {
		err = a.checkCommandEnv(specs)
	}
	if err == nil && a.cfg.ForCommand {
		// The command's environment was made at the start: a variable it
		// inherited cannot become a secret's source now.
		for _, sp := range specs {
			if sp.FromEnv != "" && sandbox.IsInherited(sp.FromEnv) && !slices.Contains(a.secretSrc, sp.FromEnv) {
				err = fmt.Errorf("secret %s: the command already holds %s", sp.Name, sp.FromEnv)
			}
		}
	}
	if err == nil {
		err = a.secrets.Reload(specs)
	}
	if err != nil {
		a.log.Error("secrets reload failed; the old ones stay in force", "file", sc.File, "err", err)
		return
	}
	a.log.Info("secrets reloaded", "file", sc.File, "secrets", len(specs))
}

// keeperSpecs are the flags' secrets and the file's as the keeper read
// it: a secret from a file takes its value from what the keeper read,
// under a name no environment variable has (see getenv).
func (a *Agent) keeperSpecs(files Files) ([]secrets.Spec, error) {
	ks, err := files.ReadSecrets()
	if err != nil {
		return nil, err
	}
	f, err := secrets.ParseFile(ks.File)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", a.cfg.Secrets.File, err)
	}
	vals := map[string]string{}
	specs := append([]secrets.Spec(nil), a.cfg.Secrets.Flags...)
	for _, sp := range f.Secrets {
		if sp.FromFile != "" {
			v, ok := ks.Values[sp.FromFile]
			if !ok {
				return nil, fmt.Errorf("secret %s: %s not read", sp.Name, sp.FromFile)
			}
			v = bytes.TrimSuffix(v, []byte("\n"))
			if len(v) == 0 {
				return nil, fmt.Errorf("secret %s: %s is empty", sp.Name, sp.FromFile)
			}
			key := fileValuePrefix + sp.FromFile
			vals[key] = string(v)
			sp.FromEnv, sp.FromFile = key, ""
		}
		specs = append(specs, sp)
	}
	seen := map[string]bool{}
	for _, s := range specs {
		if seen[s.Name] {
			return nil, fmt.Errorf("secret %s declared twice", s.Name)
		}
		seen[s.Name] = true
	}
	a.fileValues.Store(&vals)
	return specs, nil
}

// fileValuePrefix starts the names under which getenv finds the values of
// secrets from files, as the keeper read them: "=" is in no environment
// variable's name.
const fileValuePrefix = "=file:"

// getenv is the secrets' environment: msbtap's, plus the values the
// keeper read from files.
func (a *Agent) getenv(name string) string {
	if strings.HasPrefix(name, fileValuePrefix) {
		if m := a.fileValues.Load(); m != nil {
			return (*m)[name]
		}
		return ""
	}
	return os.Getenv(name)
}

// dnsFilter is the guard, behind the secrets' check of query names.
func (a *Agent) dnsFilter(guard dnsproxy.Filter) dnsproxy.Filter {
	if a.secrets == nil {
		return guard
	}
	return secretDNS{guard, a.secrets}
}

// secretDNS checks query names for placeholders before the policy's guard
// sees them: a name cannot carry a secret's placeholder out.
type secretDNS struct {
	dnsproxy.Filter
	st *secrets.Store
}

func (s secretDNS) Query(src netip.AddrPort, q *dns.Msg) (*dns.Msg, *policy.Verdict) {
	if len(q.Question) == 1 {
		if ref := s.st.ScanName(q.Question[0].Name); ref != nil {
			m := new(dns.Msg)
			m.SetRcode(q, dns.RcodeRefused)
			d := policy.Decision{Action: policy.Deny, Rule: policy.RuleSecret}
			if ref.Terminate {
				d.Action = policy.Terminate
			}
			return m, &policy.Verdict{Flow: policy.Flow{Proto: policy.UDP, Src: src, Domain: strings.TrimSuffix(q.Question[0].Name, "."), DNS: true}, Decision: d}
		}
	}
	return s.Filter.Query(src, q)
}

// SetSecret and RemoveSecret serve the control socket.
func (c *controller) SetSecret(name string, value []byte) error {
	if c.a.secrets == nil {
		return fmt.Errorf("%w: secret %q: this sandbox has no secrets (declare them with --secret or --secrets)", control.ErrNotFound, name)
	}
	if err := c.a.secrets.Set(name, value); err != nil {
		return fmt.Errorf("%w: %v", control.ErrNotFound, err)
	}
	c.a.log.Info("secret changed through the control socket", "secret", name)
	return nil
}

func (c *controller) RemoveSecret(name string) error {
	if c.a.secrets == nil {
		return fmt.Errorf("%w: secret %q: this sandbox has no secrets", control.ErrNotFound, name)
	}
	if err := c.a.secrets.Remove(name); err != nil {
		return fmt.Errorf("%w: %v", control.ErrNotFound, err)
	}
	c.a.log.Info("secret removed through the control socket", "secret", name)
	return nil
}
