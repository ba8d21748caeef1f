#!/usr/bin/env bash
# Starts Debian's libvirtd (with virtlogd) on a machine without systemd, for the libvirt tests
# (tests/Vmsnap.Tests/Libvirt); idempotent: exits 0 at once when qemu:///system already answers.
# What it sets up, before libvirtd starts (never while it runs):
#   - the folders libvirtd expects that a system without systemd-tmpfiles lacks;
#   - the libvirt-qemu user the QEMU driver refuses to start without;
#   - /etc/libvirt/qemu.conf, only when there is none: QEMU runs as root, with no security driver, cgroups or
#     namespaces (a container or CI machine has none of them to give).
# libvirtd runs under tini as a subreaper, when tini is there: libvirt's destroy waits until QEMU's process is gone, reaped,
# and QEMU is a daemon whose parent is whoever reaps orphans. systemd, as PID 1, reaps at once; the PID 1 of these machines
# reaps every 1-2 s (measured: a killed QEMU stays a zombie 1.0-1.9 s), which every destroy, and every revert that starts a
# new QEMU, would pay. Under tini the machine behaves as a host with systemd does.
# Needs root. Prints nothing on success; on failure, the end of libvirtd's log.
set -u
uri=qemu:///system
virsh -c "$uri" version >/dev/null 2>&1 && exit 0
if [ "$(id -u)" -ne 0 ]; then echo "tests/libvirtd.sh: need root to start libvirtd" >&2; exit 1; fi
command -v libvirtd >/dev/null || { echo "tests/libvirtd.sh: libvirtd is missing (run tests/install-deps.sh)" >&2; exit 1; }
mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/qemu /run/libvirt /etc/libvirt
getent group kvm >/dev/null || groupadd -r kvm
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
id libvirt-qemu >/dev/null 2>&1 || useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
if [ ! -e /etc/libvirt/qemu.conf ]; then
  printf '%s\n' '# Written by vmsnap tests/libvirtd.sh: QEMU as root, without security driver, cgroups or namespaces.' \
    'user = "root"' 'group = "root"' 'dynamic_ownership = 0' 'security_driver = "none"' 'cgroup_controllers = [ ]' 'namespaces = [ ]' \
    > /etc/libvirt/qemu.conf
fi
# The system's daemon by its pid file (libvirt 11.3's, tests/libvirtd11.sh, has the same name and keeps its own). A daemon that
# was killed can stay a zombie for a while (until it is reaped): only a live one counts as running.
running() {
  local pid
  pid="$(cat "/run/$1.pid" 2>/dev/null)" || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] && [ "$(awk '{print $3}' "/proc/$pid/stat")" != Z ]
}
running virtlogd || virtlogd -d
if ! running libvirtd; then
  if command -v tini >/dev/null; then setsid -f tini -s -- libvirtd </dev/null >>/var/log/libvirt/libvirtd.log 2>&1; else libvirtd -d; fi
fi
for _ in $(seq 100); do virsh -c "$uri" version >/dev/null 2>&1 && exit 0; sleep 0.2; done
echo "tests/libvirtd.sh: libvirtd did not answer on $uri: $(tail -3 /var/log/libvirt/libvirtd.log 2>/dev/null)" >&2
exit 1
