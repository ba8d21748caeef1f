#!/usr/bin/env bash
# Revert benchmark (issue 18): QEMU -loadvm, HMP loadvm, vmsnap loadvm and vmsnap loadvm --postcopy of one snapshot of
# the real Linux test guest with SIZE GiB of RAM filled with random data; time to RESUME, to the guest's first tick,
# to the last page, the guest's tick rate while pages stream and after, vmsnap's peak RSS; REPEAT rounds alternated,
# medians, ratios and the issue's targets. Not a test. One guest at a time; each size's files are deleted before the next.
# Usage: bench/revert.sh          (env: SIZES="1 4 8" REPEAT=3 TAIL=3 TICK_US=20000 SAMPLE=2048 FILL_START_MIB=320
#                                  DIR=bench/.scratch SHM=/dev/shm/vmsnap-revert-bench QEMU=qemu-system-x86_64
#                                  QEMU_IMG=qemu-img VMSNAP="dotnet .../vmsnap.dll" VMSNAP_GUEST=tests/.deps/guest
#                                  VMSNAP_LIVE_TRACE=1: a table of where vmsnap's time goes, phase by phase)
#        SIZES=1 REPEAT=1 bench/revert.sh     # quick check (about 2 minutes)
# Needs: qemu-system-x86_64, qemu-img, busybox-static, python3, the guest kernel (tests/install-deps.sh), SIZE GiB
# twice over in /dev/shm (the source RAM, then each load's), SIZE GiB on the disk folder.
set -euo pipefail
cd "$(dirname "$0")/.."
for t in "${QEMU:-qemu-system-x86_64}" "${QEMU_IMG:-qemu-img}" python3; do
  command -v "$t" >/dev/null || { echo "bench/revert.sh: $t is not installed" >&2; exit 1; }
done
[ -n "${VMSNAP:-}" ] || dotnet build src/Vmsnap.Cli -c Release -nologo -v q -clp:ErrorsOnly
exec python3 bench/revert_bench.py
