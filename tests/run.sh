#!/usr/bin/env bash
# Installs what the tests need (QEMU 7.2 and 10.0 from Debian's packages, a guest kernel and busybox;
# see tests/install-deps.sh) and runs every test. Interop tests fail, never skip, when a QEMU or the
# guest is missing: this script is how CI gets them.
set -euo pipefail
cd "$(dirname "$0")/.."
while IFS='=' read -r key value; do export "$key=$value"; done < <(tests/install-deps.sh)
qemu-img --version | head -1
qemu-system-x86_64 --version | head -1
"$VMSNAP_QEMU10/qemu-system-x86_64" --version | head -1
echo "guest kernel $(cat "$VMSNAP_GUEST/version")"
# The log is kept so that the end of the output names every failed test with its message (CI shows the tail).
log=$(mktemp)
status=0
dotnet test Vmsnap.slnx -c Release --logger "console;verbosity=normal" "$@" 2>&1 | tee "$log" || status=$?
if [ "$status" -ne 0 ]; then
    echo "=== failed tests (from $log)"
    awk '/^  Failed /{p=1; n=0} /^  (Passed|Skipped) /{p=0} p && n++ < 25' "$log"
fi
exit "$status"
