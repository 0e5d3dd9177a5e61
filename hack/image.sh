#!/usr/bin/env bash
# Builds the vmkeep container image without a Docker engine: an OCI image layout equivalent to
# the Dockerfile's (one layer: the binary, the C runtime it links from Debian's packages, CA
# certificates, a nonroot user 65532; USER 65532:65532; ENTRYPOINT ["/vmkeep"]), then checks it
# by running the image's entrypoint in its own root filesystem, read-only, as uid 65532.
#
#   hack/image.sh [--binary PATH] [--tag TAG]
#
#   --binary  the vmkeep binary to pack (default release/vmkeep in cargo's target folder, built
#             when missing; CARGO_TARGET_DIR and the like are honoured)
#   --tag     the image tag (default: the binary's version, `vmkeep --version`)
#
# Prints the image reference as an OCI layout `DIR:TAG` (DIR is $VMKEEP_CACHE/image/oci,
# default ~/.cache/vmkeep/image/oci). Copy it elsewhere with skopeo, e.g.
#   skopeo copy oci:$HOME/.cache/vmkeep/image/oci:0.1.0 docker-archive:vmkeep.tar:vmkeep:0.1.0
#
# Needs root (apt-get, chown, chroot, unshare). Installs umoci and binutils from Debian when
# missing; fetches libc6, libgcc-s1, ca-certificates and base-files with `apt-get download`.
# Idempotent and reproducible: the same binary and packages give the same image digest
# (timestamps come from SOURCE_DATE_EPOCH, default the last commit's time); a rerun with
# unchanged inputs only re-runs the check.
set -euo pipefail

LOG_PREFIX=image
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

self=$(realpath "$0")
binary=
tag=
while (($#)); do
  case $1 in
    --binary) binary=$(realpath "${2:?--binary needs a path}"); shift 2 ;;
    --tag) tag=${2:?--tag needs a value}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$self" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
cd "$(dirname "$self")/.."

CACHE=${VMKEEP_CACHE:-$HOME/.cache/vmkeep}
WORK=$CACHE/image
LAYOUT=$WORK/oci
DEBS=$WORK/debs
NONROOT=65532
# The runtime packages: the C library and loader, libgcc_s (Rust's unwinder), the CA bundle, and
# /etc/os-release (so image scanners know the distribution).
PACKAGES=(libc6 libgcc-s1 ca-certificates base-files)

[[ $(id -u) == 0 ]] || die "run as root (apt-get, chown, chroot and unshare need it)"

apt_install umoci binutils jq tar gzip util-linux coreutils

# --- inputs ---------------------------------------------------------------------------------
if [[ -z $binary ]]; then
  binary=$(cargo_bin release vmkeep)
  if [[ ! -e $binary ]]; then
    command -v cargo >/dev/null || die "$binary is missing and cargo is not installed (or pass --binary)"
    log "building $binary"
    cargo build --release --locked --bin vmkeep
  fi
fi
[[ -f $binary ]] || die "no binary at $binary"

host_arch=$(dpkg --print-architecture)
case $(readelf -h "$binary" | sed -n 's/^ *Machine: *//p') in
  *X86-64*) bin_arch=amd64 ;;
  *AArch64*) bin_arch=arm64 ;;
  *) bin_arch=unknown ;;
esac
[[ $bin_arch == "$host_arch" ]] || die "$binary is for $bin_arch, this machine is $host_arch (the check runs it here)"

if [[ -z $tag ]]; then
  tag=$("$binary" --version | awk 'NR == 1 {print $2}')
  [[ -n $tag ]] || die "cannot read the version of $binary; pass --tag"
fi
[[ $tag =~ ^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$ ]] || die "invalid image tag '$tag'"

epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)

# Fills deb_files; one folder per package version under $DEBS, so a rerun downloads nothing.
fetch_debs() {
  local p
  for p in "${PACKAGES[@]}"; do
    local version dir file
    version=$(apt-cache policy "$p" | sed -n 's/^ *Candidate: *//p')
    if [[ -z $version || $version == "(none)" ]]; then
      apt-get update -qq
      version=$(apt-cache policy "$p" | sed -n 's/^ *Candidate: *//p')
    fi
    [[ -n $version && $version != "(none)" ]] || die "Debian package $p is not available (apt-cache policy $p)"
    dir=$DEBS/$p/$version
    file=
    [[ -d $dir ]] && file=$(find "$dir" -maxdepth 1 -name '*.deb' | head -1)
    if [[ -z $file ]]; then
      log "fetching $p $version"
      rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
      (cd "$dir.tmp" && apt-get download -qq -o APT::Sandbox::User=root "$p=$version" >/dev/null) ||
        (apt-get update -qq && cd "$dir.tmp" && apt-get download -qq -o APT::Sandbox::User=root "$p=$version" >/dev/null) ||
        die "apt-get download $p=$version failed"
      rm -rf "$dir" && mv "$dir.tmp" "$dir"
      file=$(find "$dir" -maxdepth 1 -name '*.deb' | head -1)
    fi
    [[ -n $file ]] || die "no .deb for $p $version in $dir"
    deb_files+=("$file")
  done
}
deb_files=()
fetch_debs

