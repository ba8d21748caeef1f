#!/usr/bin/env bash
# Installs what the tests need, from Debian's packages, and prints the environment the tests read:
#   - QEMU of the distribution (7.2 on Debian 12) system-wide: qemu-utils, qemu-system-x86;
#   - a second QEMU (10.0, from Debian 12's backports suite) unpacked into tests/.deps/qemu-10.0
#     without replacing the first: its .debs are fetched with apt-get download and taken apart with
#     dpkg-deb -x; the libraries it links are installed from the distribution;
#   - the guest for real-guest tests: the kernel of linux-image-cloud-amd64 (downloaded and unpacked,
#     not installed) with its virtio modules in tests/.deps/guest, and busybox-static (the tests build
#     their initramfs from /bin/busybox themselves);
#   - libvirt (libvirt-daemon, libvirt-daemon-driver-qemu, libvirt-clients) and tini for the libvirt tests, and libvirt 11.3
#     from bookworm-backports unpacked into tests/.deps/libvirt-11.3 (tests/libvirtd11.sh runs it beside the first);
#   - for the native build and its package tests: a C toolchain, debootstrap, and a clean Debian 12 root
#     (see native_deps and debian_root below).
# The Debian mirror is the one this machine's apt already uses (read from apt at run time).
# Idempotent: what is already there is kept. Needs root for apt-get.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
deps="$root/tests/.deps"
mkdir -p "$deps"

as_root() {
  if [ "$(id -u)" -ne 0 ]; then echo "tests/install-deps.sh: need root to $*" >&2; exit 1; fi
}

updated=0
apt_update() {
  if [ $updated -eq 0 ]; then apt-get update -q >&2; updated=1; fi
}

