#!/usr/bin/env bash
# Snapshot create and save on a large image (issue 11), side by side with QEMU on the same image:
# a 1 TiB qcow2 disk (64 KiB clusters, 2048 L2 tables) with 64 snapshots and 8 GiB written spread
# over the disk, built once by `Vmsnap.Bench snapshot-scale build` (untimed, kept in DISK_DIR for
# later runs). Each round, in alternating order:
#   - `vmsnap snapshot create` and `qemu-img snapshot -c`, each right after DIRTY bytes were
#     written (untimed) into TABLES random L2 ranges, so the create finds that many active L2
#     tables with COPIED entries to fix;
#   - `vmsnap save` of a SAVE_RAM guest (machine none) and QEMU's own `savevm` of the same RAM
#     (qemu-system-x86_64 -machine none, paused, HMP savevm then quit).
# Every operation is a fresh process timed by /usr/bin/time: wall seconds and peak RSS (VmHWM);
# `vmsnap_startup` (vmsnap --version) is the .NET start-up all vmsnap rows include. The snapshot
# made is deleted again (untimed, with vmsnap) so every round starts from the same kind of image.
# Then the growth phase: per tool, GROWTH consecutive rounds of the same DIRTY writes and one
# create, without deleting in between; `*_growth` is the file's growth over a whole round (writes
# and create: holes one create frees are filled by the next round's data, so the create alone
# would tell little). The data written is the same for every tool: the differences between the
# rows are what the snapshots cost. `*_used` is the change of the host clusters in use (refcount
# above 0) across the create alone: the space a snapshot really takes, holes or not. Then those
# snapshots are deleted.
# BASELINE (a vmsnap.dll of another build, e.g. main) adds its rows (create and save) for comparison.
# Prints every run, then the medians and vmsnap/QEMU ratios.
# Usage: bench/snapshot-scale.sh   (env: ROUNDS=5 GROWTH=6 DISK_DIR=bench/.scratch SIZE=1T SNAPSHOTS=64
#        WRITTEN=8G DIRTY=64M TABLES=256 SAVE_RAM=64M REBUILD=0 BASELINE=/path/to/another/vmsnap.dll QEMU=1)
# QEMU=0 leaves QEMU's rows out (vmsnap against BASELINE only, for more rounds in the time). cpu_s: user + system time.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
GROWTH=${GROWTH:-6}
DISK_DIR=${DISK_DIR:-$PWD/bench/.scratch}
SIZE=${SIZE:-1T}
SNAPSHOTS=${SNAPSHOTS:-64}
WRITTEN=${WRITTEN:-8G}
DIRTY=${DIRTY:-64M}
TABLES=${TABLES:-256}
SAVE_RAM=${SAVE_RAM:-64M}
mkdir -p "$DISK_DIR"
dotnet build bench/Vmsnap.Bench -c Release -nologo -v q -clp:ErrorsOnly >/dev/null
dotnet build src/Vmsnap.Cli -c Release -nologo -v q -clp:ErrorsOnly >/dev/null
VMSNAP=(dotnet "$PWD/src/Vmsnap.Cli/bin/Release/net10.0/vmsnap.dll")
BENCH=(dotnet "$PWD/bench/Vmsnap.Bench/bin/Release/net10.0/Vmsnap.Bench.dll" snapshot-scale)
IMG="$DISK_DIR/scale-$SIZE-$SNAPSHOTS-$WRITTEN.qcow2"
RAM="$DISK_DIR/scale-$SAVE_RAM.ram"
out=$(mktemp)
times=$(mktemp)
monitor=$(mktemp)
trap 'rm -f "$out" "$times" "$monitor"' EXIT

if [ ! -f "$IMG" ] || [ "${REBUILD:-0}" = 1 ]; then
  "${BENCH[@]}" build --image "$IMG" --size "$SIZE" --snapshots "$SNAPSHOTS" --written "$WRITTEN" --tables "$TABLES"
fi
[ -f "$RAM" ] || head -c "$SAVE_RAM" /dev/urandom > "$RAM"
ram_bytes=$(stat -c %s "$RAM")
printf 'savevm benchsave\nquit\n' > "$monitor"

