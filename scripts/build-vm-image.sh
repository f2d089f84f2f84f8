#!/usr/bin/env bash
# Assembles the test guest for the VM tests and the QEMU launcher: Debian's
# kernel (linux-image-amd64) and a busybox-static initramfs with the
# virtio_net modules and scripts/vm/init. Packages are downloaded and
# unpacked into OUT (default build/vm), not installed. Prints nothing but
# errors; leaves OUT/vmlinuz and OUT/initramfs.gz.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../build/vm}
mkdir -p "$out"
out=$(cd "$out" && pwd)
pkg=$out/pkg

if [ ! -f "$out/vmlinuz" ] || [ ! -x "$pkg/bin/busybox" ]; then
  kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  if [ -z "$kpkg" ]; then
    apt-get update -qq >/dev/null
    kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  fi
  [ -n "$kpkg" ] || { echo "build-vm-image: cannot find the kernel package behind linux-image-amd64" >&2; exit 1; }
  dl=$(mktemp -d)
  trap 'rm -rf "$dl"' EXIT
  (cd "$dl" && apt-get download -qq -o APT::Sandbox::User=root "$kpkg" busybox-static >/dev/null)
  rm -rf "$pkg"
  mkdir -p "$pkg"
  for d in "$dl"/*.deb; do dpkg-deb -x "$d" "$pkg"; done
  cp "$pkg"/boot/vmlinuz-* "$out/vmlinuz"
fi

root=$(mktemp -d)
trap 'rm -rf "$root" ${dl:+"$dl"}' EXIT
mkdir -p "$root"/{bin,proc,sys,dev,tmp,etc,lib/modules}
cp "$pkg/bin/busybox" "$root/bin/busybox"
kmods=$(echo "$pkg"/lib/modules/*/kernel)
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net; do
  f=$(find "$kmods" -name "$m.ko*" | head -n 1)
  [ -n "$f" ] || { echo "build-vm-image: module $m not found in $kmods" >&2; exit 1; }
  case "$f" in
    *.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
    *.zst) zstd -qdc "$f" >"$root/lib/modules/$m.ko" ;;
    *) cp "$f" "$root/lib/modules/$m.ko" ;;
  esac
done
install -m 0755 "$here/vm/init" "$root/init"
install -m 0755 "$here/vm/udhcpc.sh" "$root/udhcpc.sh"
(cd "$root" && find . | "$pkg/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1 >"$out/initramfs.gz.tmp")
mv "$out/initramfs.gz.tmp" "$out/initramfs.gz"
