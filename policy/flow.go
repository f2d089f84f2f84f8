// Package policy decides, at the first packet of every flow, whether the
// sandbox may make it: allow, deny, or deny and terminate the sandbox.
package policy

import (
	"fmt"
	"net/netip"
)

// Proto is a flow's transport protocol.
type Proto uint8

// Protocols a flow can have.
const (
	TCP Proto = iota + 1
	UDP
	ICMP   // ICMPv4 echo
	ICMPv6 // ICMPv6 echo
	// DNS is no flow's protocol: a rule for it lets its names resolve
	// (an allow) or refuses them (a deny) without allowing or denying
	// any connection.
	DNS
)

// String returns the protocol's name as written in policy files.
func (p Proto) String() string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	case ICMP:
		return "icmp"
	case ICMPv6:
		return "icmpv6"
	case DNS:
		return "dns"
	}
	return fmt.Sprintf("proto(%d)", uint8(p))
}

// Direction says which side opened a flow.
type Direction uint8

// Directions.
const (
	Egress  Direction = iota // the sandbox opened it
	Ingress                  // a host client opened it through a published port
)

// String returns the direction's name as written in policy files.
func (d Direction) String() string {
	if d == Ingress {
		return "ingress"
	}
	return "egress"
}

// Action is what a decision does with a flow.
type Action uint8

// Actions.
const (
	Allow Action = iota
	Deny
	Terminate // deny, then fire the termination hook
	// Ask holds the flow until someone decides (see Asker); wherever no
	// one can, it is a deny.
	Ask
)

// String returns the action's name as written in policy files.
func (a Action) String() string {
	switch a {
	case Allow:
		return "allow"
	case Deny:
		return "deny"
	case Terminate:
		return "terminate"
	case Ask:
		return "ask"
	}
	return fmt.Sprintf("action(%d)", uint8(a))
}

// Flow is the first packet of a flow, as the policy sees it. For ICMP the
// ports are zero. Domain is the name the destination was resolved from, when
// known (or the queried name, for a DNS query).
type Flow struct {
	// ID names the flow in the decision log, the events and the control
	// socket's list (0: none given).
	ID        uint64
	Direction Direction
	Proto     Proto
	Src, Dst  netip.AddrPort
	Domain    string
	DNS       bool // the flow is a DNS query to the agent's resolver
}

// Decision is a policy's verdict on a flow. Rule is the index of the deciding
// rule, or -1 when the default action decided.
type Decision struct {
	Action Action
	Rule   int
	// ByName: the deciding rule matched the destination by name (a domain
	// or domain_suffix rule, through the DNS pins or Flow.Domain), so the
	// name the connection then asks for (TLS SNI, HTTP Host) must be one
	// the policy allows too.
	ByName bool
	// PerRequest: the deciding rule has HTTP conditions. The flow may
	// start; each request on it is decided by CheckRequest, which needs
	// the connection intercepted.
	PerRequest bool
}

// Verdict is a decision together with the flow it decided, as a component
// that decides on its own (the DNS guard) hands it to whoever reports.
type Verdict struct {
	Flow     Flow
	Decision Decision
}

// Checker decides flows. Implementations must be safe for concurrent use and
// cheap: Check runs on the packet path.
type Checker interface {
	Check(f Flow) Decision
}

// AllowAll is a Checker that allows every flow.
type AllowAll struct{}

// Check implements Checker.
func (AllowAll) Check(Flow) Decision { return Decision{Action: Allow, Rule: -1} }