need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
dpkg-query -W -f '${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
# libvirt's daemon with its QEMU driver and virsh, for the libvirt tests (tests/libvirtd.sh starts it without systemd).
command -v libvirtd >/dev/null || need+=(libvirt-daemon libvirt-daemon-driver-qemu)
command -v virsh >/dev/null || need+=(libvirt-clients)
# tini, the subreaper libvirtd runs under (tests/libvirtd.sh says why).
command -v tini >/dev/null || need+=(tini)
if [ ${#need[@]} -gt 0 ]; then
  as_root "install ${need[*]}"
  apt_update
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
fi

# The archive this machine's apt uses for the distribution's own suite (e.g. http://MIRROR/debian/).
codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
mirror_of() {
  apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(LABEL)' 2>/dev/null \
    | awk -v c="$codename" '$2 == c && $3 == "Debian" { print $1; exit }'
}

# A clean Debian 12 root without .NET (debootstrap --variant=minbase from this machine's mirror), kept as a tarball
# that each package test unpacks afresh. Apt's downloaded packages and lists are left out of it: the package needs none.
debian_root() {
  local tarball="$deps/debian12-minbase.tar.gz" dir="$deps/debian12-minbase.tmp" mirror
  if [ ! -s "$tarball" ]; then
    as_root "debootstrap a Debian 12 root"
    [ -z "$(mirror_of)" ] && apt_update
    mirror="$(mirror_of)"
    if [ -z "$mirror" ]; then
      echo "tests/install-deps.sh: cannot find this machine's Debian mirror for '$codename' in apt's configuration" >&2
      exit 1
    fi
    rm -rf --one-file-system "$dir"
    # In a mount namespace of its own: what debootstrap mounts inside the root (proc, sys) goes away with it.
    unshare --mount --propagation private -- debootstrap --variant=minbase bookworm "$dir" "$mirror" >&2
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
    mkdir -p "$dir/var/lib/apt/lists/partial"
    tar -C "$dir" --numeric-owner -cf - . | gzip -1 > "$tarball.tmp"
    mv "$tarball.tmp" "$tarball"
    rm -rf --one-file-system "$dir"
    echo "Debian 12 root in $tarball" >&2
  fi
  echo "VMSNAP_DEBIAN_ROOT=$tarball"
}

# --debian-root: only the root (tests/run.sh makes it in the background while the native vmsnap builds, after a call
# with --without-debian-root has installed the rest: debootstrap waits mostly on the network, the build on the CPU).
if [ "${1:-}" = --debian-root ]; then
  command -v debootstrap >/dev/null || { echo "tests/install-deps.sh --debian-root: debootstrap is missing (run tests/install-deps.sh first)" >&2; exit 1; }
  debian_root >/dev/null
  exit 0
fi

# Runs apt-get/apt-cache against one extra suite only, with state in a private folder
# (the system's sources and lists stay as they are).
extra_apt() {
  local suite="$1"; shift
  local dir="$deps/apt-$suite"
  local tool="$1"; shift
  "$tool" -o Dir::Etc::SourceList="$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null \
    -o Dir::State::Lists="$dir/lists" -o Dir::Cache="$dir/cache" -o Debug::NoLocking=1 "$@"
}

prepare_suite() {
  local suite="$1" dir="$deps/apt-$1" mirror
  mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
  if [ ! -s "$dir/sources.list" ]; then
    [ -z "$(mirror_of)" ] && apt_update
    mirror="$(mirror_of)"
    if [ -z "$mirror" ]; then
      echo "tests/install-deps.sh: cannot find this machine's Debian mirror for '$codename' in apt's configuration" >&2
      exit 1
    fi
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${mirror%/} $suite main" > "$dir/sources.list"
  fi
  extra_apt "$suite" apt-get update -q >&2
}

# Installs from the distribution what the .debs in folder $1 depend on, of the names that match the extended regular
# expression $2 and not $3, when missing (version constraints dropped: the backports builds are made against this release).
install_depends() {
  local names l missing=()
  names="$(for f in "$1"/*.deb; do dpkg-deb -f "$f" Depends; done | tr ',' '\n' \
    | sed -e 's/([^)]*)//g' -e 's/|.*//' -e 's/ //g' | grep -E "$2" | grep -v -E "$3" | sort -u)"
  for l in $names; do dpkg-query -W -f '${Status}' "$l" 2>/dev/null | grep -q 'ok installed' || missing+=("$l"); done
  if [ ${#missing[@]} -gt 0 ]; then
    as_root "install ${missing[*]}"
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
  fi
}

q10="$deps/qemu-10.0"
# The display and audio modules too: QEMU looks for a module it lacks in the system's module folder next, where the first
# QEMU's are, and aborts on one of another build (libvirt's capability probe loads every module).
if [ ! -x "$q10/bin/qemu-system-x86_64" ] || [ ! -e "$q10/root/usr/lib/x86_64-linux-gnu/qemu/hw-display-qxl.so" ]; then
  if [ "$codename" != bookworm ]; then
    echo "tests/install-deps.sh: the second QEMU comes from Debian 12 (bookworm) backports; this machine runs '$codename'" >&2
    exit 1
  fi
  suite=bookworm-backports
  prepare_suite "$suite"
  rm -rf "$q10.tmp" && mkdir -p "$q10.tmp/debs"
  (cd "$q10.tmp/debs" && extra_apt "$suite" apt-get download -q \
      qemu-system-x86 qemu-system-common qemu-system-data qemu-utils seabios \
      qemu-system-modules-opengl qemu-system-modules-spice >&2 2> >(grep -v unsandboxed >&2))
  for f in "$q10.tmp"/debs/*.deb; do dpkg-deb -x "$f" "$q10.tmp/root"; done
  version="$(dpkg-deb -f "$q10.tmp"/debs/qemu-system-x86_*.deb Version)"
  case "$version" in *:10.0.*) ;; *) echo "tests/install-deps.sh: $suite has qemu $version, not 10.0" >&2; exit 1 ;; esac
  # The libraries the binaries link, from the distribution itself.
  install_depends "$q10.tmp/debs" . '^(qemu|seabios|ipxe)'
  # Wrappers: the unpacked binaries look for firmware and modules in the system's /usr paths, which
  # belong to the first QEMU; point them at their own.
  mkdir -p "$q10.tmp/bin"
  for p in qemu-img qemu-io qemu-nbd; do
    printf '#!/bin/sh\nr="$(dirname "$(readlink -f "$0")")/../root"\nexec "$r/usr/bin/%s" "$@"\n' "$p" > "$q10.tmp/bin/$p"
  done
  printf '#!/bin/sh\nr="$(dirname "$(readlink -f "$0")")/../root"\nQEMU_MODULE_DIR="$r/usr/lib/x86_64-linux-gnu/qemu" exec "$r/usr/bin/qemu-system-x86_64" -L "$r/usr/share/qemu" -L "$r/usr/share/seabios" -L /usr/lib/ipxe/qemu "$@"\n' \
    > "$q10.tmp/bin/qemu-system-x86_64"
  chmod +x "$q10.tmp"/bin/*
  rm -rf "$q10.tmp/debs" "$q10"
  mv "$q10.tmp" "$q10"
  "$q10/bin/qemu-system-x86_64" --version | head -1 >&2
fi

# A second libvirt, 11.3 from the same backports, unpacked and never installed: tests/libvirtd11.sh runs its libvirtd beside
# the system's, in a mount namespace of its own, for the libvirt tests with QEMU 10.0.
lv11="$deps/libvirt-11.3"
if [ ! -x "$lv11/root/usr/sbin/libvirtd" ]; then
  suite=bookworm-backports
  prepare_suite "$suite"
  rm -rf "$lv11.tmp" && mkdir -p "$lv11.tmp/debs"
  (cd "$lv11.tmp/debs" && extra_apt "$suite" apt-get download -q libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-common \
      libvirt-daemon-log libvirt-common libvirt0 libvirt-clients >&2 2> >(grep -v unsandboxed >&2))
  for f in "$lv11.tmp"/debs/*.deb; do dpkg-deb -x "$f" "$lv11.tmp/root"; done
  version="$(dpkg-deb -f "$lv11.tmp"/debs/libvirt-daemon_*.deb Version)"
  case "$version" in 11.3.*) ;; *) echo "tests/install-deps.sh: $suite has libvirt $version, not 11.3" >&2; exit 1 ;; esac
  # The shared libraries it links, from the distribution.
  install_depends "$lv11.tmp/debs" '^lib' '^libvirt'
  rm -rf "$lv11.tmp/debs" "$lv11"
  mv "$lv11.tmp" "$lv11"
  echo "libvirt $version unpacked in $lv11" >&2
fi

guest="$deps/guest"
if [ ! -s "$guest/vmlinuz" ]; then
  rm -rf "$guest.tmp" && mkdir -p "$guest.tmp/debs"
  apt_update
  (cd "$guest.tmp/debs" && apt-get download -q linux-image-cloud-amd64 >&2 2> >(grep -v unsandboxed >&2))
  image="$(dpkg-deb -f "$guest.tmp"/debs/linux-image-cloud-amd64_*.deb Depends | tr ',' '\n' | sed -e 's/(.*//' -e 's/ //g' | grep '^linux-image-' | head -1)"
  (cd "$guest.tmp/debs" && apt-get download -q "$image" >&2 2> >(grep -v unsandboxed >&2))
  dpkg-deb -x "$guest.tmp"/debs/"$image"_*.deb "$guest.tmp/x"
  kver="$(ls "$guest.tmp/x/lib/modules" | head -1)"
  mkdir -p "$guest.tmp/modules"
  cp "$guest.tmp"/x/boot/vmlinuz-* "$guest.tmp/vmlinuz"
  # The virtio drivers the test guests need (the cloud kernel builds them as modules).
  for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk failover net_failover virtio_net; do
    f="$(find "$guest.tmp/x/lib/modules/$kver" -name "$m.ko*" | head -1)"
    [ -n "$f" ] || { echo "tests/install-deps.sh: module $m not in $image" >&2; exit 1; }
    cp "$f" "$guest.tmp/modules/"
  done
  echo "$kver" > "$guest.tmp/version"
  rm -rf "$guest.tmp/debs" "$guest.tmp/x" "$guest"
  mv "$guest.tmp" "$guest"
  echo "guest kernel $kver" >&2
fi

# ---- The native build and the package tests (packaging/build-deb.sh, tests/Vmsnap.Tests/Native) -----------
# A C toolchain for the AOT compiler to link with, dpkg-deb and objdump for the package, debootstrap for the clean
# Debian 12 root (debian_root above).
native_deps() {
  local need=()
  command -v gcc >/dev/null || command -v clang >/dev/null || need+=(gcc)
  command -v objdump >/dev/null || need+=(binutils)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  if [ ${#need[@]} -gt 0 ]; then
    as_root "install ${need[*]}"
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
  fi
}

native_deps
if [ "${1:-}" = --without-debian-root ]; then echo "VMSNAP_DEBIAN_ROOT=$deps/debian12-minbase.tar.gz"; else debian_root; fi
echo "VMSNAP_QEMU10=$q10/bin"
echo "VMSNAP_GUEST=$guest"
