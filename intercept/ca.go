// Package intercept terminates the sandbox's TLS with certificates of its
// own CA, so that msbtap sees each HTTP request: it checks the request's
// host against the name the connection asked for, applies the policy's
// HTTP rules, lets the secrets substitution rewrite it, and proxies it
// upstream over TLS verified against the host's roots. It also decides
// what to do with every flow whose first bytes need looking at (see
// Handler): splice it after a name check, intercept it, or refuse it.
package intercept

import (
	"container/list"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"sync"
	"time"
)

// CA issues the leaf certificates the sandbox sees.
type CA struct {
	cert    *x509.Certificate
	key     crypto.Signer
	certPEM []byte
	leafKey *ecdsa.PrivateKey // one key for every leaf: issuing is a signature, not a key generation

	mu     sync.Mutex // mu protects leaves and order
	leaves map[string]*list.Element
	order  *list.List // of *leaf, most recent first
	max    int
}

type leaf struct {
	name string
	cert *tls.Certificate
}

// DefaultLeafCache bounds the leaf certificates kept.
const DefaultLeafCache = 1024

// NewCA makes a CA for this run, in memory: ECDSA P-256, valid from an
// hour ago for a year.
func NewCA() (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{Organization: []string{"msbtap"}, CommonName: "msbtap sandbox CA " + now.UTC().Format("2006-01-02T15:04:05Z")},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return newCA(cert, key)
}

// LoadCA reads a CA certificate and its private key (PEM; the key PKCS#8,
// SEC 1 or PKCS#1). The key file must not be readable by group or others.
func LoadCA(certFile, keyFile string) (*CA, error) {
	cb, err := os.ReadFile(certFile)
	if err != nil {
		return nil, err
	}
	if st, err := os.Stat(keyFile); err != nil {
		return nil, err
	} else if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%s: readable by group or others (mode %v); chmod 600 it", keyFile, st.Mode().Perm())
	}
	kb, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, err
	}
	pair, err := tls.X509KeyPair(cb, kb)
	if err != nil {
		return nil, fmt.Errorf("%s, %s: %w", certFile, keyFile, err)
	}
	cert, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, fmt.Errorf("%s: %w", certFile, err)
	}
	if !cert.IsCA {
		return nil, fmt.Errorf("%s: not a CA certificate", certFile)
	}
	key, ok := pair.PrivateKey.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("%s: a key that cannot sign", keyFile)
	}
	return newCA(cert, key)
}

func newCA(cert *x509.Certificate, key crypto.Signer) (*CA, error) {
	lk, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	return &CA{cert: cert, key: key, leafKey: lk, certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}),
		leaves: make(map[string]*list.Element), order: list.New(), max: DefaultLeafCache}, nil
}

// CertPEM is the CA certificate, for the sandbox to trust.
func (ca *CA) CertPEM() []byte { return ca.certPEM }

// Cert is the CA certificate.
func (ca *CA) Cert() *x509.Certificate { return ca.cert }

// Leaf returns a certificate for name (a DNS name or an address), issued
// now or taken from the cache.
func (ca *CA) Leaf(name string) (*tls.Certificate, error) {
	if name == "" {
		return nil, errors.New("no name to issue a certificate for")
	}
	ca.mu.Lock()
	if el, ok := ca.leaves[name]; ok {
		l := el.Value.(*leaf)
		if time.Now().Before(l.cert.Leaf.NotAfter.Add(-time.Hour)) {
			ca.order.MoveToFront(el)
			ca.mu.Unlock()
			return l.cert, nil
		}
		ca.order.Remove(el)
		delete(ca.leaves, name)
	}
	ca.mu.Unlock()

	c, err := ca.issue(name)
	if err != nil {
		return nil, err
	}
	ca.mu.Lock()
	defer ca.mu.Unlock()
	if el, ok := ca.leaves[name]; ok { // issued meanwhile by another flow
		return el.Value.(*leaf).cert, nil
	}
	ca.leaves[name] = ca.order.PushFront(&leaf{name, c})
	for ca.order.Len() > ca.max {
		old := ca.order.Back()
		ca.order.Remove(old)
		delete(ca.leaves, old.Value.(*leaf).name)
	}
	return c, nil
}

// issue signs a leaf for one name: its only SAN, valid from an hour ago
// (clocks in guests drift) for a week or until the CA ends.
func (ca *CA) issue(name string) (*tls.Certificate, error) {
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     minTime(now.Add(7*24*time.Hour), ca.cert.NotAfter),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if ip := net.ParseIP(name); ip != nil {
		tmpl.IPAddresses = []net.IP{ip}
	} else {
		tmpl.DNSNames = []string{name}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &ca.leafKey.PublicKey, ca.key)
	if err != nil {
		return nil, fmt.Errorf("issue a certificate for %s: %w", name, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &tls.Certificate{Certificate: [][]byte{der, ca.cert.Raw}, PrivateKey: ca.leafKey, Leaf: leaf}, nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

// UpstreamRoots is the pool upstream certificates are verified against:
// the host's roots plus the PEM files given.
func UpstreamRoots(extra ...string) (*x509.CertPool, error) {
	pool, err := x509.SystemCertPool()
	if err != nil || pool == nil {
		pool = x509.NewCertPool()
	}
	for _, f := range extra {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		if !pool.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("%s: no PEM certificate in it", f)
		}
	}
	return pool, nil
}

// Bundle is the host's roots in PEM (the system's bundle file) plus the
// CA's certificate: what a program in the sandbox should trust.
func (ca *CA) Bundle() []byte {
	var out []byte
	for _, f := range systemBundles {
		if b, err := os.ReadFile(f); err == nil {
			out = append(b, '\n')
			break
		}
	}
	return append(out, ca.certPEM...)
}

// systemBundles are where distributions keep the roots, in PEM.
var systemBundles = []string{
	"/etc/ssl/certs/ca-certificates.crt", // Debian, Ubuntu, Alpine
	"/etc/pki/tls/certs/ca-bundle.crt",   // Fedora, RHEL
	"/etc/ssl/ca-bundle.pem",             // openSUSE
	"/etc/ssl/cert.pem",                  // Alpine, macOS
}
