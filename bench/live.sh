#!/usr/bin/env bash
# Live savevm/loadvm benchmark (issue 9): vmsnap savevm (stopped and --live) and vmsnap loadvm of a
# running QEMU against QEMU's HMP savevm (cache=none, writeback), the snapshot-save/-load jobs, HMP
# loadvm and QEMU's unthrottled migrate to a file, one guest with SIZE of random RAM, alternated over
# ROUNDS rounds, medians and the issue's targets; vmsnap's peak memory at SIZE and 2 x SIZE. Not a test.
# BASELINE=DIR (a checkout of another commit, built with `dotnet build src/Vmsnap.Cli -c Release`) adds
# its vmsnap savevm, savevm --live and loadvm to every round, for before/after figures in one run.
# Usage: bench/live.sh     (env: SIZE=1G ROUNDS=3 DIR=bench/.scratch SHM=/dev/shm/vmsnap-live-bench BASELINE=
#                           QEMU=qemu-system-x86_64 QEMU_IMG=qemu-img)
# Needs: qemu-system-x86_64, qemu-img, fio, python3 (apt-get install qemu-system-x86 qemu-utils fio).
set -euo pipefail
cd "$(dirname "$0")/.."
for t in "${QEMU:-qemu-system-x86_64}" "${QEMU_IMG:-qemu-img}" fio python3 cmp; do
  command -v "$t" >/dev/null || { echo "bench/live.sh: $t is not installed" >&2; exit 1; }
done
dotnet build src/Vmsnap.Cli -c Release -nologo -v q -clp:ErrorsOnly
exec python3 bench/live_bench.py
