#!/usr/bin/env bash
# Installs what the tests need (real QEMU from Debian's packages) and runs every test.
# Interop tests fail, never skip, when QEMU is missing: this script is how CI gets it.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then echo "tests/run.sh: need root to install ${need[*]}" >&2; exit 1; fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}"
fi
qemu-img --version | head -1
qemu-system-x86_64 --version | head -1
dotnet test Vmsnap.slnx -c Release --logger "console;verbosity=normal" "$@"
