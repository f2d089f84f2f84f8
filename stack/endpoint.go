package stack

import (
	"sync"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/msbtap/msbtap/rings"
)

// linkEndpoint is the netstack's Ethernet link to the guest. Inbound frames
// are handed to it by the poll loop (deliver); outbound packets are copied
// into pooled frames and pushed onto the rx ring for the TAP writer.
type linkEndpoint struct {
	sh  *rings.Shared
	mac tcpip.LinkAddress
	gso bool // the TAP takes GSO frames: hand the kernel 64 KiB TCP segments

	mu         sync.RWMutex // mu protects dispatcher and mtu
	dispatcher stack.NetworkDispatcher
	mtu        uint32
}

var _ stack.LinkEndpoint = (*linkEndpoint)(nil)

func newLinkEndpoint(sh *rings.Shared, mac tcpip.LinkAddress, mtu uint32, gso bool) *linkEndpoint {
	return &linkEndpoint{sh: sh, mac: mac, mtu: mtu, gso: gso}
}

var _ stack.GSOEndpoint = (*linkEndpoint)(nil)

// gsoMaxSize keeps a GSO packet within one IP datagram and one frame.
const gsoMaxSize = 65535 - 60 - 60

// GSOMaxSize implements stack.GSOEndpoint.
func (e *linkEndpoint) GSOMaxSize() uint32 {
	if e.gso {
		return gsoMaxSize
	}
	return 0
}

// SupportedGSO implements stack.GSOEndpoint.
func (e *linkEndpoint) SupportedGSO() stack.SupportedGSO {
	if e.gso {
		return stack.HostGSOSupported
	}
	return stack.GSONotSupported
}

// gsoOf translates the netstack's offload request into the frame's virtio
// net header fields, as gVisor's fdbased endpoint does.
func gsoOf(pkt *stack.PacketBuffer) rings.GSO {
	o := pkt.GSOOptions
	if o.Type == stack.GSONone {
		return rings.GSO{}
	}
	var g rings.GSO
	g.HdrLen = uint16(pkt.HeaderSize())
	if o.NeedsCsum {
		g.NeedsCsum = true
		g.CsumStart = header.EthernetMinimumSize + o.L3HdrLen
		g.CsumOffset = o.CsumOffset
	}
	if uint16(pkt.Data().Size()) > o.MSS {
		switch o.Type {
		case stack.GSOTCPv4:
			g.Type = rings.GSOTCPv4
		case stack.GSOTCPv6:
			g.Type = rings.GSOTCPv6
		}
		g.Size = o.MSS
	}
	return g
}

// deliver hands one Ethernet frame to the stack. The frame's bytes are copied
// into the stack's own buffer, so the caller keeps ownership of frame.
// Checksums were verified by the caller or by the netstack, see
// Capabilities.
func (e *linkEndpoint) deliver(frame []byte) {
	e.mu.RLock()
	d := e.dispatcher
	e.mu.RUnlock()
	if d == nil {
		return
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(frame)})
	defer pkt.DecRef()
	hdr, ok := pkt.LinkHeader().Consume(header.EthernetMinimumSize)
	if !ok {
		e.sh.Counters.Drop(rings.DropMalformed)
		return
	}
	eth := header.Ethernet(hdr)
	pkt.NetworkProtocolNumber = eth.Type()
	d.DeliverNetworkPacket(eth.Type(), pkt)
}

func (e *linkEndpoint) MTU() uint32 {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.mtu
}

func (e *linkEndpoint) SetMTU(mtu uint32) {
	e.mu.Lock()
	e.mtu = mtu
	e.mu.Unlock()
}

func (e *linkEndpoint) MaxHeaderLength() uint16 { return header.EthernetMinimumSize }

func (e *linkEndpoint) LinkAddress() tcpip.LinkAddress { return e.mac }

func (e *linkEndpoint) SetLinkAddress(tcpip.LinkAddress) {}

// Capabilities implements stack.LinkEndpoint. With offload, the netstack
// trusts inbound transport checksums: the guest's kernel leaves them partial
// (virtio NEEDS_CSUM), and the poll loop verifies those of frames that carry
// complete ones before delivering them.
func (e *linkEndpoint) Capabilities() stack.LinkEndpointCapabilities {
	if e.gso {
		return stack.CapabilityResolutionRequired | stack.CapabilityRXChecksumOffload
	}
	return stack.CapabilityResolutionRequired
}

func (e *linkEndpoint) Attach(d stack.NetworkDispatcher) {
	e.mu.Lock()
	e.dispatcher = d
	e.mu.Unlock()
}

func (e *linkEndpoint) IsAttached() bool {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.dispatcher != nil
}

func (e *linkEndpoint) Wait() {}

func (e *linkEndpoint) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareEther }

func (e *linkEndpoint) AddHeader(pkt *stack.PacketBuffer) {
	eth := header.Ethernet(pkt.LinkHeader().Push(header.EthernetMinimumSize))
	eth.Encode(&header.EthernetFields{
		SrcAddr: pkt.EgressRoute.LocalLinkAddress,
		DstAddr: pkt.EgressRoute.RemoteLinkAddress,
		Type:    pkt.NetworkProtocolNumber,
	})
}

func (e *linkEndpoint) ParseHeader(pkt *stack.PacketBuffer) bool {
	_, ok := pkt.LinkHeader().Consume(header.EthernetMinimumSize)
	return ok
}

func (e *linkEndpoint) Close() {}

func (e *linkEndpoint) SetOnCloseAction(func()) {}

// WritePackets copies each packet into a pooled frame and queues it for the
// guest. A packet larger than a frame buffer, or a full ring, drops it and
// counts the drop; the stack's TCP retransmits as it would on a lossy link.
func (e *linkEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	n := 0
	for _, pkt := range pkts.AsSlice() {
		size := pkt.Size()
		if size > e.sh.Frames.Size() {
			e.sh.Counters.Drop(rings.DropOversized)
			continue
		}
		f := e.sh.Frames.GetLen(size)
		if e.gso {
			f.GSO = gsoOf(pkt)
		}
		off := 0
		for _, s := range pkt.AsSlices() {
			off += copy(f.B[off:], s)
		}
		if e.sh.PushRxNoWake(f) {
			n++
		}
	}
	if n > 0 {
		e.sh.RxWake.Wake()
	}
	return pkts.Len(), nil
}
