#!/usr/bin/env bash
# Builds the images the local cluster runs, without a registry or a container engine, from
# Debian packages, and imports them into the local node's containerd:
#
#   pause     the Pod sandbox: hack/pause/pause.c, static (about 0.7 MB)
#   operator  what hack/image.sh builds: the vmkeep binary on Debian's C runtime, uid 65532
#   launcher  the operator image plus qemu-system-x86_64 (with its TCG module, firmware and
#             libraries) and qemu-img: what launcher, importer and copier Pods run
#
#   hack/images.sh [--binary PATH] [--import SOCKET] [--no-import] [NAME...]
#   hack/images.sh --print-name NAME
#
#   NAME          pause, operator, launcher (default: all three)
#   --binary      the vmkeep binary to pack (default debug/vmkeep in cargo's target folder,
#                 built when missing: the binary the tests build, so a test run compiles
#                 nothing more; CARGO_TARGET_DIR and the like are honoured)
#   --import      the containerd socket to import into (default: the local cluster's)
#   --no-import   only build the OCI layouts
#   --print-name  print the image reference Pods use for NAME and exit
#
# The references: $VMKEEP_IMAGE_REPOSITORY (default vmkeep), -launcher and -pause beside it,
# tagged with vmkeep's version (`pause`: its own version). The chart's image.repository,
# launcher.image.repository and their tags are these names. Layouts are cached under
# $VMKEEP_CACHE/images (default ~/.cache/vmkeep/images) and rebuilt only when an input changes
# (the binary, this script, the Debian packages); an image containerd already has is not
# imported again. Needs root (apt-get, chroot, containerd).
set -euo pipefail

LOG_PREFIX=images
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

self=$(realpath "$0")
cd "$(dirname "$self")/.."
CACHE=${VMKEEP_CACHE:-$HOME/.cache/vmkeep}
WORK=$CACHE/images
# One build at a time: two runs (two hack/run.sh, or run.sh beside the tests) would fill the same
# staging folders at once.
mkdir -p "$WORK"
exec 9>"$WORK/.lock"
flock 9
REPOSITORY=${VMKEEP_IMAGE_REPOSITORY:-vmkeep}
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
PAUSE_VERSION=1.0
SOCK_DEFAULT=${VMKEEP_CLUSTER_DIR:-$CACHE/cluster}/node/containerd/containerd.sock

