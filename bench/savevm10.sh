#!/usr/bin/env bash
# Save/restore benchmark against QEMU 10 (issue 10): vmsnap save, load and export --mapped-ram beside QEMU 10's
# savevm/loadvm and its migrate file: paths (plain, mapped-ram, +multifd, +direct-io), one run, same guest RAM.
# Not a test. See bench/README.md.
# Usage: bench/savevm10.sh     (env: SIZE=1G ROUNDS=3 MULTIFD=2 DIR=bench/.scratch SHM=/dev/shm/vmsnap-savevm10)
# Needs: QEMU 10 (tests/install-deps.sh puts it into tests/.deps, or VMSNAP_QEMU10=BINDIR), fio, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
q10="${VMSNAP_QEMU10:-tests/.deps/qemu-10.0/bin}"
[ -x "$q10/qemu-system-x86_64" ] || { echo "bench/savevm10.sh: no QEMU 10 in $q10 (run tests/install-deps.sh)" >&2; exit 1; }
for t in fio python3; do
  command -v "$t" >/dev/null || { echo "bench/savevm10.sh: $t is not installed" >&2; exit 1; }
done
dotnet build src/Vmsnap.Cli -c Release -nologo -v q -clp:ErrorsOnly
VMSNAP_QEMU10="$(cd "$q10" && pwd)" exec python3 bench/savevm10_bench.py
