#!/usr/bin/env bash
# Builds the test guest: a raw disk image that the BIOS boots by itself (SYSLINUX on a FAT
# partition, no -kernel), from Debian packages only, cached. Its init, on the serial console:
#
#   vmkeep-guest: up as <name>                the VM's name from SMBIOS (system serial number,
#                                             QEMU `-smbios type=1,serial=<name>`)
#   vmkeep-guest: disk vdX markers: <a> <b>   for each virtio disk: the names written on it
#                                             before ("markers": text in its first 4 KiB, or
#                                             for the boot disk, which has partitions, in the
#                                             4 KiB at 512 KiB: the gap before its partition)
#   vmkeep-guest: disk vdX marked <name>      appended its own name there, flushed
#   vmkeep-guest: disk vdX read-only          (a CDROM or read-only disk: read, not written)
#   vmkeep-guest: ready                       then it waits for the ACPI power button
#   vmkeep-guest: power button, shutting down and powers off.
#
# The kernel command line option vmkeep.guest=poweroff makes it power itself off once ready,
# and vmkeep.guest=ignore-button makes it ignore the power button (tests of the launcher's
# restart and kill deadline).
#
#   hack/guest.sh            prints the path of the image (raw, 64 MiB, sparse); beside it,
#                            guest-poweroff.img and guest-ignore-button.img: the same guest
#                            booted with vmkeep.guest=poweroff or =ignore-button
#
# Inputs: Debian's linux-image-amd64 (the kernel and its virtio, button and evdev modules,
# not installed, only unpacked), busybox-static, syslinux and mtools. Cached under
# $VMKEEP_CACHE/guest (default ~/.cache/vmkeep/guest), rebuilt when an input changes.
set -euo pipefail
LOG_PREFIX=guest
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

self=$(realpath "$0")
CACHE=${VMKEEP_CACHE:-$HOME/.cache/vmkeep}
WORK=$CACHE/guest
OUT=$WORK/guest.img
SIZE_MIB=64
# The modules the guest loads, in order (Debian builds them as modules; no modules.dep is used).
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk button evdev)

# QEMU too: the tests boot the guest (tests/guest.rs, and the launcher on the node).
apt_install busybox-static syslinux syslinux-common mtools dosfstools fdisk cpio gzip qemu-system-x86 qemu-system-data seabios

# The kernel package linux-image-amd64 points at now.
kernel_pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -1)
[[ -n $kernel_pkg ]] || { apt-get update -qq; kernel_pkg=$(apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -1); }
[[ -n $kernel_pkg ]] || die "cannot find the kernel package of linux-image-amd64"
inputs=$({
  sha256sum "$self" | cut -d' ' -f1
  dpkg-query -W busybox-static syslinux-common
  apt-cache policy "$kernel_pkg" | sed -n 's/^ *Candidate: //p'
  echo "$kernel_pkg"
} | sha256sum | cut -d' ' -f1)
if [[ -f $OUT && $(cat "$WORK/inputs" 2>/dev/null) == "$inputs" ]]; then
  echo "$OUT"
  exit 0
fi

log "building the test guest ($kernel_pkg, busybox, SYSLINUX)"
rm -rf "$WORK/build" && mkdir -p "$WORK/build" "$WORK/debs"
deb=$(find "$WORK/debs" -name "${kernel_pkg}_*.deb" | head -1)
if [[ -z $deb ]]; then
  (cd "$WORK/debs" && apt-get download -qq -o APT::Sandbox::User=root "$kernel_pkg" >/dev/null) || die "apt-get download $kernel_pkg failed"
  deb=$(find "$WORK/debs" -name "${kernel_pkg}_*.deb" | head -1)
fi
kernel=$WORK/build/kernel
dpkg-deb -x "$deb" "$kernel"
vmlinuz=$(find "$kernel/boot" -name 'vmlinuz-*' | head -1)
[[ -n $vmlinuz ]] || die "no vmlinuz in $deb"

# --- initramfs: busybox, the modules, /init ------------------------------------------------
root=$WORK/build/initramfs
mkdir -p "$root"/{bin,dev,proc,sys,lib/modules,tmp}
cp /bin/busybox "$root/bin/busybox"
for m in "${MODULES[@]}"; do
  ko=$(find "$kernel/lib/modules" -name "$m.ko*" | head -1)
  [[ -n $ko ]] || die "module $m is not in $kernel_pkg"
  cp "$ko" "$root/lib/modules/"
