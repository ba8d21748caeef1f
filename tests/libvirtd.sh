#!/usr/bin/env bash
# Starts Debian's libvirtd (with virtlogd) on a machine without systemd, for the libvirt tests
# (tests/Vmsnap.Tests/Libvirt); idempotent: exits 0 at once when qemu:///system already answers.
# What it sets up, before libvirtd starts (never while it runs):
#   - the folders libvirtd expects that a system without systemd-tmpfiles lacks;
#   - the libvirt-qemu user the QEMU driver refuses to start without;
#   - /etc/libvirt/qemu.conf, only when there is none: QEMU runs as root, with no security driver, cgroups or
#     namespaces (a container or CI machine has none of them to give).
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
# A daemon that was killed can stay a zombie for a while (until PID 1 reaps it): only a live one counts as running.
running() { ps -C "$1" -o stat= 2>/dev/null | grep -qv '^Z'; }
running virtlogd || virtlogd -d
running libvirtd || libvirtd -d
for _ in $(seq 100); do virsh -c "$uri" version >/dev/null 2>&1 && exit 0; sleep 0.2; done
echo "tests/libvirtd.sh: libvirtd did not answer on $uri: $(tail -3 /var/log/libvirt/libvirtd.log 2>/dev/null)" >&2
exit 1
