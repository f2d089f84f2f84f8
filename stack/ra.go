package stack

import (
	"encoding/binary"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
)

// sendRouterAdvertisement announces the gateway as the default IPv6 router,
// the sandbox's /64 as on-link and autonomous (SLAAC), the MTU, and the
// gateway as DNS server (RDNSS, RFC 8106). It goes to all nodes from the
// gateway's link-local address, as RFC 4861 requires.
func (st *Stack) sendRouterAdvertisement() {
	p := st.o.Plan
	pfx := p.GuestIPv6.Masked()
	m := make([]byte, 16+8+32+8+24)
	m[0] = 134                               // router advertisement
	m[4] = 64                                // cur hop limit
	binary.BigEndian.PutUint16(m[6:8], 1800) // router lifetime, s
	o := m[16:]
	o[0], o[1] = 1, 1 // source link-layer address
	copy(o[2:8], p.GatewayMAC)
	o = o[8:]
	o[0], o[1], o[2], o[3] = 3, 4, byte(pfx.Bits()), 0xc0 // prefix information: on-link, autonomous
	binary.BigEndian.PutUint32(o[4:8], 86400)
	binary.BigEndian.PutUint32(o[8:12], 14400)
	a := pfx.Addr().As16()
	copy(o[16:32], a[:])
	o = o[32:]
	o[0], o[1] = 5, 1 // MTU
	binary.BigEndian.PutUint32(o[4:8], uint32(p.MTU))
	o = o[8:]
	o[0], o[1] = 25, 3 // recursive DNS server
	binary.BigEndian.PutUint32(o[4:8], 1800)
	g := p.GatewayV6.As16()
	copy(o[8:24], g[:])

	src := st.gatewayLinkLocal()
	dst := netip.MustParseAddr("ff02::1")
	f := st.r.frame(40+len(m), true)
	if f == nil {
		return
	}
	copy(f.B[0:6], []byte{0x33, 0x33, 0, 0, 0, 1})
	b := f.B[ethHdrLen:]
	putIPHeader(b, src, dst, protoICMPv6, len(m), 0)
	b[7] = 255 // NDP messages carry hop limit 255
	copy(b[40:], m)
	binary.BigEndian.PutUint16(b[42:44], ^checksum.Checksum(b[40:], pseudoSum(src, dst, protoICMPv6, len(m))))
	st.o.Shared.PushRx(f)
}
