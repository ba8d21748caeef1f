#!/usr/bin/env bash
# libvirt's own internal snapshots against vmsnap --domain, on one libvirt domain (type qemu, TCG) with SIZE_MIB of ordinary (anonymous)
# RAM that the host fills with random data through /proc/PID/mem while the domain is paused before its first instruction (no guest OS:
# SeaBIOS runs). Alternated, REPEAT rounds, medians:
#   save:   virsh snapshot-create-as (guest paused throughout)  |  vmsnap savevm --domain (paused)  |  vmsnap savevm --domain --live
#   revert: virsh snapshot-revert  |  vmsnap loadvm --domain --force  |  the same with --postcopy, of virsh's snapshot and of vmsnap's
#           (which carries its page index: no scan). Each revert's wall time, and the time until the guest runs: virsh and the whole
#           restore return once it runs; a postcopy load returns once every page is in, and reports when libvirt saw the guest run.
# Needs root and a running libvirtd (tests/libvirtd.sh). VMSNAP: the vmsnap command (default: the Release build through dotnet).
# FILL=0: the RAM left as SeaBIOS leaves it, mostly zero pages: what the tools cost beside QEMU's own work.
# VMSNAP_LIVE_TRACE=1: the last round's phases of vmsnap's live save and postcopy revert, in ms from each process's start.
# LIBVIRT=11.3: on libvirt 11.3 with QEMU 10.0 (tests/libvirtd11.sh starts that daemon beside the system's; tests/install-deps.sh
# unpacks both); default: the system's libvirt (9.0) and QEMU (7.2).
# Usage: REPEAT=5 SIZE_MIB=1024 FILL=1 [LIBVIRT=11.3] bench/libvirt.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPEAT=${REPEAT:-5}
SIZE_MIB=${SIZE_MIB:-1024}
FILL=${FILL:-1}
read -r -a VMSNAP <<< "${VMSNAP:-dotnet src/Vmsnap.Cli/bin/Release/net10.0/vmsnap.dll}"
[ -n "${VMSNAP_NO_BUILD:-}" ] || dotnet build src/Vmsnap.Cli -c Release -v q >/dev/null
if [ "${LIBVIRT:-}" = 11.3 ]; then
  uri="$(tests/libvirtd11.sh)"
  emulator="$PWD/tests/.deps/qemu-10.0/bin/qemu-system-x86_64"
  piddir="$PWD/tests/.deps/libvirt-11.3/state/run/qemu"
else
  tests/libvirtd.sh
  uri=qemu:///system
  emulator=/usr/bin/qemu-system-x86_64
  piddir=/run/libvirt/qemu
fi
C=(virsh -q -c "$uri")
name=vmsnap-bench-$$
work=$(mktemp -d /var/tmp/vmsnap-libvirt-bench.XXXXXX)
cleanup() { "${C[@]}" destroy "$name" >/dev/null 2>&1 || true; "${C[@]}" undefine "$name" --snapshots-metadata >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
qemu-img create -q -f qcow2 "$work/disk.qcow2" 4G
cat > "$work/domain.xml" <<XML
<domain type='qemu'>
  <name>$name</name>
  <memory unit='MiB'>$SIZE_MIB</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>$emulator</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$work/disk.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <memballoon model='none'/>
  </devices>
</domain>
XML
"${C[@]}" define "$work/domain.xml" >/dev/null
"${C[@]}" start "$name" --paused >/dev/null
if [ "$FILL" = 1 ]; then
  # The guest's RAM is QEMU's one anonymous read-write mapping of exactly SIZE_MIB (QEMU's TCG code buffer is a page smaller).
  python3 - "$(cat "$piddir/$name.pid")" "$SIZE_MIB" <<'PY2'
import os, sys
pid, mib = int(sys.argv[1]), int(sys.argv[2])
size, found = mib << 20, []
for line in open(f'/proc/{pid}/maps'):
    f = line.split()
    a, b = (int(x, 16) for x in f[0].split('-'))
    if b - a == size and f[1].startswith('rw') and len(f) == 5: found.append(a)
if len(found) != 1: sys.exit(f'bench/libvirt.sh: {len(found)} anonymous mappings of {mib} MiB in QEMU {pid}, not one')
with open(f'/proc/{pid}/mem', 'r+b', buffering=0) as mem:
    for offset in range(0, size, 16 << 20):
        mem.seek(found[0] + offset)
        mem.write(os.urandom(16 << 20))
PY2
fi
"${C[@]}" resume "$name" >/dev/null

now() { date +%s.%N; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(d['$1'] if d['$1'] is not None else 'nan')"; }
declare -a virsh_save vmsnap_save vmsnap_save_down vmsnap_live vmsnap_live_down virsh_revert vmsnap_load pc_wall pc_run own_wall own_run
for i in $(seq "$REPEAT"); do
  t0=$(now); "${C[@]}" snapshot-create-as "$name" "virsh$i" >/dev/null; t1=$(now)
  virsh_save+=("$(echo "$t1 - $t0" | bc -l)")
  # Wall time around each command, as for virsh (the JSON's "seconds" leaves out the process's start and libvirt's connection).
  t0=$(now); out=$("${VMSNAP[@]}" savevm --domain "$name" --connect "$uri" "paused$i" --json); t1=$(now)
  vmsnap_save+=("$(echo "$t1 - $t0" | bc -l)"); vmsnap_save_down+=("$(json downtime-seconds <<< "$out")")
  t0=$(now); out=$("${VMSNAP[@]}" savevm --domain "$name" --connect "$uri" "live$i" --live --json 2> >(tee "$work/live.trace" | grep -v "vmsnap trace" >&2)); t1=$(now)
  vmsnap_live+=("$(echo "$t1 - $t0" | bc -l)"); vmsnap_live_down+=("$(json downtime-seconds <<< "$out")")
  # Reverts, each round in another order.
  order=(virsh whole postcopy postcopy-own)
  for k in 0 1 2 3; do
    who=${order[$(((k + i) % 4))]}
    case $who in
      virsh)
        t0=$(now); "${C[@]}" snapshot-revert "$name" "virsh$i" >/dev/null; t1=$(now)
        virsh_revert+=("$(echo "$t1 - $t0" | bc -l)") ;;
      whole)
        t0=$(now); "${VMSNAP[@]}" loadvm --domain "$name" --connect "$uri" "virsh$i" --force --json >/dev/null; t1=$(now)
        vmsnap_load+=("$(echo "$t1 - $t0" | bc -l)") ;;
      postcopy|postcopy-own)
        if [ "$who" = postcopy ]; then tag="virsh$i"; else tag="live$i"; fi
        t0=$(now); out=$("${VMSNAP[@]}" loadvm --domain "$name" --connect "$uri" "$tag" --force --postcopy --json 2> >(tee "$work/$who.trace" | grep -v "vmsnap trace" >&2)); t1=$(now)
        wall=$(echo "$t1 - $t0" | bc -l)
        # Until the guest ran, by wall clock: the load's own figure, plus what its clock leaves out (process start, connection, exit).
        running=$(python3 -c "import json,sys; d=json.loads(sys.argv[1]); print($wall - d['seconds'] + d['postcopy']['seconds-to-resume'])" "$out")
        if [ "$who" = postcopy ]; then pc_wall+=("$wall"); pc_run+=("$running"); else own_wall+=("$wall"); own_run+=("$running"); fi ;;
    esac
  done
  for s in "virsh$i" "paused$i" "live$i"; do "${C[@]}" snapshot-delete "$name" "$s" >/dev/null; done
  echo "round $i/$REPEAT done (load $(cut -d' ' -f1 /proc/loadavg))" >&2
