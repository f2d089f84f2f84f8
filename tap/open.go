package tap

import (
	"encoding/binary"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/msbtap/msbtap/rings"
)

// VNetHdrLen is the size of the virtio net header in front of every frame
// on a TAP opened with offloads.
const VNetHdrLen = 10

// Virtio net header flags and GSO types.
const (
	vnetFlagNeedsCsum = 1
	vnetFlagDataValid = 2
	vnetGSOECN        = 0x80
)

// openTAP creates (or attaches to) TAP name in the calling thread's network
// namespace. With offload, the device carries a virtio net header on every
// frame and takes TCP segmentation and checksum offload (TUNSETOFFLOAD), so
// the kernel on the other side hands over 64 KiB TCP segments and takes
// them back whatever the MTU. songgao/water cannot set IFF_VNET_HDR, hence
// this ioctl of our own.
func openTAP(name string, offload bool) (*os.File, string, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, "", fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, "", err
	}
	flags := uint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if offload {
		flags |= unix.IFF_VNET_HDR
	}
	ifr.SetUint16(flags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, "", err
	}
	if offload {
		sz := VNetHdrLen
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.TUNSETVNETHDRSZ, uintptr(unsafe.Pointer(&sz))); e != 0 {
			unix.Close(fd)
			return nil, "", fmt.Errorf("TUNSETVNETHDRSZ: %w", e)
		}
		off := unix.TUN_F_CSUM | unix.TUN_F_TSO4 | unix.TUN_F_TSO6
		if err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, off); err != nil {
			unix.Close(fd)
			return nil, "", fmt.Errorf("TUNSETOFFLOAD: %w", err)
		}
	}
	return os.NewFile(uintptr(fd), "tap:"+ifr.Name()), ifr.Name(), nil
}

// decodeVNetHdr reads a virtio net header into g.
func decodeVNetHdr(h []byte, g *rings.GSO) {
	flags := h[0]
	*g = rings.GSO{
		NeedsCsum:  flags&vnetFlagNeedsCsum != 0,
		DataValid:  flags&vnetFlagDataValid != 0,
		Type:       h[1] &^ vnetGSOECN,
		HdrLen:     binary.LittleEndian.Uint16(h[2:4]),
		Size:       binary.LittleEndian.Uint16(h[4:6]),
		CsumStart:  binary.LittleEndian.Uint16(h[6:8]),
		CsumOffset: binary.LittleEndian.Uint16(h[8:10]),
	}
}

// encodeVNetHdr writes g as a virtio net header.
func encodeVNetHdr(h []byte, g *rings.GSO) {
	var flags byte
	if g.NeedsCsum {
		flags |= vnetFlagNeedsCsum
	}
	if g.DataValid {
		flags |= vnetFlagDataValid
	}
	h[0], h[1] = flags, g.Type
	binary.LittleEndian.PutUint16(h[2:4], g.HdrLen)
	binary.LittleEndian.PutUint16(h[4:6], g.Size)
	binary.LittleEndian.PutUint16(h[6:8], g.CsumStart)
	binary.LittleEndian.PutUint16(h[8:10], g.CsumOffset)
}
