package policy

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"

	"golang.org/x/net/idna"
)

// Bounds on a host name in presentation form, without the root dot
// (RFC 1035: 255 octets on the wire).
const (
	maxNameLen  = 253
	maxLabelLen = 63
)

// idnaProfile turns U-labels into A-labels and checks A-labels the way a
// resolver's lookup does (UTS #46 mapping, bidi and joiner rules), but
// leaves hyphens in the third and fourth place alone: ASCII names such as
// r3---sn-x.googlevideo.com are real.
var idnaProfile = idna.New(idna.MapForLookup(), idna.BidiRule(), idna.CheckJoiners(true),
	idna.CheckHyphens(false), idna.StrictDomainName(true), idna.Transitional(false))

// NormalizeName is the one form of a host name that msbtap compares: SNI,
// HTTP Host and :authority, policy files. One root dot is removed, ASCII
// is lower-cased, U-labels become A-labels (IDNA, as a resolver would look
// them up) and A-labels must decode; then every label must be letters,
// digits and hyphens (not first or last), 1 to 63 of them, and the name at
// most 253 bytes. Anything else (NUL and control bytes, spaces, escapes,
// empty labels, an underscore) is an error: no host has such a name, and a
// component that read it differently could be fooled.
func NormalizeName(s string) (string, error) { return normalize(s, false) }

// NormalizeQuery is NormalizeName for the name of a DNS question, which
// may also be the root (returned as "") and have underscores in its labels
// (service and attribute names: _dmarc, _sip._tcp). Escapes in
// miekg/dns's presentation form (\000, \.) are errors like the bytes they
// stand for.
func NormalizeQuery(s string) (string, error) { return normalize(s, true) }

func normalize(s string, query bool) (string, error) {
	orig := s
	if query && s == "." {
		return "", nil
	}
	s = strings.TrimSuffix(s, ".")
	ascii := true
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			ascii = false
			break
		}
	}
	if !ascii || hasALabel(s) {
		if !ascii && query {
			return "", nameError(orig, "a byte outside ASCII")
		}
		if !utf8.ValidString(s) {
			return "", nameError(orig, "not UTF-8")
		}
		a, err := idnaProfile.ToASCII(s)
		if err == nil && a != s {
			// What it made must be what an A-label given as such gives.
			_, err = idnaProfile.ToASCII(a)
		}
		if err != nil {
			return "", nameError(orig, strings.TrimPrefix(err.Error(), "idna: "))
		}
		s = a
	}
	s = strings.ToLower(s)
	if err := checkLDH(s, query); err != nil {
		return "", nameError(orig, err.Error())
	}
	return s, nil
}

func hasALabel(s string) bool {
	for len(s) > 0 {
		label, rest, _ := strings.Cut(s, ".")
		if len(label) >= 4 && strings.EqualFold(label[:4], "xn--") {
			return true
		}
		s = rest
	}
	return false
}

// checkLDH checks a lower-case ASCII name label by label.
func checkLDH(s string, query bool) error {
	switch {
	case s == "":
		return errors.New("empty")
	case len(s) > maxNameLen:
		return fmt.Errorf("longer than %d bytes", maxNameLen)
	}
	for len(s) > 0 {
		label, rest, more := strings.Cut(s, ".")
		switch {
		case label == "":
			return errors.New("an empty label")
		case len(label) > maxLabelLen:
			return fmt.Errorf("a label longer than %d bytes", maxLabelLen)
		case label[0] == '-' || label[len(label)-1] == '-':
			return fmt.Errorf("label %q starts or ends with a hyphen", label)
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			switch {
			case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-':
			case c == '_' && query:
			case c < 0x20 || c == 0x7f:
				return fmt.Errorf("control byte %#02x", c)
			default:
				return fmt.Errorf("%q in label %q (letters, digits and hyphens only)", c, label)
			}
		}
		if more && rest == "" {
			return errors.New("an empty label") // two trailing dots
		}
		s = rest
	}
	return nil
}

func nameError(name, why string) error {
	if len(name) > 80 {
		name = name[:80] + "…"
	}
	return fmt.Errorf("%q is not a host name: %s", name, why)
}
