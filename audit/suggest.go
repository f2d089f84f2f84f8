package audit

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"

	"github.com/msbtap/msbtap/policy"
)

// LearnFrom feeds a decision log to l, as learn mode would have recorded
// the run: every egress flow, request and lookup that was allowed, or
// refused by the policy's default action only (not by a rule, a block
// list or a side door), with the names the log gives (SNI, else Host,
// else the pinned or asked name). Flows to cloud metadata or to the
// gateway are left out. It returns the lines used and the lines that were
// no decision record.
func LearnFrom(r io.Reader, l *policy.Learner) (used, bad int, err error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if len(sc.Bytes()) == 0 {
			continue
		}
		var rec Record
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil || rec.Action == "" {
			bad++
			continue
		}
		if learnRecord(&rec, l) {
			used++
		}
	}
	if err := sc.Err(); err != nil {
		return used, bad, fmt.Errorf("read the decision log: %w", err)
	}
	return used, bad, nil
}

func learnRecord(rec *Record, l *policy.Learner) bool {
	if rec.Direction != "egress" || (rec.Action != "allow" && rec.Rule != policy.RuleDefault) {
		return false
	}
	if rec.Proto == "dns" {
		if rec.Domain == "" {
			return false
		}
		l.Query(rec.Domain)
		return true
	}
	proto, err := policy.ParseProto(rec.Proto)
	if err != nil || proto == policy.DNS {
		return false
	}
	dst, err := netip.ParseAddrPort(rec.Dst)
	if err != nil {
		a, aerr := netip.ParseAddr(rec.Dst)
		if aerr != nil {
			return false
		}
		dst = netip.AddrPortFrom(a, 0)
	}
	a := dst.Addr().Unmap()
	if policy.InGroup(a, policy.GroupMetadata, nil) || a.IsLoopback() || a.IsUnspecified() {
		return false
	}
	if src, err := netip.ParseAddrPort(rec.Src); err == nil && src.Addr().Unmap().Prev() == a {
		return false // the gateway: the host itself
	}
	// A flow's first record names its address's pin; a later one of the
	// same flow the name it asked for (which the log cannot check against
	// the pins: it stands for them).
	switch {
	case rec.SNI != "":
		l.Named(rec.FlowID, proto, dst, rec.SNI, nil)
	case rec.Host != "":
		l.Named(rec.FlowID, proto, dst, rec.Host, nil)
	case rec.Domain != "":
		l.UseFlow(rec.FlowID, proto, dst, []string{rec.Domain})
	default:
		l.Use(proto, dst, nil)
	}
	return true
}
