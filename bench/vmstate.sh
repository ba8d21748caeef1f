#!/usr/bin/env bash
# VM-state writer benchmark (issue 4): a 2 GiB RAM page stream (all random; half zero pages)
# encoded with RamPageEncoder and written by VmStateWriter to a file on the real disk with
# O_DIRECT and to /dev/shm, in gather mode (QEMU-like, 32 KiB buffer) and in buffered mode over
# several K x B, next to the disk's own limit (fio, via disk_limit.sh) measured in the same run.
# Timed region: writer creation to Close (all writes done and fdatasync); with --prealloc
# (fio-like, untimed fallocate) also the trim to the exact length and a second fdatasync. Each row is the
# median of REPEAT runs (all runs listed in the last column); memory is the highest VmHWM.
# Usage: bench/vmstate.sh            (env: REPEAT=3 TOTAL=2G DISK_DIR=bench/.scratch SHM_DIR=/dev/shm/vmsnap-bench QUICK=1)
set -euo pipefail
cd "$(dirname "$0")/.."
REPEAT=${REPEAT:-3}
TOTAL=${TOTAL:-2G}
DISK_DIR=${DISK_DIR:-$PWD/bench/.scratch}
SHM_DIR=${SHM_DIR:-/dev/shm/vmsnap-bench}
LIMIT=${DISK_LIMIT:-}
for c in "$LIMIT" bench/disk_limit.sh; do
  if [ -n "$c" ] && [ -x "$c" ]; then LIMIT=$c; break; fi
done
mkdir -p "$DISK_DIR" "$SHM_DIR"
trap 'rm -rf "$SHM_DIR"' EXIT

dotnet build bench/Vmsnap.Bench -c Release -nologo -v q -clp:ErrorsOnly
BENCH="dotnet bench/Vmsnap.Bench/bin/Release/net10.0/Vmsnap.Bench.dll vmstate"
bench() { $BENCH --total "$TOTAL" --repeat "$REPEAT" "$@"; }

echo "# vmstate benchmark $(date -u +%FT%TZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
df -T "$DISK_DIR" "$SHM_DIR" | awk 'NR==1 || /\// {print "#   " $0}'
limits() {
  if [ -x "$LIMIT" ]; then "$LIMIT" "$DISK_DIR" 2G | sed "s/^/# disk limit ($1): /"
  else echo "# disk limit: disk_limit.sh not found (set DISK_LIMIT)"; fi
}
limits before

if [ -n "${QUICK:-}" ]; then
  configs=("8 1M")
else
  configs=("1 1M" "2 1M" "4 1M" "8 1M" "16 1M" "8 256K" "16 256K" "2 4M" "4 4M" "8 4M")
fi

$BENCH --header
for zero in 0 50; do
  # The encoder's and writer's own ceiling: a device that discards every write.
  bench --label null --dir null --zero "$zero" --mode gather
  bench --label null --dir null --zero "$zero" --mode buffered --count 8 --size 1M
  bench --label disk --dir "$DISK_DIR" --zero "$zero" --mode gather --direct
  for kb in "${configs[@]}"; do
    set -- $kb
    bench --label disk --dir "$DISK_DIR" --zero "$zero" --mode buffered --count "$1" --size "$2" --direct
  done
  bench --label disk --dir "$DISK_DIR" --zero "$zero" --mode buffered --count 8 --size 1M --direct --prealloc --read
  bench --label shm --dir "$SHM_DIR" --zero "$zero" --mode gather
  bench --label shm --dir "$SHM_DIR" --zero "$zero" --mode gather --prealloc
  for kb in "${configs[@]}"; do
    set -- $kb
    bench --label shm --dir "$SHM_DIR" --zero "$zero" --mode buffered --count "$1" --size "$2"
  done
  bench --label shm --dir "$SHM_DIR" --zero "$zero" --mode buffered --count 8 --size 1M --prealloc
done

limits after
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