# run LABEL CMD...: one timed process; appends "LABEL seconds peak_KiB growth_bytes".
run() {
  local label=$1; shift
  local before after
  before=$(stat -c %s "$IMG")
  /usr/bin/time -f "%e %M %U %S" -o "$times" "$@" >/dev/null 2>&1 < "${STDIN:-/dev/null}"
  after=$(stat -c %s "$IMG")
  read -r secs kib user sys < "$times"
  echo "$label $secs $kib $((after - before)) $(echo "$user + $sys" | bc)" | tee -a "$out" | sed 's/^/# /'
}
cleanup() { "${VMSNAP[@]}" snapshot delete "$IMG" "$1" >/dev/null; }
dirty() { "${BENCH[@]}" dirty --image "$IMG" --bytes "$DIRTY" --tables "$TABLES" --seed "$1" 2>/dev/null; }

echo "# snapshot-scale $(date -u +%FT%TZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# image $IMG: $(qemu-img info --output=json "$IMG" | grep -o '"virtual-size": [0-9]*'), $(qemu-img snapshot -l "$IMG" | tail -n +3 | wc -l) snapshots, file $(($(stat -c %s "$IMG") >> 20)) MiB"
echo "# each create after writing $DIRTY into $TABLES random L2 ranges; save of $((ram_bytes >> 20)) MiB of random RAM"
echo "# label seconds peak_KiB growth_bytes"
for round in $(seq "$ROUNDS"); do
  creates=(vmsnap qemu); saves=(vmsnap qemu)
  if [ $((round % 2)) -eq 0 ]; then creates=(qemu vmsnap); saves=(qemu vmsnap); fi
  if [ "${QEMU:-1}" = 0 ]; then creates=(vmsnap); saves=(vmsnap); fi
  if [ -n "${BASELINE:-}" ]; then   # the two builds alternate which goes first
    if [ $((round % 2)) -eq 0 ]; then creates=(baseline "${creates[@]}"); saves=(baseline "${saves[@]}")
    else creates+=(baseline); saves+=(baseline); fi
  fi
  for tool in "${creates[@]}"; do
    dirty "$((round * 10 + ${#tool}))"
    case $tool in
      vmsnap) run vmsnap_create "${VMSNAP[@]}" snapshot create "$IMG" bench ;;
      qemu) run qemu_img_create qemu-img snapshot -c bench "$IMG" ;;
      baseline) run baseline_create dotnet "$BASELINE" snapshot create "$IMG" bench ;;
    esac
    cleanup bench
  done
  run vmsnap_startup "${VMSNAP[@]}" --version
  for tool in "${saves[@]}"; do
    case $tool in
      vmsnap) run vmsnap_save "${VMSNAP[@]}" save "$IMG" --name benchsave --machine none --ram "ram0=$RAM" ;;
      baseline) run baseline_save dotnet "$BASELINE" save "$IMG" --name benchsave --machine none --ram "ram0=$RAM" ;;
      qemu) STDIN=$monitor run qemu_savevm qemu-system-x86_64 -machine none -m "$((ram_bytes >> 20))M" \
              -object "memory-backend-file,id=ram0,size=$ram_bytes,mem-path=$RAM,share=on" -machine memory-backend=ram0 \
              -nodefaults -display none -monitor stdio -S -drive "file=$IMG,if=none,id=d0,format=qcow2" ;;
    esac
    cleanup benchsave
  done
done
growth_tools=(vmsnap qemu)
[ "${QEMU:-1}" = 0 ] && growth_tools=(vmsnap)
[ -n "${BASELINE:-}" ] && growth_tools+=(baseline)
for tool in "${growth_tools[@]}"; do
  for i in $(seq "$GROWTH"); do
    start=$(stat -c %s "$IMG")
    dirty "$((1000 + i))"
    used_before=$("${BENCH[@]}" used --image "$IMG")
    case $tool in
      vmsnap) label=vmsnap_growth; run vmsnap_create_seq "${VMSNAP[@]}" snapshot create "$IMG" "grow$i" ;;
      qemu) label=qemu_img_growth; run qemu_img_create_seq qemu-img snapshot -c "grow$i" "$IMG" ;;
      baseline) label=baseline_growth; run baseline_create_seq dotnet "$BASELINE" snapshot create "$IMG" "grow$i" ;;
    esac
    echo "$label - - $(($(stat -c %s "$IMG") - start))" | tee -a "$out" | sed 's/^/# /'
    echo "${label%_growth}_used - - $(($("${BENCH[@]}" used --image "$IMG") - used_before))" | tee -a "$out" | sed 's/^/# /'
  done
  for i in $(seq "$GROWTH"); do cleanup "grow$i"; done
