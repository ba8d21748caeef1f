#!/usr/bin/env bash
# Installs what the tests need (QEMU 7.2 and 10.0 from Debian's packages, a guest kernel and busybox, a clean
# Debian 12 root; see tests/install-deps.sh), builds the native vmsnap and its .deb, and runs every test. Interop
# tests fail, never skip, when a QEMU, the guest or the package is missing: this script is how CI gets them.
# Arguments go to dotnet test (e.g. --filter Category=Interop for one tier), in both passes.
set -euo pipefail
cd "$(dirname "$0")/.."
while IFS='=' read -r key value; do export "$key=$value"; done < <(tests/install-deps.sh --without-debian-root)
tests/install-deps.sh --debian-root &
root_maker=$!
qemu-img --version | head -1
qemu-system-x86_64 --version | head -1
"$VMSNAP_QEMU10/qemu-system-x86_64" --version | head -1
echo "guest kernel $(cat "$VMSNAP_GUEST/version")"
# libvirtd (9.0) for the libvirt tests, started without systemd (the tests start it too when it does not answer).
tests/libvirtd.sh
virsh -c qemu:///system version | grep -E 'library|hypervisor'
# And libvirt 11.3 beside it (tests/libvirtd11.sh), for the libvirt tests with QEMU 10.0.
virsh -c "$(tests/libvirtd11.sh)" version --daemon | grep -E 'daemon'

# ---- The native vmsnap (packaging/build-deb.sh): the executable, the .deb, the tarball ----------------------
# The package tests (tests/Vmsnap.Tests/Native) install the .deb (VMSNAP_DEB) into the clean Debian 12 root.
native_package() {
  local started=$SECONDS paths built
  paths="$(packaging/build-deb.sh "$PWD/artifacts")"
  mapfile -t built <<< "$paths"
  export VMSNAP_DEB="${built[0]}" VMSNAP_NATIVE="${built[2]}"
  echo "native build: $(basename "$VMSNAP_DEB") ($(du -k "$VMSNAP_DEB" | cut -f1) KiB) in $((SECONDS - started)) s"
}

# The command-line tests once more, against the native executable (VMSNAP_BIN): every command works the same from
# it (the package tests above already ran it in the Debian root, a live guest's savevm/loadvm included). Not the
# packing of the dotnet tool, nor the tests that hook into a JIT-run vmsnap; of the save/load interop tests with
# QEMU, those through pipes and both writer modes. The script's own arguments apply to this pass too, a --filter
# (a tier: --filter Category=Unit) narrowing it further.
native_filter='(FullyQualifiedName~Vmsnap.Tests.Cli.&FullyQualifiedName!~PackagingTests)|FullyQualifiedName~Vmsnap.Tests.Snapshots.VmCommandTests|FullyQualifiedName~Vmsnap.Tests.Live.LiveRefusalTests|FullyQualifiedName~CheckParityTests.An_invalid_snapshot_table_offset|FullyQualifiedName~SaveLoadQemuTests.vmsnap_save_then_QEMU_loadvm|FullyQualifiedName~SaveLoadQemuTests.Export_of_a_QEMU_savevm_snapshot'
native_cli_tests() {
  local started=$SECONDS filter=$native_filter args=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --filter) filter="($native_filter)&($2)"; shift 2 ;;
      --filter=*) filter="($native_filter)&(${1#--filter=})"; shift ;;
      *) args+=("$1"); shift ;;
    esac
  done
  VMSNAP_BIN="$VMSNAP_NATIVE" dotnet test Vmsnap.slnx -c Release --no-build --logger "console;verbosity=normal" --filter "$filter" "${args[@]}"
  echo "command-line tests against the native vmsnap: $((SECONDS - started)) s"
}

native_package
wait "$root_maker" || { echo "tests/run.sh: making the clean Debian 12 root failed (tests/install-deps.sh --debian-root)" >&2; exit 1; }
# The log is kept so that the end of the output names every failed test with its message (CI shows the tail).
log=$(mktemp)
status=0
dotnet test Vmsnap.slnx -c Release --logger "console;verbosity=normal" "$@" 2>&1 | tee "$log" || status=$?
native_cli_tests "$@" 2>&1 | tee -a "$log" || status=$?
if [ "$status" -ne 0 ]; then
    echo "=== failed tests (from $log)"
    awk '/^  Failed /{p=1; n=0} /^  (Passed|Skipped) /{p=0} p && n++ < 25' "$log"
fi
exit "$status"
