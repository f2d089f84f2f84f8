package policy

import (
	"fmt"
	"io"
	"strings"
)

// groupText says, in words, what each group holds.
func groupText(g string) string {
	join := func(ps []string) string { return strings.Join(ps, ", ") }
	var ps, ms, rs []string
	for _, p := range private {
		ps = append(ps, p.String())
	}
	for _, m := range metadata {
		ms = append(ms, m.String())
	}
	for _, r := range reserved {
		rs = append(rs, r.String())
	}
	switch g {
	case "loopback":
		return "127.0.0.0/8, ::1"
	case "private":
		return join(ps)
	case "link_local":
		return "169.254.0.0/16, fe80::/10"
	case "metadata":
		return join(ms)
	case "multicast":
		return "224.0.0.0/4, 255.255.255.255, ff00::/8"
	case "host":
		return "the gateway's addresses (the slot's .1 and ::1, which reach the host's loopback) and every address of the host, kept current"
	case "public":
		return "every address in no other group, except the special-purpose ranges " + join(rs) +
			" (documentation ranges count as public)"
	}
	return "unknown group"
}

// targetText says what a rule's destination or source matches.
func targetText(t *Target) string {
	switch {
	case t == nil || t.Any:
		return "any address"
	case t.CIDR != "":
		return "addresses in " + t.CIDR
	case t.Domain != "":
		return "the name " + t.Domain + " (addresses the sandbox resolved it to through msbtap)"
	case t.DomainSuffix != "":
		return t.DomainSuffix + " and every name under it (addresses the sandbox resolved them to through msbtap)"
	case t.Preset != "":
		return presetText(t.Preset)
	}
	return "group " + t.Group + ": " + groupText(t.Group)
}

// presetText lists a preset of names.
func presetText(name string) string {
	p, ok := LookupNamePreset(name)
	if !ok {
		return "preset " + name + ": unknown preset"
	}
	names := append([]string{}, p.Domains...)
	for _, s := range p.DomainSuffixes {
		names = append(names, s+" and every name under it")
	}
	return "preset " + name + ": " + strings.Join(names, ", ") + " (addresses the sandbox resolved them to through msbtap)"
}

func actionText(a string) string {
	switch a {
	case "allow":
		return "allow"
	case "deny":
		return "deny"
	case "ask":
		return "ask (hold until answered, through msbtap ctl or --ask-exec) about"
	}
	return "terminate the sandbox on"
}

// Show writes the policy in words, one rule a line, groups expanded into
// their ranges, in the order the rules are tried.
func Show(w io.Writer, f *File) {
	fmt.Fprintf(w, "flows no rule matches: %s (default_action %s)\n", actionText(f.DefaultAction), f.DefaultAction)
	switch {
	case f.DefaultAction == "allow":
		fmt.Fprintln(w, "names: every name resolves unless a domain rule denies it")
	case f.Resolve == ResolveAll:
		fmt.Fprintln(w, `names: every name resolves unless a domain rule denies it ("resolve": "all")`)
	case f.DefaultAction == "ask":
		fmt.Fprintln(w, `names: names an allowing or asking domain rule lists resolve; the lookup of any other is asked about ("resolve": "listed")`)
	default:
		fmt.Fprintln(w, `names: only names an allowing domain rule lists resolve, the others get NXDOMAIN ("resolve": "listed")`)
	}
	if len(f.Rules) == 0 {
		fmt.Fprintln(w, "rules: none")
	} else {
		fmt.Fprintln(w, "rules, tried in order, the first that matches decides:")
	}
	named := false
	for i, r := range f.Rules {
		var b strings.Builder
		fmt.Fprintf(&b, "  %d. %s", i, actionText(r.Action))
		if r.Direction == "ingress" {
			b.WriteString(" clients of published ports")
			if len(r.Ports) > 0 {
				b.WriteString(" (host " + portsText(r.Ports) + ")")
			}
			b.WriteString(" from " + targetText(r.Source))
			if r.Destination != nil && !r.Destination.Any {
				b.WriteString(", to the sandbox's " + targetText(r.Destination))
			}
		} else {
			protos, ports := r.Protocols, r.Ports
			if r.Destination != nil && r.Destination.Preset != "" && r.Action == "allow" {
				// The preset's own ports, over TCP, unless the rule says.
				if p, ok := LookupNamePreset(r.Destination.Preset); ok && len(ports) == 0 {
					ports = p.portRanges()
				}
				if len(protos) == 0 {
					protos = []string{"tcp"}
				}
			}
			b.WriteString(" " + protosText(protos))
			if len(ports) > 0 {
				b.WriteString(" to " + portsText(ports) + " of " + targetText(r.Destination))
			} else {
				b.WriteString(" to " + targetText(r.Destination))
			}
			if r.Destination != nil && (r.Destination.Domain != "" || r.Destination.DomainSuffix != "" || r.Destination.Preset != "") {
				named = true
			}
		}
		if r.HTTP != nil {
			m := "any method"
			if len(r.HTTP.Methods) > 0 {
				m = strings.Join(r.HTTP.Methods, ", ")
			}
			p := "any path"
			if len(r.HTTP.Paths) > 0 {
				p = "paths " + strings.Join(r.HTTP.Paths, ", ")
			}
			fmt.Fprintf(&b, ", for HTTP requests %s to %s (decided request by request; other requests fall through to the next rules)", m, p)
		}
		fmt.Fprintln(w, b.String())
	}
	fmt.Fprintln(w, "always: published ports accept every client no ingress rule refuses; unspecified addresses are never dialed;")
	fmt.Fprintln(w, "  an IPv6 address that carries an IPv4 one (mapped, NAT64, 6to4) is judged as that IPv4 address;")
	fmt.Fprintln(w, "  cloud metadata, the host and the local-use NAT64 prefix 64:ff9b:1::/48 are allowed only by a rule")
	fmt.Fprintln(w, "  that names them (group metadata, group host, a CIDR inside 64:ff9b:1::/48), never by any, a CIDR or the default;")
	fmt.Fprintln(w, "  broadcast and multicast addresses are never reached")
	asks := f.DefaultAction == "ask"
	for _, r := range f.Rules {
		asks = asks || r.Action == "ask"
	}
	if asks {
		fmt.Fprintln(w, "asking: a TCP connection (at its SYN or its TLS server name), a UDP flow (its first datagram) and a lookup wait for the answer")
		fmt.Fprintln(w, "  (--ask-timeout, 30 s, then deny); ICMP and single HTTP requests an ask decides are refused; metadata, the host and what a deny rule matches are never asked")
	}
	if named {
		fmt.Fprintln(w, "because rules match names: a connection's TLS server name or HTTP Host must be allowed too;")
		fmt.Fprintln(w, "  UDP 443 (QUIC) to names and DNS over TLS (TCP 853) are refused")
	}
}

func protosText(ps []string) string {
	if len(ps) == 0 {
		return "every protocol"
	}
	out := make([]string, len(ps))
	for i, p := range ps {
		out[i] = p
		if p == "dns" {
			out[i] = "dns lookups (no connection)"
		}
	}
	return strings.Join(out, ", ")
}

func portsText(rs []PortRange) string {
	var s []string
	for _, p := range rs {
		if p.End == 0 || p.End == p.Start {
			s = append(s, fmt.Sprint(p.Start))
		} else {
			s = append(s, fmt.Sprintf("%d-%d", p.Start, p.End))
		}
	}
	if len(s) == 1 {
		return "port " + s[0]
	}
	return "ports " + strings.Join(s, ", ")
}
