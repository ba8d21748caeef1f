#!/usr/bin/env bash
# The disk's own sequential limits in a folder, measured with fio: what a VM-state writer or reader
# could reach at best. Prints MiB/s for 1 MiB O_DIRECT writes at queue depth 8 and 1, and reads at 8.
# Usage: bench/disk_limit.sh [DIR] [SIZE]     (needs fio: apt-get install fio)
set -euo pipefail
dir=${1:-.}; size=${2:-2G}; f="$dir/.disk_limit.$$"
trap 'rm -f "$f"' EXIT
command -v fio >/dev/null || { echo "bench/disk_limit.sh: fio is not installed (apt-get install fio)" >&2; exit 1; }
fio_bw() { # rw depth -> MiB/s (terse v3: field 48 is write bandwidth KiB/s, field 7 read)
  local field=48; [ "$1" = read ] && field=7
  fio --name=limit --filename="$f" --size="$size" --bs=1M --rw="$1" --direct=1 --ioengine=libaio \
      --iodepth="$2" --end_fsync=1 --output-format=terse 2>/dev/null | awk -F';' -v f="$field" '{printf "%.0f\n", $f/1024}'
}
echo "write_qd8 $(fio_bw write 8)"
echo "write_qd1 $(fio_bw write 1)"
echo "read_qd8 $(fio_bw read 8)"