done

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.3f", m}'; }
all() { printf '%s ' "$@" | awk '{for(i=1;i<=NF;i++) printf "%.2f ", $i}'; }
ratio() { echo "$1 / $2" | bc -l | awk '{printf "%.2fx", $1}'; }
echo "libvirt $(virsh -c "$uri" version --daemon | awk "/daemon/ {print \$NF}"), QEMU $("$emulator" --version | head -1 | awk '{print $4}'), $SIZE_MIB MiB RAM$([ "$FILL" = 1 ] && echo ", random" || echo ", not filled"), TCG, $REPEAT rounds, load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-44s %10s %12s   %s\n' operation median_s stopped_s "all runs (s)"
printf '%-44s %10s %12s   %s\n' "virsh snapshot-create-as" "$(median "${virsh_save[@]}")" "(whole)" "$(all "${virsh_save[@]}")"
printf '%-44s %10s %12s   %s\n' "vmsnap savevm --domain" "$(median "${vmsnap_save[@]}")" "$(median "${vmsnap_save_down[@]}")" "$(all "${vmsnap_save[@]}")"
printf '%-44s %10s %12s   %s\n' "vmsnap savevm --domain --live" "$(median "${vmsnap_live[@]}")" "$(median "${vmsnap_live_down[@]}")" "$(all "${vmsnap_live[@]}")"
printf '%-44s %10s %12s   %s\n' "  --live: guest stopped, each run" "" "" "$(all "${vmsnap_live_down[@]}")"
v=$(median "${virsh_revert[@]}")
printf '%-44s %10s %12s   %s\n' operation median_s "virsh/this" "all runs (s)"
printf '%-44s %10s %12s   %s\n' "virsh snapshot-revert (returns running)" "$v" "1.00x" "$(all "${virsh_revert[@]}")"
printf '%-44s %10s %12s   %s\n' "vmsnap loadvm --domain (returns running)" "$(median "${vmsnap_load[@]}")" "$(ratio "$v" "$(median "${vmsnap_load[@]}")")" "$(all "${vmsnap_load[@]}")"
printf '%-44s %10s %12s   %s\n' "vmsnap loadvm --postcopy: guest runs" "$(median "${pc_run[@]}")" "$(ratio "$v" "$(median "${pc_run[@]}")")" "$(all "${pc_run[@]}")"
printf '%-44s %10s %12s   %s\n' "  every page in (wall)" "$(median "${pc_wall[@]}")" "$(ratio "$v" "$(median "${pc_wall[@]}")")" "$(all "${pc_wall[@]}")"
printf '%-44s %10s %12s   %s\n' "  of vmsnap's snapshot: guest runs" "$(median "${own_run[@]}")" "$(ratio "$v" "$(median "${own_run[@]}")")" "$(all "${own_run[@]}")"
printf '%-44s %10s %12s   %s\n' "  of vmsnap's snapshot: every page in" "$(median "${own_wall[@]}")" "$(ratio "$v" "$(median "${own_wall[@]}")")" "$(all "${own_wall[@]}")"
if [ "${VMSNAP_LIVE_TRACE:-}" = 1 ]; then
  # Where vmsnap's time went in the last round (ms from the process's start): the live save, then the postcopy reverts.
  for t in live postcopy postcopy-own; do echo "last round's $t:"; grep -o 'trace .*' "$work/$t.trace" | awk '{printf "  %8s ms  %s\n", $2, substr($0, index($0, $5))}'; done
fi
