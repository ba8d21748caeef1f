#!/usr/bin/env bash
# vmsnap save of SIZE random RAM (a -machine none guest) into a fresh qcow2 image on the disk, this build against
# BASELINE's (a checkout built with `dotnet build src/Vmsnap.Cli -c Release`, as for bench/load-vs-fio.sh), alternated:
# the order flips every round. Per save: vmsnap's --json seconds (image open to its fdatasync and snapshot switch),
# process CPU (user + system, dotnet start included) and peak RSS; then the medians.
# Usage: BASELINE=DIR bench/save-vs-base.sh   (env: SIZE=1G ROUNDS=5 DISK_DIR=bench/.scratch)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-1G}; ROUNDS=${ROUNDS:-5}; BASELINE=${BASELINE:?}; DISK_DIR=${DISK_DIR:-$PWD/bench/.scratch}; SHM=/dev/shm/vmsnap-save
mkdir -p "$DISK_DIR" "$SHM"; trap 'rm -rf "$SHM" "$DISK_DIR"/save-bench-*.qcow2' EXIT
dotnet build src/Vmsnap.Cli -c Release -nologo -v q -clp:ErrorsOnly >/dev/null
head -c "$SIZE" /dev/urandom > "$SHM/guest.ram"
declare -A cli=([this]="dotnet src/Vmsnap.Cli/bin/Release/net10.0/vmsnap.dll" [base]="dotnet $BASELINE/src/Vmsnap.Cli/bin/Release/net10.0/vmsnap.dll")
echo "# save bench $(date -u +%FT%TZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), SIZE=$SIZE"
out=$(mktemp)
for round in $(seq "$ROUNDS"); do
  order="this base"; [ $((round % 2)) -eq 0 ] && order="base this"
  for b in $order; do
    img="$DISK_DIR/save-bench-$b.qcow2"; rm -f "$img"
    ${cli[$b]} create "$img" "$SIZE" >/dev/null
    s=$(/usr/bin/time -o "$out.t" -f "%U %S %M" ${cli[$b]} save "$img" --name bench --machine none --ram "ram0=$SHM/guest.ram" --json \
        | python3 -c "import json,sys; print(json.load(sys.stdin)['seconds'])")
    read -r u sy m < "$out.t"
    echo "$b $round $s $(echo "$u + $sy" | bc) $((m / 1024))" | tee -a "$out"
    rm -f "$img"
  done
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
for b in this base; do
  awk -v b=$b '$1==b {print $3, $4, $5}' "$out" | python3 -c "import sys,statistics as st; r=[l.split() for l in sys.stdin]; print(\"median %s: %.2f s, cpu %.2f s, rss %s MiB (n=%d)\" % (\"$b\", st.median(float(x[0]) for x in r), st.median(float(x[1]) for x in r), max(x[2] for x in r), len(r)))"
done
rm -f "$out" "$out.t"
