#!/usr/bin/env bash
# The qcow2 VM-state area (issue 3) against fio's 1 MiB qd8 O_DIRECT write limit, interleaved
# round by round on the same disk: each round runs fio once, then each configuration once: a
# fresh qcow2 image, TOTAL bytes written through OpenVmStateForWriting by the buffered VM-state
# writer (K x 1 MiB, O_DIRECT), timed to the end of the area's Flush (data and metadata durable).
# "reuse" rows write into the clusters a first save left free (snapshot made and deleted).
# BASELINE=DIR (a checkout of another commit, built with `dotnet build bench/Vmsnap.Bench -c Release`)
# runs every configuration with that build too, in the same rounds (CONFIG@base), the two builds in
# alternating order from round to round, for before/after figures in one run.
# DIRECT=0 writes through the page cache (for a DISK_DIR on tmpfs, which refuses O_DIRECT: the CPU's
# share of a save, without the disk's noise; fio then writes buffered too).
# Usage: bench/vmstate-area-vs-fio.sh   (env: ROUNDS=4 TOTAL=2G DISK_DIR=bench/.scratch CONFIGS="64K:8 64K:8:reuse 2M:8 4K:8" BASELINE= DIRECT=1)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-4}
TOTAL=${TOTAL:-2G}
DISK_DIR=${DISK_DIR:-$PWD/bench/.scratch}
CONFIGS=${CONFIGS:-"64K:8 64K:8:reuse 2M:8 4K:8"}
DIRECT=${DIRECT:-1}
direct=(--direct); [ "$DIRECT" = 0 ] && direct=()
mkdir -p "$DISK_DIR"
dotnet build bench/Vmsnap.Bench -c Release -nologo -v q -clp:ErrorsOnly >/dev/null
BENCH="dotnet bench/Vmsnap.Bench/bin/Release/net10.0/Vmsnap.Bench.dll vmstate-area"
BASELINE=${BASELINE:-}
builds=(new)
if [ -n "$BASELINE" ]; then
  [ -f "$BASELINE/bench/Vmsnap.Bench/bin/Release/net10.0/Vmsnap.Bench.dll" ] || { echo "bench/vmstate-area-vs-fio.sh: build $BASELINE first (dotnet build bench/Vmsnap.Bench -c Release)" >&2; exit 1; }
  builds=(new base)
fi
out=$(mktemp)
trap 'rm -f "$out" "$DISK_DIR/.fio.$$"' EXIT
echo "# vmstate-area vs fio $(date -u +%FT%TZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), TOTAL=$TOTAL"
$BENCH --header | sed 's/^/# /'
for round in $(seq "$ROUNDS"); do
  fio_mib=$(fio --name=t --filename="$DISK_DIR/.fio.$$" --size="$TOTAL" --bs=1M --rw=write --direct="$DIRECT" \
    --ioengine=libaio --iodepth=8 --end_fsync=1 --output-format=terse 2>/dev/null | awk -F';' '{print $48/1024}')
  rm -f "$DISK_DIR/.fio.$$"
  echo "fio $round $fio_mib" >> "$out"
  order=("${builds[@]}"); [ $((round % 2)) -eq 0 ] && [ ${#builds[@]} -eq 2 ] && order=(base new)
  for c in $CONFIGS; do
    IFS=: read -r cluster k reuse <<< "$c"
    extra=(); [ "${reuse:-}" = reuse ] && extra=(--reuse)
    for b in "${order[@]}"; do
      bench=$BENCH label=$c
      [ "$b" = base ] && bench="dotnet $BASELINE/bench/Vmsnap.Bench/bin/Release/net10.0/Vmsnap.Bench.dll vmstate-area" label="$c@base"
      line=$($bench --dir "$DISK_DIR" --total "$TOTAL" "${direct[@]}" --cluster "$cluster" --count "$k" --size 1M "${extra[@]}")
      echo "# $label $line"
      echo "cfg $round $label $(echo "$line" | cut -f7)" >> "$out"
    done
  done
  echo "# round $round: fio $fio_mib MiB/s"
done
awk -v label="write MiB/s" -f bench/fio_ratio.awk "$out"
