#!/usr/bin/env bash
# Buffered VM-state writes to an O_DIRECT file against fio's 1 MiB qd8 O_DIRECT write limit,
# interleaved round by round (fio, then each configuration once) so that drift from a shared
# disk or busy CPUs hits both alike. Prints each round's fio figure and every configuration's
# stream MiB/s with its ratio to that round's fio, then the median ratio per configuration.
# Usage: bench/vmstate-vs-fio.sh    (env: ROUNDS=6 TOTAL=2G DISK_DIR=bench/.scratch CONFIGS="8x1M 4x4M ...")
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-6}
TOTAL=${TOTAL:-2G}
DISK_DIR=${DISK_DIR:-$PWD/bench/.scratch}
CONFIGS=${CONFIGS:-"2x1M 4x1M 8x1M 16x1M 2x4M 4x4M 8x1M+falloc"}
mkdir -p "$DISK_DIR"
dotnet build bench/Vmsnap.Bench -c Release -nologo -v q -clp:ErrorsOnly >/dev/null
BENCH="dotnet bench/Vmsnap.Bench/bin/Release/net10.0/Vmsnap.Bench.dll vmstate"
out=$(mktemp)
trap 'rm -f "$out" "$DISK_DIR/.fio.$$"' EXIT
for round in $(seq "$ROUNDS"); do
  fio_mib=$(fio --name=t --filename="$DISK_DIR/.fio.$$" --size="$TOTAL" --bs=1M --rw=write --direct=1 \
    --ioengine=libaio --iodepth=8 --end_fsync=1 --output-format=terse 2>/dev/null | awk -F';' '{print $48/1024}')
  rm -f "$DISK_DIR/.fio.$$"
  echo "fio $round $fio_mib" >> "$out"
  for c in $CONFIGS; do
    k=${c%%x*}; rest=${c#*x}; b=${rest%%+*}; extra=()
    [[ $c == *+falloc ]] && extra=(--prealloc)
    mib=$($BENCH --dir "$DISK_DIR" --total "$TOTAL" --direct --mode buffered --count "$k" --size "$b" "${extra[@]}" --label x | cut -f10)
    echo "cfg $round $c $mib" >> "$out"
  done
  echo "# round $round: fio $fio_mib MiB/s, load $(cut -d' ' -f1 /proc/loadavg)"
done
awk -v label="stream MiB/s" -f bench/fio_ratio.awk "$out"
