#!/usr/bin/env bash
# vmsnap load from a qcow2 image on the disk against fio's O_DIRECT read of the same image file,
# interleaved round by round (issue 11). One image is made once: a guest of SIZE random RAM saved by
# vmsnap save. Each round runs fio (1 MiB reads, queue depth 8, O_DIRECT) over the host bytes that hold
# the snapshot's VM state (from its first cluster to its last; the clusters lie in a few long runs) --
# the reference of the ratios -- and, as the config fio-file, over the whole image file (what the first
# measurement used: the file's holes and unwritten extents past the VM state read as zeros without any
# disk I/O, so it overstates the disk's rate); then each configuration once:
#   existing  vmsnap load --in-place into an existing RAM file of the block's length (a QEMU memory-backend-file)
#   replace   vmsnap load into an existing RAM file without --in-place: a new file renamed over it at the end
#   new       vmsnap load into a RAM file that does not exist yet
# A load's rate is the VM state's bytes over vmsnap's own --json seconds (image open to the end).
# The last load of each configuration is compared with the guest RAM (cmp). Each load's CPU time
# (user + system, the whole process) and peak RSS are printed too.
# BASELINE=DIR (a checkout of another commit, e.g. from git archive, built with `dotnet build
# src/Vmsnap.Cli -c Release`) adds the same configurations run by that build (existing@base,
# new@base) to every round, for before/after figures in one run.
# Usage: bench/load-vs-fio.sh   (env: SIZE=1G ROUNDS=5 DISK_DIR=bench/.scratch SHM=/dev/shm/vmsnap-load CONFIGS="existing replace new" BASELINE=)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-1G}
ROUNDS=${ROUNDS:-5}
DISK_DIR=${DISK_DIR:-$PWD/bench/.scratch}
SHM=${SHM:-/dev/shm/vmsnap-load}
CONFIGS=${CONFIGS:-"existing replace new"}
BASELINE=${BASELINE:-}
for t in fio python3; do command -v "$t" >/dev/null || { echo "bench/load-vs-fio.sh: $t is not installed" >&2; exit 1; }; done
mkdir -p "$DISK_DIR" "$SHM"
dotnet build src/Vmsnap.Cli -c Release -nologo -v q -clp:ErrorsOnly >/dev/null
VMSNAP="dotnet src/Vmsnap.Cli/bin/Release/net10.0/vmsnap.dll"
runs=$CONFIGS
if [ -n "$BASELINE" ]; then
  [ -f "$BASELINE/src/Vmsnap.Cli/bin/Release/net10.0/vmsnap.dll" ] || { echo "bench/load-vs-fio.sh: build $BASELINE first (dotnet build src/Vmsnap.Cli -c Release)" >&2; exit 1; }
  for c in $CONFIGS; do runs="$runs $c@base"; done