done
qemu-img check "$IMG" >/dev/null && echo "# qemu-img check: clean"

awk '
  { n[$1]++; s[$1, n[$1]] = $2; m[$1, n[$1]] = $3; g[$1, n[$1]] = $4; u[$1, n[$1]] = $5 }
  function med(a, k, c,   i, j, t, v) {
    for (i = 1; i <= c; i++) v[i] = a[k, i]
    for (i = 2; i <= c; i++) for (j = i; j > 1 && v[j - 1] > v[j]; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
    return c % 2 ? v[(c + 1) / 2] : (v[c / 2] + v[c / 2 + 1]) / 2
  }
  END {
    printf "%-20s %5s %10s %12s %14s %8s\n", "operation", "runs", "seconds", "peak_MiB", "growth_KiB", "cpu_s"
    c = split("vmsnap_startup vmsnap_create qemu_img_create baseline_create vmsnap_save baseline_save qemu_savevm vmsnap_create_seq qemu_img_create_seq baseline_create_seq", order, " ")
    for (o = 1; o <= c; o++) {
      k = order[o]; if (!(k in n)) continue
      sec[k] = med(s, k, n[k]); mib[k] = med(m, k, n[k]) / 1024; kib[k] = med(g, k, n[k]) / 1024; cpu[k] = med(u, k, n[k])
      printf "%-20s %5d %10.3f %12.1f %14.1f %8.2f\n", k, n[k], sec[k], mib[k], kib[k], cpu[k]
    }
    c = split("vmsnap_growth qemu_img_growth baseline_growth vmsnap_used qemu_img_used baseline_used", order, " ")
    for (o = 1; o <= c; o++) {
      k = order[o]; if (!(k in n)) continue
      kib[k] = med(g, k, n[k]) / 1024
      printf "%-20s %5d %10s %12s %14.1f   (%s)\n", k, n[k], "-", "-", kib[k], k ~ /_used$/ ? "clusters in use added by one create" : "file growth per round: the writes and one snapshot"
    }
    if (("vmsnap_create" in n) && ("qemu_img_create" in n))
      printf "create: vmsnap/qemu-img time %.2f, peak memory %.2f\n", sec["vmsnap_create"] / sec["qemu_img_create"], mib["vmsnap_create"] / mib["qemu_img_create"]
    if (("vmsnap_growth" in n) && ("qemu_img_growth" in n))
      printf "file growth per round of %s writes and a snapshot: vmsnap %.0f KiB, qemu-img %.0f KiB%s\n", dirty, kib["vmsnap_growth"], kib["qemu_img_growth"], ("baseline_growth" in n) ? sprintf(", baseline %.0f KiB", kib["baseline_growth"]) : ""
    if (("vmsnap_used" in n) && ("qemu_img_used" in n))
      printf "space one snapshot takes (clusters in use): vmsnap %.0f KiB, qemu-img %.0f KiB%s\n", kib["vmsnap_used"], kib["qemu_img_used"], ("baseline_used" in n) ? sprintf(", baseline %.0f KiB", kib["baseline_used"]) : ""
    if (("vmsnap_create" in n) && ("baseline_create" in n))
      printf "create: vmsnap/baseline time %.3f, cpu %.3f\n", sec["vmsnap_create"] / sec["baseline_create"], cpu["vmsnap_create"] / cpu["baseline_create"]
    if (("vmsnap_save" in n) && ("baseline_save" in n))
      printf "save: vmsnap/baseline time %.3f, cpu %.3f\n", sec["vmsnap_save"] / sec["baseline_save"], cpu["vmsnap_save"] / cpu["baseline_save"]
    if (("vmsnap_save" in n) && ("qemu_savevm" in n))
      printf "save: vmsnap/QEMU savevm time %.2f, peak memory %.2f\n", sec["vmsnap_save"] / sec["qemu_savevm"], mib["vmsnap_save"] / mib["qemu_savevm"]
  }' dirty="$DIRTY" "$out"
