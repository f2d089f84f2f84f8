#!/usr/bin/env bash
# Example VM launcher: one msbtap per sandbox.
#
#   scripts/launch-qemu.sh (as root, or with sudo) [SLOT] [-- MSBTAP-RUN-FLAGS...]
#
# Starts msbtap in VM mode for SLOT (default 0), waits until it is ready,
# boots QEMU on the TAP msbtap created, and stops msbtap when the VM exits.
# The guest gets its address from msbtap's DHCP server (or use the kernel
# parameter printed by `msbtap config --slot SLOT --format cmdline`).
#
# Environment: MSBTAP (binary, default bin/msbtap), KERNEL and INITRD (default
# build/vm/vmlinuz and build/vm/initramfs.gz from scripts/build-vm-image.sh),
# APPEND (extra kernel parameters), QEMU (default qemu-system-x86_64),
# QEMU_ACCEL (default: kvm if /dev/kvm is usable, else tcg), MEM (default 256).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
slot=0
if [ $# -gt 0 ] && [ "$1" != "--" ]; then slot=$1; shift; fi
[ "${1:-}" = "--" ] && shift

MSBTAP=${MSBTAP:-$here/../bin/msbtap}
KERNEL=${KERNEL:-$here/../build/vm/vmlinuz}
INITRD=${INITRD:-$here/../build/vm/initramfs.gz}
QEMU=${QEMU:-qemu-system-x86_64}
MEM=${MEM:-256}
if [ -z "${QEMU_ACCEL:-}" ]; then
  if [ -w /dev/kvm ]; then QEMU_ACCEL=kvm; else QEMU_ACCEL=tcg; fi
fi

tap=msbtap$slot
mac=$("$MSBTAP" config --slot "$slot" --format env | sed -n 's/^MSB_NET_MAC=//p')
mtu=$("$MSBTAP" config --slot "$slot" --format env | sed -n 's/^MSB_NET_MTU=//p')

work=$(mktemp -d)
agent=""
cleanup() {
  if [ -n "$agent" ] && kill -0 "$agent" 2>/dev/null; then
    kill -TERM "$agent"
    wait "$agent" || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

# 1. msbtap, with readiness on fd 3 and its pid in a file.
mkfifo "$work/ready"
"$MSBTAP" run --vm --tap "$tap" --slot "$slot" --ready-fd 3 --pid-file "$work/msbtap.pid" "$@" 3>"$work/ready" &
agent=$!
if ! read -r -t 30 line <"$work/ready" || [ "$line" != ready ]; then
  echo "launch-qemu: msbtap did not become ready" >&2
  exit 1
fi

# 2. The VM, on the TAP msbtap made; the guest's frames never touch the
#    host's IP stack.
"$QEMU" -machine q35,accel="$QEMU_ACCEL" -cpu max -m "$MEM" -smp 1 \
  -nographic -no-reboot -monitor none \
  -kernel "$KERNEL" -initrd "$INITRD" \
  -append "console=ttyS0 panic=-1 quiet ${APPEND:-}" \
  -netdev tap,id=net0,ifname="$tap",script=no,downscript=no \
  -device virtio-net-pci,netdev=net0,mac="$mac",host_mtu="$mtu" </dev/null &
vm=$!

# 3. Whichever ends first: the VM (stop msbtap, report the VM's status), or
#    msbtap (a fatal policy violation exits 3: stop the VM, report that).
status=0
wait -n "$agent" "$vm" || status=$?
if ! kill -0 "$vm" 2>/dev/null; then
  wait "$vm" || status=$?
  exit $status
fi
echo "launch-qemu: msbtap exited ($status); stopping the VM" >&2
kill -KILL "$vm" 2>/dev/null
wait "$vm" 2>/dev/null || true
agent=""
exit $status
