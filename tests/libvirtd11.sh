#!/usr/bin/env bash
# Starts a second libvirtd, libvirt 11.3 from Debian 12's backports (unpacked by tests/install-deps.sh into
# tests/.deps/libvirt-11.3, never installed), beside the system's libvirt 9.0, for the libvirt tests with QEMU 10.0.
# It runs in a mount namespace of its own, where libvirt's folders (/etc/libvirt, /run/libvirt, /var/lib/libvirt,
# /var/log/libvirt, /var/cache/libvirt) are folders of tests/.deps/libvirt-11.3/state and its drivers, data and helpers
# are those it was unpacked with: the system's libvirtd and its domains never see it, nor it them. Clients reach it at
# qemu:///system?socket=tests/.deps/libvirt-11.3/state/run/libvirt-sock (the path absolute); printed on success.
# Idempotent: prints the URI at once when that socket already answers. Needs root; under tini when there (libvirtd.sh says why).
set -u
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/.deps/libvirt-11.3/root"
state="$here/.deps/libvirt-11.3/state"
uri="qemu:///system?socket=$state/run/libvirt-sock"
if virsh -c "$uri" version >/dev/null 2>&1; then echo "$uri"; exit 0; fi
if [ "$(id -u)" -ne 0 ]; then echo "tests/libvirtd11.sh: need root to start libvirtd" >&2; exit 1; fi
[ -x "$root/usr/sbin/libvirtd" ] || { echo "tests/libvirtd11.sh: libvirt 11.3 is not unpacked in $root (run tests/install-deps.sh)" >&2; exit 1; }
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
id libvirt-qemu >/dev/null 2>&1 || useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
mkdir -p "$state"/{etc,run,lib/qemu,log/qemu,cache}
if [ ! -e "$state/etc/qemu.conf" ]; then
  printf '%s\n' '# Written by vmsnap tests/libvirtd11.sh: QEMU as root, without security driver, cgroups or namespaces.' \
    'user = "root"' 'group = "root"' 'dynamic_ownership = 0' 'security_driver = "none"' 'cgroup_controllers = [ ]' 'namespaces = [ ]' \
    > "$state/etc/qemu.conf"
fi
cp -n "$root/etc/libvirt/libvirtd.conf" "$root/etc/libvirt/virtlogd.conf" "$root/etc/libvirt/libvirt.conf" "$state/etc/" 2>/dev/null
# (Their pid files too: the system's daemons keep theirs in /run.) Only the daemon's own process and its children (virtlogd, QEMU) see these mounts.
inner='set -e
for m in "$R/usr/lib/x86_64-linux-gnu/libvirt:/usr/lib/x86_64-linux-gnu/libvirt" "$R/usr/share/libvirt:/usr/share/libvirt" \
         "$R/usr/lib/libvirt:/usr/lib/libvirt" "$S/etc:/etc/libvirt" "$S/run:/run/libvirt" "$S/lib:/var/lib/libvirt" \
         "$S/log:/var/log/libvirt" "$S/cache:/var/cache/libvirt"; do
  mkdir -p "${m#*:}"; mount --bind "${m%%:*}" "${m#*:}"
done
export LD_LIBRARY_PATH="$R/usr/lib/x86_64-linux-gnu"
"$R/usr/sbin/virtlogd" -d -p /run/libvirt/virtlogd.pid 2>/dev/null || true   # one left from a libvirtd killed before serves on
if command -v tini >/dev/null; then exec tini -s -- "$R/usr/sbin/libvirtd" -p /run/libvirt/libvirtd.pid; else exec "$R/usr/sbin/libvirtd" -p /run/libvirt/libvirtd.pid; fi'
R="$root" S="$state" setsid -f unshare --mount --propagation private -- bash -c "$inner" </dev/null >>"$state/log/libvirtd.out" 2>&1
for _ in $(seq 100); do
  if virsh -c "$uri" version >/dev/null 2>&1; then echo "$uri"; exit 0; fi
  sleep 0.2
done
echo "tests/libvirtd11.sh: libvirt 11.3's libvirtd did not answer on $uri: $(tail -3 "$state/log/libvirtd.out" 2>/dev/null)" >&2
exit 1
