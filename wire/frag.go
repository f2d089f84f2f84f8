package wire

import (
	"errors"
	"net/netip"
	"sort"
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// Reassembly bounds (defaults).
const (
	DefaultMaxDatagrams = 64
	DefaultMaxFragBytes = 1 << 20
	DefaultFragTimeout  = 5 * time.Second
	maxFragmentable     = 65535 // an IPv4 datagram, or an IPv6 payload
)

// Why a fragment, and the datagram it belongs to, was dropped.
var (
	ErrFragOverlap   = errors.New("fragments overlap")
	ErrFragTiny      = errors.New("first fragment too small for the transport header, or a fragment inside it")
	ErrFragMalformed = errors.New("fragment length not a multiple of 8, or datagram too long")
	ErrFragLimit     = errors.New("too many fragments buffered")
)

// Reassembler puts the guest's IP fragments back together, within bounds:
// at most MaxDatagrams in progress and MaxBytes buffered (the oldest
// datagram goes first), each for at most Timeout. A fragment that overlaps
// another, and a first fragment too small to hold the transport header (or
// a later one that starts inside it), drop the whole datagram: the ports
// and flags the policy decides on come from one fragment, whole, or the
// datagram is not relayed at all.
type Reassembler struct {
	MaxDatagrams, MaxBytes int
	Timeout                time.Duration
	now                    func() time.Time

	mu      sync.Mutex // mu protects pending and bytes
	pending map[fragKey]*fragDatagram
	bytes   int
}

type fragKey struct {
	v6       bool
	src, dst netip.Addr
	id       uint32
	next     uint8
}

type fragPiece struct {
	off  int
	data []byte
}

type fragDatagram struct {
	started time.Time
	total   int // the fragmentable part's length, once the last fragment came; -1 before
	pieces  []fragPiece
	size    int
}

// NewReassembler returns a reassembler with the default bounds.
func NewReassembler() *Reassembler {
	return &Reassembler{MaxDatagrams: DefaultMaxDatagrams, MaxBytes: DefaultMaxFragBytes, Timeout: DefaultFragTimeout,
		now: time.Now, pending: make(map[fragKey]*fragDatagram)}
}

// minTransport is how much of the transport header the first fragment must
// carry.
func minTransport(proto uint8) int {
	switch proto {
	case ProtoTCP:
		return header.TCPMinimumSize
	case ProtoUDP:
		return header.UDPMinimumSize
	case ProtoICMP, ProtoICMPv6:
		return header.ICMPv4MinimumSize
	}
	return 8
}

// Add takes fragment p (Frag set). When it completes a datagram, Add
// returns the whole IP packet (a new buffer, no fragment fields) to be
// handled like any other; otherwise nil. A non-nil error says the fragment,
// and its datagram, were dropped, and why.
func (r *Reassembler) Add(p *Packet) ([]byte, error) {
	off, data := p.FragOffset, p.FragData
	if p.FragMore && len(data)%8 != 0 || off+len(data) > maxFragmentable || len(data) == 0 && p.FragMore {
		r.drop(p)
		return nil, ErrFragMalformed
	}
	if off == 0 && len(data) < minTransport(p.FragNext) || off > 0 && off < minTransport(p.FragNext) {
		r.drop(p)
		return nil, ErrFragTiny
	}
	k := fragKey{p.V6, p.Src, p.Dst, p.FragID, p.FragNext}
	now := r.now()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.expireLocked(now)
	d := r.pending[k]
	if d == nil {
		for len(r.pending) >= r.MaxDatagrams || r.bytes+len(data) > r.MaxBytes {
			if !r.evictOldestLocked() {
				return nil, ErrFragLimit
			}
		}
		d = &fragDatagram{started: now, total: -1}
		r.pending[k] = d
	} else if r.bytes+len(data) > r.MaxBytes {
		r.removeLocked(k, d)
		return nil, ErrFragLimit
	}
	for _, pc := range d.pieces {
		if off < pc.off+len(pc.data) && pc.off < off+len(data) {
			r.removeLocked(k, d)
			return nil, ErrFragOverlap
		}
	}
	if !p.FragMore {
		if d.total >= 0 || off+len(data) < d.maxEnd() {
			r.removeLocked(k, d)
			return nil, ErrFragOverlap
		}
		d.total = off + len(data)
	} else if d.total >= 0 && off+len(data) > d.total {
		r.removeLocked(k, d)
		return nil, ErrFragOverlap
	}
	d.pieces = append(d.pieces, fragPiece{off, append([]byte(nil), data...)})
	d.size += len(data)
	r.bytes += len(data)
	if d.total < 0 || d.size != d.total {
		return nil, nil
	}
	r.removeLocked(k, d)
	return d.join(p, k), nil
}

func (d *fragDatagram) maxEnd() int {
	end := 0
	for _, pc := range d.pieces {
		end = max(end, pc.off+len(pc.data))
	}
	return end
}

// join builds the whole packet: a fresh IP header and the pieces in order
// (they cover [0, total) exactly: no overlaps, and their sizes add up).
func (d *fragDatagram) join(p *Packet, k fragKey) []byte {
	sort.Slice(d.pieces, func(i, j int) bool { return d.pieces[i].off < d.pieces[j].off })
	hl := IPHeaderLen(k.v6)
	b := make([]byte, hl+d.total)
	if k.v6 {
		header.IPv6(b).Encode(&header.IPv6Fields{PayloadLength: uint16(d.total), TransportProtocol: tcpip.TransportProtocolNumber(k.next),
			HopLimit: DefaultHopLimit, SrcAddr: TCPIPAddr(k.src), DstAddr: TCPIPAddr(k.dst)})
	} else {
		h := header.IPv4(b)
		h.Encode(&header.IPv4Fields{TotalLength: uint16(hl + d.total), ID: uint16(k.id), TTL: DefaultHopLimit, Protocol: k.next,
			SrcAddr: TCPIPAddr(k.src), DstAddr: TCPIPAddr(k.dst)})
		h.SetChecksum(^h.CalculateChecksum())
	}
	for _, pc := range d.pieces {
		copy(b[hl+pc.off:], pc.data)
	}
	return b
}

// drop forgets the datagram a bad fragment belongs to.
func (r *Reassembler) drop(p *Packet) {
	k := fragKey{p.V6, p.Src, p.Dst, p.FragID, p.FragNext}
	r.mu.Lock()
	if d := r.pending[k]; d != nil {
		r.removeLocked(k, d)
	}
	r.mu.Unlock()
}

func (r *Reassembler) removeLocked(k fragKey, d *fragDatagram) {
	delete(r.pending, k)
	r.bytes -= d.size
}

func (r *Reassembler) expireLocked(now time.Time) {
	for k, d := range r.pending {
		if now.Sub(d.started) > r.Timeout {
			r.removeLocked(k, d)
		}
	}
}

func (r *Reassembler) evictOldestLocked() bool {
	var oldest fragKey
	var od *fragDatagram
	for k, d := range r.pending {
		if od == nil || d.started.Before(od.started) {
			oldest, od = k, d
		}
	}
	if od == nil {
		return false
	}
	r.removeLocked(oldest, od)
	return true
}

// Pending returns the datagrams in progress and the bytes they hold.
func (r *Reassembler) Pending() (datagrams, bytes int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.pending), r.bytes
}