# The reference a Pod names; containerd stores it under Docker's normalised name.
name_of() {
  case $1 in
    pause) echo "$REPOSITORY-pause:$PAUSE_VERSION" ;;
    operator) echo "$REPOSITORY:$VERSION" ;;
    launcher) echo "$REPOSITORY-launcher:$VERSION" ;;
    *) die "unknown image $1 (pause, operator, launcher)" ;;
  esac
}
normalised() { [[ $1 == */* ]] && echo "$1" || echo "docker.io/library/$1"; }

binary=
sock=$SOCK_DEFAULT
import=1
names=()
while (($#)); do
  case $1 in
    --binary) binary=$(realpath "${2:?--binary needs a path}"); shift 2 ;;
    --import) sock=${2:?--import needs a socket}; shift 2 ;;
    --no-import) import=; shift ;;
    --print-name) name_of "${2:?--print-name needs an image}"; exit 0 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$self" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) name_of "$1" >/dev/null; names+=("$1"); shift ;;
  esac
done
((${#names[@]})) || names=(pause operator launcher)
[[ $(id -u) == 0 ]] || die "run as root (apt-get, chroot and containerd need it)"

apt_install umoci jq tar gcc libc6-dev

epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)

# manifest_digest LAYOUT TAG: the digest of TAG's manifest in the OCI layout (empty if none).
manifest_digest() {
  jq -r --arg t "$2" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' "$1/index.json" 2>/dev/null | head -1
}

# up_to_date LAYOUT TAG INPUTS: the layout holds TAG built from INPUTS.
up_to_date() {
  local manifest
  manifest=$(manifest_digest "$1" "$2")
  [[ -n $manifest ]] || return 1
  [[ $(jq -r '.annotations["vmkeep.io/image-inputs"] // ""' "$1/blobs/${manifest%%:*}/${manifest#*:}") == "$3" ]]
}

# layer_of DIR: a reproducible tar of DIR (sorted names, fixed times, numeric owners).
layer_of() {
  (cd "$1" && LC_ALL=C find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
    tar --create --file "$2" --format=gnu --numeric-owner --mtime="@$epoch" --no-recursion --files-from -)
}

inputs_of() { { echo "$created"; sha256sum "$self" | cut -d' ' -f1; printf '%s\n' "$@"; } | sha256sum | cut -d' ' -f1; }

build_pause() {
  local layout=$WORK/pause tag=$PAUSE_VERSION inputs
  inputs=$(inputs_of "$(sha256sum hack/pause/pause.c | cut -d' ' -f1)" "$(gcc --version | head -1)")
  up_to_date "$layout" "$tag" "$inputs" && return 0
  log "building pause"
  local stage=$WORK/pause.stage
  rm -rf "$stage" "$layout.new" && mkdir -p "$stage"
  gcc -Os -static -Wall -o "$stage/pause" hack/pause/pause.c
  strip "$stage/pause"
  "$stage/pause" -v >/dev/null || die "the pause binary does not run"
  layer_of "$stage" "$WORK/pause.tar"
  umoci init --layout "$layout.new"
  umoci new --image "$layout.new:$tag"
  umoci raw add-layer --image "$layout.new:$tag" --history.created "$created" --history.created_by "hack/images.sh pause" "$WORK/pause.tar"
  umoci config --image "$layout.new:$tag" --no-history --created "$created" --os linux --architecture "$(dpkg --print-architecture)" \
    --config.user 65535:65535 --config.entrypoint /pause \
    --manifest.annotation "vmkeep.io/image-inputs=$inputs"
  umoci gc --layout "$layout.new"
  rm -rf "$layout" "$stage" "$WORK/pause.tar" && mv "$layout.new" "$layout"
}

build_operator() {
  local out
  out=$(bash hack/image.sh --binary "$binary" --tag "$VERSION" | tail -1)
  [[ $out == "$CACHE/image/oci:$VERSION" ]] || die "hack/image.sh printed $out"
}

# The QEMU pieces of the launcher: the emulator, its TCG module, qemu-img, their libraries (what
# ldd lists, from this machine's Debian packages), the firmware (SeaBIOS and QEMU's own ROMs).
QEMU_PACKAGES=(qemu-system-x86 qemu-system-data qemu-utils seabios)
build_launcher() {
  apt_install "${QEMU_PACKAGES[@]}"
  local layout=$WORK/launcher tag=$VERSION base=$CACHE/image/oci inputs
  local base_manifest
  base_manifest=$(manifest_digest "$base" "$VERSION")
  inputs=$(inputs_of "$base_manifest" "$(dpkg-query -W "${QEMU_PACKAGES[@]}")")
  up_to_date "$layout" "$tag" "$inputs" && return 0
  log "building launcher (the operator image plus QEMU)"
  local stage=$WORK/launcher.stage
  rm -rf "$stage" "$layout.new" && mkdir -p "$stage"
  local moddir=/usr/lib/x86_64-linux-gnu/qemu
  local -a files=(/usr/bin/qemu-system-x86_64 /usr/bin/qemu-img "$moddir/accel-tcg-x86_64.so")
  # copy_in PATH: PATH (followed if a symlink) at the same place in the stage.
  copy_in() { mkdir -p "$stage$(dirname "$1")" && cp -L "$1" "$stage$1"; }
  local f lib
  for f in "${files[@]}"; do
    [[ -e $f ]] || die "$f is missing (Debian ${QEMU_PACKAGES[*]})"
    copy_in "$f"
    for lib in $(ldd "$f" | awk '/=> \// {print $3} /^\t\/.*ld-linux/ {print $1}'); do
      [[ -e $stage$lib ]] || copy_in "$lib"
    done
  done
  mkdir -p "$stage/usr/share"
  cp -a /usr/share/qemu /usr/share/seabios "$stage/usr/share/"
  find "$stage" -type d -exec chmod 0755 {} +
  chown -R 0:0 "$stage"
  layer_of "$stage" "$WORK/launcher.tar"
  cp -a "$base" "$layout.new"
  umoci raw add-layer --image "$layout.new:$VERSION" --tag "launcher-$tag" --history.created "$created" \
    --history.created_by "hack/images.sh launcher: QEMU from Debian ($(dpkg-query -W -f='${Package}=${Version} ' "${QEMU_PACKAGES[@]}"))" "$WORK/launcher.tar"
  umoci rm --image "$layout.new:$VERSION"
  umoci tag --image "$layout.new:launcher-$tag" "$tag"
  umoci rm --image "$layout.new:launcher-$tag"
  umoci config --image "$layout.new:$tag" --no-history --created "$created" \
    --config.label org.opencontainers.image.title=vmkeep-launcher \
    --config.label "org.opencontainers.image.description=vmkeep launcher: vmkeep launch with QEMU (TCG or KVM), qemu-img" \
    --manifest.annotation "vmkeep.io/image-inputs=$inputs"
  umoci gc --layout "$layout.new"
  # The check: each program runs in the image's own root (unpacked by umoci, never written
  # into: its absolute symlinks point at this machine's files) with only the image's libraries.
  local root=$WORK/launcher.check
  rm -rf "$root" && mkdir -p "$root" && umoci unpack --image "$layout.new:$tag" "$root/b" >/dev/null
  chroot "$root/b/rootfs" /usr/bin/qemu-img --version >/dev/null || die "qemu-img does not run in the launcher image"
  chroot "$root/b/rootfs" /usr/bin/qemu-system-x86_64 -accel help | grep -qx tcg ||
    die "qemu-system-x86_64 in the launcher image has no TCG accelerator"
  echo '{"execute": "qmp_capabilities"} {"execute": "quit"}' |
    timeout 60 chroot "$root/b/rootfs" /usr/bin/qemu-system-x86_64 -machine q35 -accel tcg -nodefaults -display none \
      -no-user-config -S -qmp stdio >/dev/null 2>&1 || die "qemu-system-x86_64 cannot start a q35 machine in the launcher image"
  chroot "$root/b/rootfs" /vmkeep --version >/dev/null || die "vmkeep does not run in the launcher image"
  rm -rf "$root"
  rm -rf "$layout" "$stage" "$WORK/launcher.tar" && mv "$layout.new" "$layout"
}

# import NAME LAYOUT TAG: into containerd's k8s.io namespace as NAME, unless it is there already.
import_image() {
  local ref layout=$2 tag=$3 digest have
  ref=$(normalised "$1")
  digest=$(manifest_digest "$layout" "$tag")
  have=$(ctr -a "$sock" -n k8s.io images ls "name==$ref" 2>/dev/null | awk 'NR > 1 {print $3}')
  if [[ $have == "$digest" ]]; then return 0; fi
  log "importing $ref ($digest)"
  local tarball=$WORK/import.tar
  (cd "$layout" && tar --create --file "$tarball" oci-layout index.json blobs)
  ctr -a "$sock" -n k8s.io images import --no-unpack --base-name "${ref%:*}" "$tarball" >/dev/null
  rm -f "$tarball"
  # The import names it after the layout's tag; Pods name it by vmkeep's reference.
  if [[ ${ref%:*}:$tag != "$ref" ]]; then
    ctr -a "$sock" -n k8s.io images tag --force "${ref%:*}:$tag" "$ref" >/dev/null
    ctr -a "$sock" -n k8s.io images rm "${ref%:*}:$tag" >/dev/null
  fi
  [[ $(ctr -a "$sock" -n k8s.io images ls "name==$ref" | awk 'NR > 1 {print $3}') == "$digest" ]] || die "containerd does not list $ref"
}

mkdir -p "$WORK"
need_binary=
for n in "${names[@]}"; do [[ $n == pause ]] || need_binary=1; done
if [[ -n $need_binary && -z $binary ]]; then
  command -v cargo >/dev/null || die "cargo is not installed (or pass --binary)"
  cargo build --locked --quiet --bin vmkeep
  binary=$(cargo_bin debug vmkeep)
  [[ -x $binary ]] || die "no $binary after cargo build (cargo metadata names $(cargo_target_dir) as its target folder)"
fi
for n in "${names[@]}"; do
  case $n in
    pause) build_pause ;;
    operator) build_operator ;;
    launcher) [[ " ${names[*]} " == *" operator "* ]] || build_operator; build_launcher ;;
  esac
done
if [[ -n $import ]]; then
  [[ -S $sock ]] || die "no containerd at $sock (start the local cluster: hack/cluster.sh up)"
  for n in "${names[@]}"; do
    case $n in
      pause) import_image "$(name_of pause)" "$WORK/pause" "$PAUSE_VERSION" ;;
      operator) import_image "$(name_of operator)" "$CACHE/image/oci" "$VERSION" ;;
      launcher) import_image "$(name_of launcher)" "$WORK/launcher" "$VERSION" ;;
    esac
  done
fi
for n in "${names[@]}"; do echo "$(name_of "$n")"; done
