#!/usr/bin/env bash
# Start-up benchmark (issue 20): the native vmsnap, the dotnet tool (dotnet vmsnap.dll) and qemu-img side by
# side in one run, with hyperfine: --version, info, snapshot list and check of a small image (64 MiB disk with
# 1 MiB of data and two snapshots). ROUNDS rounds, each a hyperfine run of every command (RUNS runs each,
# after WARMUP), so that drift hits all of them alike; the table gives each command's median over every
# run of every round and its ratio to qemu-img's, and the same for CPU time (user + system). Not a test.
# Usage: bench/startup.sh   (env: ROUNDS=3 RUNS=20 WARMUP=3 VMSNAP_NATIVE=artifacts/linux-x64/vmsnap
#                            QEMU_IMG=qemu-img QEMU_IO=qemu-io)
# The native vmsnap is built with packaging/build-deb.sh unless VMSNAP_NATIVE names one.
# Needs: hyperfine, qemu-img, qemu-io, python3 (apt-get install hyperfine qemu-utils).
set -euo pipefail
cd "$(dirname "$0")/.."
qemu_img="${QEMU_IMG:-qemu-img}"
qemu_io="${QEMU_IO:-qemu-io}"
for t in hyperfine "$qemu_img" "$qemu_io" python3; do
  command -v "$t" >/dev/null || { echo "bench/startup.sh: $t is not installed" >&2; exit 1; }
done
native="${VMSNAP_NATIVE:-}"
if [ -z "$native" ]; then
  packaging/build-deb.sh "$PWD/artifacts" >/dev/null
  native="$PWD/artifacts/linux-x64/vmsnap"
fi
dotnet build src/Vmsnap.Cli -c Release -nologo -v q -clp:ErrorsOnly
dll="$PWD/src/Vmsnap.Cli/bin/Release/net10.0/vmsnap.dll"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
img="$work/small.qcow2"
"$qemu_img" create -q -f qcow2 "$img" 64M
"$qemu_io" -c "write -P 0x5a 0 1M" "$img" >/dev/null
"$qemu_img" snapshot -c first "$img"
"$qemu_io" -c "write -P 0xa5 512k 1M" "$img" >/dev/null
"$qemu_img" snapshot -c second "$img"

commands=()
names=()
add() { names+=("$1"); commands+=("$2"); }
for op in version info list check; do
  case $op in
    version) v="--version"; q="--version" ;;
    info) v="info $img"; q="info $img" ;;
    list) v="snapshot list $img"; q="snapshot -l $img" ;;
    check) v="check $img"; q="check $img" ;;
  esac
  add "$op native" "$native $v"
  add "$op dotnet" "dotnet $dll $v"
  add "$op qemu-img" "$qemu_img $q"
done
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for ((r = 1; r <= ${ROUNDS:-3}; r++)); do
  args=()
  for i in "${!commands[@]}"; do args+=(-n "${names[$i]}" "${commands[$i]}"); done
  hyperfine -N --style none --warmup "${WARMUP:-3}" --runs "${RUNS:-20}" --export-json "$work/round$r.json" "${args[@]}" >/dev/null
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$work" "${ROUNDS:-3}" <<'EOF'
import json, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
times, cpu = {}, {}
for r in range(1, rounds + 1):
    for res in json.load(open(f"{work}/round{r}.json"))["results"]:
        times.setdefault(res["command"], []).extend(res["times"])
        cpu.setdefault(res["command"], []).append(res["user"] + res["system"])
ops = ["version", "info", "list", "check"]
tools = ("native", "dotnet", "qemu-img")
label = {"version": "--version", "info": "info IMG", "list": "snapshot list IMG", "check": "check IMG"}
# Wall time is what a script waits; CPU time (user + system, hyperfine's mean per round) is what the program
# itself costs, and moves far less than wall time when other work shares the cores.
for title, value in (("wall ms, median of every run", lambda c: statistics.median(times[c])),
                     ("CPU ms (user+sys), median of the rounds' means", lambda c: statistics.median(cpu[c]))):
    print(title)
    print(f"{'command':<20} {'native':>8} {'dotnet':>8} {'qemu-img':>9} {'native/qemu-img':>16} {'dotnet/qemu-img':>16}")
    for op in ops:
        m = {tool: value(f"{op} {tool}") * 1000 for tool in tools}
        print(f"{label[op]:<20} {m['native']:>8.1f} {m['dotnet']:>8.1f} {m['qemu-img']:>9.1f} "
              f"{m['native'] / m['qemu-img']:>15.2f}x {m['dotnet'] / m['qemu-img']:>15.2f}x")
print(f"({len(times['version native'])} runs of each command, over {rounds} rounds)")
EOF
