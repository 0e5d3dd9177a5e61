#!/usr/bin/env bash
# Measures the data path on this machine, outside the cluster: `vmkeep import` of a 1 GiB
# sparse raw disk (64 KiB of data in every other MiB) served over HTTP on 127.0.0.1, of a qcow2
# of it, of a gzip of it, and `vmkeep copy` of the imported disk (what a copier Pod runs). Prints
# MB/s (of the 1 GiB disk) and seconds; docs/import.md keeps the figures.
#
#   hack/bench-data.sh [--binary PATH]     default release/vmkeep in cargo's target folder
#                                          (built when missing; CARGO_TARGET_DIR is honoured)
#
# Needs python3 (the HTTP server), qemu-img and gzip. Works in a temporary folder, removed after.
set -euo pipefail
LOG_PREFIX=bench-data
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(dirname "$0")/.."

if [[ ${1:-} == --binary ]]; then
  binary=$(realpath "${2:?--binary needs a path}")
  [[ -x $binary ]] || die "$binary is not an executable"
else
  binary=$(cargo_bin release vmkeep)
  [[ -x $binary ]] || cargo build --release --locked --bin vmkeep
  [[ -x $binary ]] || die "no $binary after cargo build"
fi
apt_install qemu-utils gzip python3 curl

work=$(mktemp -d)
server=
cleanup() { [[ -n $server ]] && kill "$server" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/www" "$work/scratch"

# The disk: 1 GiB, 64 KiB of random data at the start of every other MiB.
python3 - "$work/www/disk.raw" <<'PY'
import os, sys
with open(sys.argv[1], "wb") as f:
    f.truncate(1 << 30)
    for mib in range(0, 1024, 2):
        f.seek(mib << 20)
        f.write(os.urandom(64 << 10))
PY
qemu-img convert -f raw -O qcow2 "$work/www/disk.raw" "$work/www/disk.qcow2"
gzip -1 -c "$work/www/disk.raw" >"$work/www/disk.raw.gz"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
(cd "$work/www" && exec python3 -m http.server --bind 127.0.0.1 "$port" >/dev/null 2>&1) &
server=$!
for _ in $(seq 50); do curl -fsI "http://127.0.0.1:$port/disk.raw" >/dev/null 2>&1 && break; sleep 0.1; done

measure() { # name format file
  local target=$work/target-$1 start end
  mkdir -p "$target"
  start=$(date +%s.%N)
  "$binary" import --url "http://127.0.0.1:$port/$3" --format "$2" --target "$target" \
    --scratch "$work/scratch" --capacity $((1 << 30)) --termination-log "$work/result-$1" >/dev/null 2>&1 ||
    die "import of $3 failed: $(cat "$work/result-$1")"
  end=$(date +%s.%N)
  python3 -c "import sys; s=float(sys.argv[2])-float(sys.argv[1]); print(f'import {sys.argv[3]:<12} {s:6.1f} s  {1024/s:6.0f} MB/s  (of the 1 GiB disk; file served: {int(sys.argv[4])/2**20:.0f} MiB)')" \
    "$start" "$end" "$3" "$(stat -c %s "$work/www/$3")"
}
measure raw raw disk.raw
measure qcow2 qcow2 disk.qcow2
measure gz raw disk.raw.gz
mkdir -p "$work/copy"
start=$(date +%s.%N)
"$binary" copy --source "$work/target-raw" --target "$work/copy" --termination-log "$work/result-copy" >/dev/null 2>&1 ||
  die "copy failed: $(cat "$work/result-copy")"
end=$(date +%s.%N)
python3 -c "import sys; s=float(sys.argv[2])-float(sys.argv[1]); print(f'copy   disk.img     {s:6.1f} s  {1024/s:6.0f} MB/s')" "$start" "$end"
digests=$(for r in raw qcow2 gz copy; do sed 's/^[A-Za-z]*: \([^ ]*\).*/\1/' "$work/result-$r"; done | sort -u | wc -l)
[[ $digests == 1 ]] || die "the digests differ: $(cat "$work"/result-*)"
echo "all four digests agree: $(sed 's/^[A-Za-z]*: \([^ ]*\).*/\1/' "$work/result-copy")"