done
printf '%s\n' "${MODULES[@]}" >"$root/lib/modules/order"
cat >"$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko* 2>/dev/null; done
say() { echo "vmkeep-guest: $*" >/dev/ttyS0; }
mode=$(sed -n 's/.*vmkeep\.guest=\([a-z-]*\).*/\1/p' /proc/cmdline)
name=$(cat /sys/class/dmi/id/product_serial 2>/dev/null)
[ -n "$name" ] || name=unnamed
say "up as $name"
sleep 1 # devtmpfs fills /dev/vd* as virtio_blk probes
for dev in /sys/block/vd*; do
  d=${dev##*/}
  at=0
  [ -e "$dev/${d}1" ] && at=128 # a partitioned disk (the boot disk): the gap before its partition
  markers=$(dd if=/dev/$d bs=4096 skip=$at count=1 2>/dev/null | tr -d '\000' | tr '\n' ' ')
  say "disk $d markers: ${markers:-none}"
  if [ "$(cat $dev/ro)" = 1 ]; then say "disk $d read-only"; continue; fi
  { dd if=/dev/$d bs=4096 skip=$at count=1 2>/dev/null | tr -d '\000'; echo "$name"; } >/tmp/m
  dd if=/tmp/m of=/dev/$d bs=4096 seek=$at count=1 conv=sync,fsync 2>/dev/null && sync && say "disk $d marked $name"
done
say ready
if [ "$mode" = poweroff ]; then say "powering off by itself"; poweroff -f; fi
# The ACPI power button is an evdev node named "Power Button": wait for one event on it.
button=
for e in /sys/class/input/event*; do
  grep -q "Power Button" $e/device/name 2>/dev/null && button=/dev/input/${e##*/}
done
while :; do
  if [ -n "$button" ]; then dd if=$button bs=24 count=1 >/dev/null 2>&1; else sleep 3600; fi
  if [ "$mode" = ignore-button ]; then say "power button ignored"; continue; fi
  say "power button, shutting down"; sync; poweroff -f
done
INIT
chmod 0755 "$root/init"
(cd "$root" && find . | LC_ALL=C sort | cpio --quiet -o -H newc --owner 0:0 | gzip -9) >"$WORK/build/initrd.gz"

# --- the disk: MBR + one bootable FAT partition from 1 MiB, SYSLINUX on it ------------------
img=$WORK/build/guest.img
rm -f "$img" && truncate -s "${SIZE_MIB}M" "$img"
echo 'start=2048, type=6, bootable' | sfdisk -q "$img"
offset=$((2048 * 512))
mkfs.vfat --offset 2048 -n VMKEEPGUEST "$img" $((SIZE_MIB * 1024 - 1024)) >/dev/null
cat >"$WORK/build/syslinux.cfg" <<'CFG'
DEFAULT guest
TIMEOUT 0
PROMPT 0
LABEL guest
  KERNEL vmlinuz
  INITRD initrd.gz
  APPEND console=ttyS0 quiet panic=-1
CFG
export MTOOLS_SKIP_CHECK=1
mcopy -i "$img@@$offset" "$vmlinuz" ::vmlinuz
mcopy -i "$img@@$offset" "$WORK/build/initrd.gz" ::initrd.gz
mcopy -i "$img@@$offset" "$WORK/build/syslinux.cfg" ::syslinux.cfg
syslinux --offset "$offset" --install "$img"
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$img" conv=notrunc bs=440 count=1 status=none
# The variants for the launcher's tests: the same disk with another kernel command line.
for mode in poweroff ignore-button; do
  variant=$WORK/build/guest-$mode.img
  cp --sparse=always "$img" "$variant"
  sed "s/^  APPEND .*/& vmkeep.guest=$mode/" "$WORK/build/syslinux.cfg" >"$WORK/build/syslinux-$mode.cfg"
  mcopy -o -i "$variant@@$offset" "$WORK/build/syslinux-$mode.cfg" ::syslinux.cfg
  mv "$variant" "$WORK/guest-$mode.img"
done
mv "$img" "$OUT"
echo "$inputs" >"$WORK/inputs"
rm -rf "$WORK/build"
log "built $OUT ($(du -h "$OUT" | cut -f1) used of ${SIZE_MIB} MiB)"
echo "$OUT"
