package main

import (
	"log/slog"

	"github.com/msbtap/msbtap/policy"
	"github.com/msbtap/msbtap/proxy"
	"github.com/msbtap/msbtap/rings"
	"github.com/msbtap/msbtap/stack"
)

// gateway is the running userspace side of the sandbox.
type gateway struct {
	*stack.Stack
}

func (g *gateway) Close() error {
	err := g.Stack.Close()
	g.Stack.Wait()
	return err
}

func startGateway(sh *rings.Shared, o runOptions, holder *policy.Holder, guard *policy.DNSGuard,
	onDecision func(policy.Flow, policy.Decision), log *slog.Logger) (*gateway, error) {
	ups := o.dnsUpstreams
	if len(ups) == 0 {
		ups = proxy.HostUpstreams(proxy.DefaultResolvConf)
		if len(ups) == 0 {
			log.Warn("no DNS upstream: none given and none in " + proxy.DefaultResolvConf + "; the sandbox's queries will get SERVFAIL")
		}
	}
	st, err := stack.New(stack.Options{
		Plan:           o.plan,
		Shared:         sh,
		Policy:         holder,
		OnDecision:     onDecision,
		DenyMode:       o.denyMode,
		DNSUpstreams:   ups,
		DNSFilter:      guard,
		MaxConnections: o.maxConnections,
		Offload:        o.offload,
		Log:            log.With("component", "stack"),
	})
	if err != nil {
		return nil, err
	}
	return &gateway{st}, nil
}
