package agent

import (
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/plan"
	"github.com/msbtap/msbtap/policy"
)

// HostAddrs returns the addresses that mean "the host itself" to the
// policy: the gateway's and every address of msbtap's own namespace.
// The set also holds the broadcast addresses of the namespace's IPv4
// subnets, which the policy never lets a flow reach.
func HostAddrs(p plan.Plan) *policy.HostSet {
	hs := policy.NewHostSet(hostAddrList(p)...)
	hs.SetBroadcast(hostBroadcasts()...)
	return hs
}

// hostBroadcasts returns the broadcast addresses of the IPv4 subnets of
// msbtap's namespace: each address's own (IFA_BROADCAST) and its subnet's
// last address.
func hostBroadcasts() []netip.Addr {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return nil
	}
	var out []netip.Addr
	for _, a := range addrs {
		if b, ok := netip.AddrFromSlice(a.Broadcast); ok && !b.Unmap().IsUnspecified() {
			out = append(out, b.Unmap())
		}
		if a.IPNet == nil {
			continue
		}
		ones, bits := a.Mask.Size()
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok || bits != 32 && bits != 128 {
			continue
		}
		if b, ok := policy.SubnetBroadcast(netip.PrefixFrom(ip.Unmap(), ones-(bits-32))); ok {
			out = append(out, b)
		}
	}
	return out
}

func hostAddrList(p plan.Plan) []netip.Addr {
	addrs := []netip.Addr{p.GatewayV4, p.GatewayV6}
	if ifAddrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range ifAddrs {
			if ipn, ok := a.(*net.IPNet); ok {
				if ip, ok := netip.AddrFromSlice(ipn.IP); ok {
					addrs = append(addrs, ip.Unmap())
				}
			}
		}
	}
	return addrs
}

// watchHostAddrs keeps the host group current: whenever the kernel reports
// an address added to or removed from msbtap's namespace, the set is read
// again. stop ends the watch.
func watchHostAddrs(p plan.Plan, hs *policy.HostSet, log *slog.Logger) (stop func()) {
	updates := make(chan netlink.AddrUpdate, 64)
	done := make(chan struct{})
	err := netlink.AddrSubscribeWithOptions(updates, done, netlink.AddrSubscribeOptions{
		ErrorCallback: func(err error) {
			select {
			case <-done: // the socket closing under the watch: expected
			default:
				log.Warn("host address watch", "err", err)
			}
		},
	})
	if err != nil {
		log.Warn("cannot watch the host's addresses; the host group is read once", "err", err)
		return func() {}
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-done:
				return
			case _, ok := <-updates:
				if !ok {
					return
				}
				hs.Set(hostAddrList(p)...)
				hs.SetBroadcast(hostBroadcasts()...)
			}
		}
	}()
	var once sync.Once
	return func() { once.Do(func() { close(done); wg.Wait() }) }
}

// localRoutes answers whether the host's routing table resolves an address
// as local (route type local: an address of the host, or a local route
// such as AnyIP) or as a broadcast or multicast, caching each answer for a
// moment.
type localRoutes struct {
	mu    sync.Mutex // mu protects cache
	cache map[netip.Addr]localAnswer
}

type localAnswer struct {
	kind routeKind
	at   time.Time
}

type routeKind uint8

const (
	routeOther routeKind = iota
	routeLocal
	routeBroadcast // broadcast or multicast
)

const (
	localCacheTTL = 2 * time.Second
	localCacheMax = 4096
)

func newLocalRoutes() *localRoutes { return &localRoutes{cache: make(map[netip.Addr]localAnswer)} }

// IsLocal reports whether a routes to the host itself.
func (l *localRoutes) IsLocal(a netip.Addr) bool { return l.kind(a) == routeLocal }

// IsBroadcast reports whether the host's routing table resolves a as a
// broadcast (a subnet's broadcast address, also one the host gained after
// the policy's set was read) or multicast destination.
func (l *localRoutes) IsBroadcast(a netip.Addr) bool { return l.kind(a) == routeBroadcast }

func (l *localRoutes) kind(a netip.Addr) routeKind {
	a = a.Unmap()
	now := time.Now()
	l.mu.Lock()
	if c, ok := l.cache[a]; ok && now.Sub(c.at) < localCacheTTL {
		l.mu.Unlock()
		return c.kind
	}
	l.mu.Unlock()
	kind := routeOther
	if routes, err := netlink.RouteGet(a.AsSlice()); err == nil {
		for _, r := range routes {
			switch r.Type {
			case unix.RTN_LOCAL:
				kind = max(kind, routeLocal)
			case unix.RTN_BROADCAST, unix.RTN_MULTICAST:
				kind = routeBroadcast
			}
		}
	}
	l.mu.Lock()
	if len(l.cache) >= localCacheMax {
		clear(l.cache)
	}
	l.cache[a] = localAnswer{kind, now}
	l.mu.Unlock()
	return kind
}
