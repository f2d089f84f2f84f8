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

	mu         sync.RWMutex // mu protects dispatcher and mtu
	dispatcher stack.NetworkDispatcher
	mtu        uint32
}

var _ stack.LinkEndpoint = (*linkEndpoint)(nil)

func newLinkEndpoint(sh *rings.Shared, mac tcpip.LinkAddress, mtu uint32) *linkEndpoint {
	return &linkEndpoint{sh: sh, mac: mac, mtu: mtu}
}

// deliver hands one Ethernet frame to the stack. The frame's bytes are copied
// into the stack's own buffer, so the caller keeps ownership of frame.
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

func (e *linkEndpoint) Capabilities() stack.LinkEndpointCapabilities {
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
		off := 0
		for _, s := range pkt.AsSlices() {
			off += copy(f.B[off:], s)
		}
		if e.sh.Rx.Push(f) {
			n++
		} else {
			e.sh.Counters.Drop(rings.DropRxFull)
			e.sh.Frames.Put(f)
		}
	}
	if n > 0 {
		e.sh.RxWake.Wake()
	}
	return pkts.Len(), nil
}