# Everything the image depends on; the same inputs give the same image (skip the build).
inputs=$(
  {
    echo "tag=$tag created=$created"
    sha256sum "$binary" | awk '{print $1}'
    sha256sum "$self" | awk '{print $1}'
    for f in "${deb_files[@]}"; do basename "$f"; done
  } | sha256sum | awk '{print $1}'
)

# --- build ----------------------------------------------------------------------------------
build_image() {
  local stage=$WORK/stage extract=$WORK/extract
  rm -rf "$stage" "$extract"
  mkdir -p "$stage" "$extract"
  local f
  for f in "${deb_files[@]}"; do
    local name
    name=$(dpkg-deb -f "$f" Package)
    mkdir -p "$extract/$name"
    dpkg-deb -x "$f" "$extract/$name"
  done

  # The binary and exactly the shared libraries it needs (NEEDED entries, followed
  # recursively), taken from the extracted Debian packages, plus the program interpreter.
  install -D -m 0755 "$binary" "$stage/vmkeep"
  local interp
  interp=$(readelf -l "$binary" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
  local -a queue=("$stage/vmkeep") done_libs=()
  # copy_from_debs PATH: copies PATH (as the image sees it) from the extracted packages, and
  # what it points at if it is a symlink; prints the final, non-symlink path.
  copy_from_debs() {
    local path=$1 src= d
    for d in "$extract"/*; do [[ -e $d$path || -L $d$path ]] && { src=$d$path; break; }; done
    [[ -n $src ]] || return 1
    mkdir -p "$stage$(dirname "$path")"
    cp -a "$src" "$stage$path"
    if [[ -L $src ]]; then
      local target
      target=$(readlink "$src")
      [[ $target == /* ]] || target=$(dirname "$path")/$target
      # -s: normalise the path without following the host's own symlinks (/lib -> usr/lib).
      copy_from_debs "$(realpath -m -s "$target")"
    else
      printf '%s\n' "$path"
    fi
  }
  if [[ -n $interp ]]; then
    copy_from_debs "$interp" >/dev/null || die "the program interpreter $interp is not in ${PACKAGES[*]}"
  fi
  while ((${#queue[@]})); do
    local elf=${queue[0]}
    queue=("${queue[@]:1}")
    local lib
    for lib in $(readelf -d "$elf" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
      [[ " ${done_libs[*]} " == *" $lib "* ]] && continue
      done_libs+=("$lib")
      local found= dir
      for dir in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib/aarch64-linux-gnu /usr/lib/aarch64-linux-gnu /lib /usr/lib; do
        if found=$(copy_from_debs "$dir/$lib"); then break; fi
      done
      [[ -n $found ]] || die "$(basename "$elf") needs $lib, which is not in ${PACKAGES[*]}: add its package to PACKAGES"
      queue+=("$stage$found")
    done
  done
  log "libraries: ${done_libs[*]:-none (static binary)}"

  # Users, name resolution, CA bundle, os-release, scanner metadata, /tmp, the nonroot home.
  mkdir -p "$stage/etc/ssl/certs" "$stage/tmp" "$stage/home/nonroot" "$stage/var/lib/dpkg/status.d" "$stage/usr/lib"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:%s:%s:nonroot:/home/nonroot:/sbin/nologin\n' $NONROOT $NONROOT >"$stage/etc/passwd"
  printf 'root:x:0:\nnonroot:x:%s:\n' $NONROOT >"$stage/etc/group"
  printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$stage/etc/nsswitch.conf"
  find "$extract/ca-certificates/usr/share/ca-certificates/mozilla" -name '*.crt' -print0 | LC_ALL=C sort -z |
    xargs -0 cat >"$stage/etc/ssl/certs/ca-certificates.crt"
  cp "$extract/base-files/usr/lib/os-release" "$stage/usr/lib/os-release"
  ln -sf ../usr/lib/os-release "$stage/etc/os-release"
  for f in "${deb_files[@]}"; do
    local name
    name=$(dpkg-deb -f "$f" Package)
    [[ $name == base-files ]] && continue
    dpkg-deb -f "$f" >"$stage/var/lib/dpkg/status.d/$name"
  done
  # Modes and owners do not depend on the umask; only the nonroot home belongs to 65532.
  find "$stage" -type d -exec chmod 0755 {} +
  find "$stage/etc" "$stage/var" "$stage/usr/lib/os-release" -type f -exec chmod 0644 {} +
  chown -R 0:0 "$stage"
  chmod 1777 "$stage/tmp"
  chmod 0700 "$stage/home/nonroot"
  chown $NONROOT:$NONROOT "$stage/home/nonroot"

  # One reproducible layer: sorted names, fixed times, numeric owners.
  local layer=$WORK/layer.tar
  (cd "$stage" && LC_ALL=C find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
    tar --create --file "$layer" --format=gnu --numeric-owner --mtime="@$epoch" --no-recursion --files-from -)

  local pkgs
  pkgs=$(for f in "${deb_files[@]}"; do dpkg-deb -f "$f" Package Version | paste -sd= | sed 's/^Package: //; s/=Version: /=/'; done | paste -sd, -)
  rm -rf "$LAYOUT.new"
  umoci init --layout "$LAYOUT.new"
  umoci new --image "$LAYOUT.new:$tag"
  umoci raw add-layer --image "$LAYOUT.new:$tag" --history.created "$created" \
    --history.created_by "hack/image.sh (vmkeep binary, Debian packages: $pkgs)" "$layer"
  umoci config --image "$LAYOUT.new:$tag" --no-history --created "$created" \
    --os linux --architecture "$host_arch" \
    --config.user "$NONROOT:$NONROOT" --config.entrypoint /vmkeep --config.workingdir / \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --config.label org.opencontainers.image.title=vmkeep \
    --config.label "org.opencontainers.image.version=$tag" \
    --config.label org.opencontainers.image.licenses=Apache-2.0 \
    --config.label "org.opencontainers.image.description=VM disk images on Kubernetes, persistent or cloned per VM" \
    --config.label "vmkeep.io/debian-packages=$pkgs" \
    --manifest.annotation "org.opencontainers.image.created=$created" \
    --manifest.annotation "vmkeep.io/image-inputs=$inputs"
  umoci gc --layout "$LAYOUT.new"
  rm -rf "$LAYOUT" "$stage" "$extract" "$layer"
  mv "$LAYOUT.new" "$LAYOUT"
}

# The manifest of TAG in the layout, and what it records about its inputs.
manifest_of() { jq -r --arg t "$tag" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' "$LAYOUT/index.json" 2>/dev/null | head -1; }
blob() { cat "$LAYOUT/blobs/${1%%:*}/${1#*:}"; }

manifest=$(manifest_of || true)
if [[ -n $manifest ]] && [[ $(blob "$manifest" | jq -r '.annotations["vmkeep.io/image-inputs"] // ""') == "$inputs" ]]; then
  log "image $LAYOUT:$tag is up to date"
else
  log "building $LAYOUT:$tag from $binary"
  build_image
  manifest=$(manifest_of)
fi

# --- check ----------------------------------------------------------------------------------
config=$(blob "$(blob "$manifest" | jq -r .config.digest)")
[[ $(jq -r .config.User <<<"$config") == "$NONROOT:$NONROOT" ]] || die "image user is not $NONROOT:$NONROOT"
[[ $(jq -c .config.Entrypoint <<<"$config") == '["/vmkeep"]' ]] || die "image entrypoint is not [\"/vmkeep\"]"

bundle=$(mktemp -d "$WORK/check.XXXXXX")
trap 'rm -rf "$bundle"' EXIT
umoci unpack --image "$LAYOUT:$tag" "$bundle/b" >/dev/null
rootfs=$bundle/b/rootfs
uid=$(jq -r .process.user.uid "$bundle/b/config.json")
gid=$(jq -r .process.user.gid "$bundle/b/config.json")
mapfile -t entrypoint < <(jq -r '.process.args[]' "$bundle/b/config.json")
mapfile -t image_env < <(jq -r '.process.env[]' "$bundle/b/config.json")
[[ $uid == "$NONROOT" && $gid == "$NONROOT" ]] || die "the image runs as $uid:$gid, not $NONROOT:$NONROOT"
[[ $(stat -c %u:%a "$rootfs/vmkeep") == 0:755 ]] || die "/vmkeep must belong to root with mode 0755"

# run_in_image ARGS...: the entrypoint with ARGS, as the image's user, in the image's root
# filesystem mounted read-only, in new mount/network/pid namespaces, with only the image's env.
run_in_image() {
  unshare --mount --net --pid --ipc --uts --fork --kill-child -- \
    sh -ec 'r=$1; shift; mount --bind "$r" "$r"; mount -o remount,bind,ro "$r"; exec "$@"' sh "$rootfs" \
    env -i "${image_env[@]}" "$(command -v chroot)" --userspec="$uid:$gid" "$rootfs" "${entrypoint[@]}" "$@"
}

version_out=$(run_in_image --version) || die "the image's entrypoint failed: vmkeep --version"
[[ $version_out == "vmkeep "* ]] || die "unexpected output of vmkeep --version: $version_out"
crd_names=$(run_in_image crd | sed -n 's/^  name: \(.*\.vmkeep\.io\)$/\1/p' | LC_ALL=C sort | paste -sd' ')
expected_names=$(for f in crds/*.yaml; do basename "$f" .yaml; done | LC_ALL=C sort | paste -sd' ')
[[ $crd_names == "$expected_names" ]] || die "vmkeep crd in the image printed [$crd_names], expected [$expected_names]"
log "checked: '$version_out' and 'vmkeep crd' ($crd_names) run as $uid:$gid on a read-only root"
log "image ${manifest} ($(du -sh "$LAYOUT" | cut -f1) layout)"
echo "$LAYOUT:$tag"