fi
image="$DISK_DIR/load-bench.qcow2"
out=$(mktemp)
trap 'rm -rf "$out" "$out.cpu" "$out.cpus" "$SHM" "$image"' EXIT
# A field of vmsnap's --json output (snake_case or kebab-case keys); $1 is a Python expression on d.
json() { python3 -c "import json,sys
def norm(o): return {k.replace('-', '_'): norm(v) for k, v in o.items()} if isinstance(o, dict) else [norm(x) for x in o] if isinstance(o, list) else o
d = norm(json.load(sys.stdin)); print($1)"; }

head -c "$SIZE" /dev/urandom > "$SHM/guest.ram"
bytes=$(stat -c %s "$SHM/guest.ram")
rm -f "$image"
$VMSNAP create "$image" "$SIZE" >/dev/null
$VMSNAP save "$image" --name bench --machine none --ram "ram0=$SHM/guest.ram" --json >/dev/null
vmstate=$($VMSNAP snapshot list "$image" --json | json "d['snapshots'][0]['vm_state_size']")
l1=$($VMSNAP snapshot list "$image" --json | json "d['snapshots'][0]['l1_table_offset'], d['snapshots'][0]['l1_size'], d['snapshots'][0]['disk_size']")
# The host byte span of the VM state: guest offsets [disk size, + VM-state size) through the snapshot's L1
# and L2 tables (standard 8-byte entries, no compressed or external-data clusters in a fresh image).
read -r span_start span_bytes span_runs < <(python3 - "$image" $l1 "$vmstate" <<'PY'
import struct, sys
path, l1_off, l1_size, disk, size = sys.argv[1], *map(int, sys.argv[2:6])
with open(path, 'rb') as f:
    f.seek(20); cs = 1 << struct.unpack('>I', f.read(4))[0]
    f.seek(l1_off); l1 = struct.unpack('>%dQ' % l1_size, f.read(8 * l1_size))
    runs, g, end = [], disk // cs * cs, disk + size
    while g < end:
        l1i, l2i = divmod(g // cs, cs // 8)
        l2 = l1[l1i] & 0x00fffffffffffe00
        host = 0
        if l2:
            f.seek(l2 + 8 * l2i); host = struct.unpack('>Q', f.read(8))[0] & 0x00fffffffffffe00
        lo, hi = max(g, disk), min(g + cs, end)
        if host:
            h = host + lo - g
            if runs and runs[-1][0] + runs[-1][1] == h: runs[-1][1] += hi - lo
            else: runs.append([h, hi - lo])
        g += cs
start = runs[0][0] // 4096 * 4096
stop = -(-max(o + n for o, n in runs) // 4096) * 4096
print(start, stop - start, len(runs))
PY
)

echo "# load vs fio $(date -u +%FT%TZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), SIZE=$SIZE, VM state $vmstate bytes in $span_runs runs over $span_bytes bytes of the file from $span_start, image $image ($(stat -c %s "$image") bytes, $(du -B1 "$image" | cut -f1) allocated)"
fio_read() { fio --name=read --filename="$image" "$@" --bs=1M --rw=read --direct=1 --ioengine=libaio --iodepth=8 \
    --readonly --output-format=terse 2>/dev/null | awk -F';' '{print $7/1024}'; }
for round in $(seq "$ROUNDS"); do
  fio_mib=$(fio_read --offset="$span_start" --size="$span_bytes")
  file_mib=$(fio_read)
  echo "fio $round $fio_mib" >> "$out"
  echo "cfg $round fio-file $file_mib" >> "$out"
  line="round $round: fio $(printf %.0f "$fio_mib") MiB/s (whole file $(printf %.0f "$file_mib"))"
  # The order rotates from round to round, so no configuration always runs first (or right after fio).
  set -- $runs; k=$(( (round - 1) % $# )); order="${*:k+1} ${*:1:k}"
  for c in $order; do
    target="$SHM/$c.ram" cli=$VMSNAP
    [ "${c%@base}" != "$c" ] && cli="dotnet $BASELINE/src/Vmsnap.Cli/bin/Release/net10.0/vmsnap.dll"
    case $c in
      new*) rm -f "$target" ;;
      existing*|replace*) [ -f "$target" ] || head -c "$bytes" /dev/zero > "$target" ;;   # allocated pages of other content, as a used RAM file has
    esac
    in_place=""
    # existing@base too: a baseline from before --in-place wrote existing files in place anyway, one with it needs it.
    case $c in existing|existing@base) $cli load --help 2>&1 | grep -q -- --in-place && in_place=--in-place ;; esac
    s=$(/usr/bin/time -o "$out.cpu" -f "%U %S %M" $cli load "$image" bench --ram "ram0=$target" $in_place --json | json "d['seconds']")
    cpu=$(awk '{print $1 + $2}' "$out.cpu")
    rss=$(awk '{print int($3 / 1024)}' "$out.cpu")
    mib=$(awk -v b="$vmstate" -v s="$s" 'BEGIN {print b / s / 1048576}')
    echo "cfg $round $c $mib" >> "$out"
    echo "cpu $c $cpu" >> "$out.cpus"
    line="$line, $c $(printf %.0f "$mib") MiB/s ($(printf %.2f "$s") s, cpu $cpu s, rss $rss MiB)"
  done
  echo "# $line; load $(cut -d' ' -f1 /proc/loadavg)"
done
for c in $runs; do
  cmp -s "$SHM/guest.ram" "$SHM/$c.ram" && echo "# $c: RAM matches the guest's" || { echo "# $c: RAM DIFFERS from the guest's"; exit 1; }
done
awk -v label="load MiB/s" -f bench/fio_ratio.awk "$out"
# CPU time (user + system) of the whole vmsnap process per load, dotnet start included: on a shared
# machine a load's wall time follows the CPU it gets, so this is the steadier figure.
awk '{ v[$2] = v[$2] " " $3; n[$2]++; a[$2, n[$2]] = $3 } END {
  for (c in v) { m = n[c]; for (i = 1; i <= m; i++) x[i] = a[c, i]
    for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (x[j] < x[i]) { t = x[i]; x[i] = x[j]; x[j] = t }
    printf "%-16s cpu s per load:%s  (median %.2f)\n", c, v[c], (m % 2) ? x[(m + 1) / 2] : (x[m / 2] + x[m / 2 + 1]) / 2 } }' "$out.cpus"
