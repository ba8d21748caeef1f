#!/usr/bin/env bash
# The stop window of vmsnap savevm --live (issue 20): the native vmsnap and the dotnet tool, built from two
# revisions (e.g. with and without the rehearsal of the commit, Live/LiveSave.cs), side by side
# (bench/live_stop_bench.py), quiet and with stress-ng busy on both cores. Not a test.
# Usage: bench/live-stop.sh BEFORE [AFTER]   (AFTER defaults to HEAD; env: SIZE=256M ROUNDS=8 LOADS="none stress"
#                                             DIR=bench/.scratch EXTRA="label<TAB>command" lines to add variants)
# Needs: qemu-system-x86_64, qemu-img, stress-ng, python3, a C toolchain (apt-get install qemu-system-x86 qemu-utils stress-ng).
set -euo pipefail
cd "$(dirname "$0")/.."
for t in qemu-system-x86_64 qemu-img stress-ng python3; do
  command -v "$t" >/dev/null || { echo "bench/live-stop.sh: $t is not installed" >&2; exit 1; }
done
[ $# -ge 1 ] || { echo "usage: bench/live-stop.sh BEFORE [AFTER]" >&2; exit 2; }
before="$1"
after="${2:-HEAD}"
builds="$(mktemp -d)"
trap 'rm -rf "$builds"' EXIT
variants=""
for rev in "$before" "$after"; do
  name="$(git rev-parse --short "$rev")"
  mkdir -p "$builds/$name"
  git archive "$rev" | tar -x -C "$builds/$name"
  (cd "$builds/$name" && dotnet build src/Vmsnap.Cli -c Release -nologo -v q -clp:ErrorsOnly >&2 \
    && dotnet publish src/Vmsnap.Cli -c Release -r linux-x64 -p:PublishAot=true -o "$builds/$name/native" -nologo -v q >&2)
  variants+="dotnet tool $name	dotnet $builds/$name/src/Vmsnap.Cli/bin/Release/net10.0/vmsnap.dll"$'\n'
  variants+="native $name	$builds/$name/native/vmsnap"$'\n'
done
VARIANTS="$variants${EXTRA:-}" python3 bench/live_stop_bench.py
