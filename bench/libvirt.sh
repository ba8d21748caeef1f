#!/usr/bin/env bash
# libvirt's own internal snapshots against vmsnap --domain, on one libvirt domain (type qemu, TCG) with SIZE_MIB of RAM in a
# shared memory-backend file that the host fills with random data while the domain is paused before its first instruction
# (no guest OS: SeaBIOS runs). Alternated, REPEAT rounds, medians:
#   save:   virsh snapshot-create-as (guest paused throughout)  |  vmsnap savevm --domain (paused)  |  vmsnap savevm --domain --live
#   revert: virsh snapshot-revert  |  vmsnap loadvm --domain --force  (both return once the domain runs again)
# Needs root and a running libvirtd (tests/libvirtd.sh). VMSNAP: the vmsnap command (default: the Release build through dotnet).
# FILL=0: ordinary (anonymous) RAM left as SeaBIOS leaves it, mostly zero pages: what the tools cost beside QEMU's own work. With
# FILL=1 (the default) the RAM is a file in libvirt's memory_backing_dir (on disk on Debian): loading it back is bound by QEMU writing
# that file (about 35 MiB/s measured through /proc/PID/io on the 2-core test machine under load), for virsh and vmsnap alike.
# VMSNAP_LIVE_TRACE=1: the last round's phases of vmsnap's live save and revert, in ms from each process's start.
# LIBVIRT=11.3: on libvirt 11.3 with QEMU 10.0 (tests/libvirtd11.sh starts that daemon beside the system's; tests/install-deps.sh
# unpacks both); default: the system's libvirt (9.0) and QEMU (7.2).
# Usage: REPEAT=5 SIZE_MIB=1024 FILL=1 [LIBVIRT=11.3] bench/libvirt.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPEAT=${REPEAT:-5}
SIZE_MIB=${SIZE_MIB:-1024}
FILL=${FILL:-1}
backing=""
[ "$FILL" = 1 ] && backing="<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>"
read -r -a VMSNAP <<< "${VMSNAP:-dotnet src/Vmsnap.Cli/bin/Release/net10.0/vmsnap.dll}"
[ -n "${VMSNAP_NO_BUILD:-}" ] || dotnet build src/Vmsnap.Cli -c Release -v q >/dev/null
if [ "${LIBVIRT:-}" = 11.3 ]; then
  uri="$(tests/libvirtd11.sh)"
  emulator="$PWD/tests/.deps/qemu-10.0/bin/qemu-system-x86_64"
  ramdir="$PWD/tests/.deps/libvirt-11.3/state/lib/qemu/ram"
else
  tests/libvirtd.sh
  uri=qemu:///system
  emulator=/usr/bin/qemu-system-x86_64
  ramdir=/var/lib/libvirt/qemu/ram
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
  $backing
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
  ram=$(ls "$ramdir"/*-"$name"/pc.ram)
  head -c "$((SIZE_MIB << 20))" /dev/urandom | dd of="$ram" bs=1M conv=notrunc status=none
fi
"${C[@]}" resume "$name" >/dev/null

now() { date +%s.%N; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(d['$1'] if d['$1'] is not None else 'nan')"; }
declare -a virsh_save vmsnap_save vmsnap_save_down vmsnap_live vmsnap_live_down virsh_revert vmsnap_load
for i in $(seq "$REPEAT"); do
  t0=$(now); "${C[@]}" snapshot-create-as "$name" "virsh$i" >/dev/null; t1=$(now)
  virsh_save+=("$(echo "$t1 - $t0" | bc -l)")
  # Wall time around each command, as for virsh (the JSON's "seconds" leaves out the process's start and libvirt's connection).
  t0=$(now); out=$("${VMSNAP[@]}" savevm --domain "$name" --connect "$uri" "paused$i" --json); t1=$(now)
  vmsnap_save+=("$(echo "$t1 - $t0" | bc -l)"); vmsnap_save_down+=("$(json downtime-seconds <<< "$out")")
  t0=$(now); out=$("${VMSNAP[@]}" savevm --domain "$name" --connect "$uri" "live$i" --live --json 2> >(tee "$work/live.trace" | grep -v "vmsnap trace" >&2)); t1=$(now)
  vmsnap_live+=("$(echo "$t1 - $t0" | bc -l)"); vmsnap_live_down+=("$(json downtime-seconds <<< "$out")")
  # Reverts, alternating which goes first.
  if [ $((i % 2)) -eq 1 ]; then order="virsh vmsnap"; else order="vmsnap virsh"; fi
  for who in $order; do
    if [ "$who" = virsh ]; then
      t0=$(now); "${C[@]}" snapshot-revert "$name" "virsh$i" >/dev/null; t1=$(now)
      virsh_revert+=("$(echo "$t1 - $t0" | bc -l)")
    else
      t0=$(now); "${VMSNAP[@]}" loadvm --domain "$name" --connect "$uri" "virsh$i" --force --json >/dev/null 2> >(tee "$work/load.trace" | grep -v "vmsnap trace" >&2); t1=$(now)
      vmsnap_load+=("$(echo "$t1 - $t0" | bc -l)")
    fi
  done
  for s in "virsh$i" "paused$i" "live$i"; do "${C[@]}" snapshot-delete "$name" "$s" >/dev/null; done
  echo "round $i/$REPEAT done (load $(cut -d' ' -f1 /proc/loadavg))" >&2
done

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.3f", m}'; }
all() { printf '%s ' "$@" | awk '{for(i=1;i<=NF;i++) printf "%.2f ", $i}'; }
echo "libvirt $(virsh -c "$uri" version --daemon | awk "/daemon/ {print \$NF}"), QEMU $("$emulator" --version | head -1 | awk '{print $4}'), $SIZE_MIB MiB RAM$([ "$FILL" = 1 ] && echo ", random, file-backed" || echo ", not filled"), TCG, $REPEAT rounds, load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-40s %10s %12s   %s\n' operation median_s stopped_s "all runs (s)"
printf '%-40s %10s %12s   %s\n' "virsh snapshot-create-as" "$(median "${virsh_save[@]}")" "(whole)" "$(all "${virsh_save[@]}")"
printf '%-40s %10s %12s   %s\n' "vmsnap savevm --domain" "$(median "${vmsnap_save[@]}")" "$(median "${vmsnap_save_down[@]}")" "$(all "${vmsnap_save[@]}")"
printf '%-40s %10s %12s   %s\n' "vmsnap savevm --domain --live" "$(median "${vmsnap_live[@]}")" "$(median "${vmsnap_live_down[@]}")" "$(all "${vmsnap_live[@]}")"
printf '%-40s %10s %12s   %s\n' "  --live: guest stopped, each run" "" "" "$(all "${vmsnap_live_down[@]}")"
printf '%-40s %10s %12s   %s\n' "virsh snapshot-revert" "$(median "${virsh_revert[@]}")" "-" "$(all "${virsh_revert[@]}")"
printf '%-40s %10s %12s   %s\n' "vmsnap loadvm --domain --force" "$(median "${vmsnap_load[@]}")" "-" "$(all "${vmsnap_load[@]}")"
if [ "${VMSNAP_LIVE_TRACE:-}" = 1 ]; then
  # Where vmsnap's time went in the last round (ms from the process's start): the live save, then the revert.
  for t in live load; do echo "last round's $t:"; grep -o 'trace .*' "$work/$t.trace" | awk '{printf "  %8s ms  %s\n", $2, substr($0, index($0, $5))}'; done
fi
