package agent

import (
	"crypto/x509"
	"os"
	"path/filepath"

	"github.com/msbtap/msbtap/intercept"
	"github.com/msbtap/msbtap/internal/fielderr"
	"github.com/msbtap/msbtap/internal/safefile"
	"github.com/msbtap/msbtap/policy"
)

// TLSConfig is the TLS side of the agent: name checks, interception.
type TLSConfig struct {
	// Mode says which TLS connections are intercepted (intercept.Auto by
	// default in msbtap run).
	Mode intercept.Mode
	// CACert and CAKey are a CA to issue from; empty: one made for the
	// run, in memory.
	CACert, CAKey string
	// CAOut receives the CA certificate (PEM), for the guest to trust.
	CAOut string
	// UpstreamCA are PEM files trusted upstream besides the host's roots.
	UpstreamCA []string
	// Bypass are names spliced whatever the mode (exact or *.suffix).
	Bypass []string
}

// buildIntercept makes the CA and the handler that looks at first bytes.
func (a *Agent) buildIntercept() error {
	tc := a.cfg.TLS
	var ca *intercept.CA
	var err error
	if tc.CACert != "" || tc.CAKey != "" {
		if tc.CACert == "" || tc.CAKey == "" {
			return fielderr.Bad("tls_ca_cert", tc.CACert, "give both a CA certificate and its key")
		}
		if ca, err = intercept.LoadCA(tc.CACert, tc.CAKey); err != nil {
			return fielderr.Wrap("tls_ca_cert", err)
		}
	} else if ca, err = intercept.NewCA(); err != nil {
		return err
	}
	// Without extra CAs the host's roots are Go's own system pool (a nil
	// pool), which Go loads at the first upstream verification: parsing
	// them takes 10-25 ms, which start-up need not wait for.
	var roots *x509.CertPool
	if len(tc.UpstreamCA) > 0 {
		if roots, err = intercept.UpstreamRoots(tc.UpstreamCA...); err != nil {
			return fielderr.Wrap("tls_upstream_ca", err)
		}
	}
	a.ca = ca
	if tc.CAOut != "" {
		if err := writeFile(tc.CAOut, ca.CertPEM(), 0o644); err != nil {
			return fielderr.Wrap("tls_ca_out", err)
		}
	}
	if tc.Mode != intercept.Off && a.cfg.ForCommand {
		if err := a.writeBundle(); err != nil {
			return err
		}
	}
	a.l7 = intercept.NewHandler(intercept.Options{
		Mode: tc.Mode, CA: ca, Roots: roots, Bypass: tc.Bypass, Policy: a.holder, Ask: a.askFlow, Rewriter: a.rewriter(),
		Report:    a.onL7,
		Terminate: a.terminateL7,
		Dial:      a.dialIntercepted,
		Log:       a.log.With("component", "intercept"),
	})
	return nil
}

// writeBundle writes the host's roots plus the CA where the command can
// read them; its environment points at the file (see caEnv).
func (a *Agent) writeBundle() error {
	dir, err := os.MkdirTemp("", "msbtap-ca-")
	if err != nil {
		return err
	}
	a.onClose(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		return err
	}
	a.bundle = filepath.Join(dir, "ca-bundle.pem")
	return writeFile(a.bundle, a.ca.Bundle(), 0o644)
}

// BundleDir is the directory of the command's CA bundle, if any: the
// command's mount namespace shares it.
func (a *Agent) BundleDir() string {
	if a.bundle == "" {
		return ""
	}
	return filepath.Dir(a.bundle)
}

// BundleVariables point the command's tools at the CA bundle (msbtap's CA
// plus the host's roots). Besides the system-wide ones (OpenSSL's
// SSL_CERT_FILE, curl, Python requests, Node and Bun), each tool's own
// variable wins over its own configuration, where a machine's npmrc
// "cafile", pip.conf "cert", gitconfig "http.sslCAInfo" or Cargo's
// "http.cainfo" would make it ignore the system's roots.
var BundleVariables = []string{
	"SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
	"npm_config_cafile", "PIP_CERT", "GIT_SSL_CAINFO", "CARGO_HTTP_CAINFO", "AWS_CA_BUNDLE", "DENO_CERT",
}

// CAVars point the usual tools of the command at the bundle.
func (a *Agent) CAVars() []string {
	if a.bundle == "" {
		return nil
	}
	var env []string
	for _, k := range BundleVariables {
		env = append(env, k+"="+a.bundle)
	}
	return env
}

func writeFile(path string, b []byte, perm os.FileMode) error {
	f, err := safefile.OpenRegularNoFollow(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, perm)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// onL7 records what the handler decided.
func (a *Agent) onL7(ev intercept.Event) {
	if ev.Mode == "refused" || ev.Decision.Action != policy.Allow {
		a.counts.add(ev.Decision.Action)
	}
	a.audit.Inspected(ev.Flow, ev.Decision, ev.L7)
}

// terminateL7 stops the sandbox for a fatal violation found inside a
// connection.
func (a *Agent) terminateL7(ev intercept.Event) {
	a.terminate(violation(ev.Flow, ev.Decision, ev.L7, a.holder.Load()))
}
