#!/usr/bin/env bash
# Save/load benchmark (issue 5): vmsnap save/load against real QEMU savevm/loadvm (cache=none and
# writeback) and the disk's own limit (fio), on the same RAM files, in one run. Not a test.
# Usage: bench/savevm.sh        (env: SIZE=2G DIR=bench/.scratch SHM=/dev/shm/vmsnap-savevm)
# Needs: qemu-system-x86_64, qemu-img, fio, python3 (apt-get install qemu-system-x86 qemu-utils fio).
set -euo pipefail
cd "$(dirname "$0")/.."
for t in qemu-system-x86_64 qemu-img fio python3; do
  command -v "$t" >/dev/null || { echo "bench/savevm.sh: $t is not installed" >&2; exit 1; }
done
dotnet build src/Vmsnap.Cli -c Release -nologo -v q -clp:ErrorsOnly
exec python3 bench/savevm_bench.py
