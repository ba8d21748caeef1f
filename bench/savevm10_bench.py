#!/usr/bin/env python3
"""Save/restore benchmark against QEMU 10 (issue 10): vmsnap beside QEMU 10's savevm and its `migrate file:`
fast paths, in one run, on the same guest RAM. Not a test.

One device-less guest (-machine none) of SIZE bytes of random RAM (a memory-backend-file in /dev/shm that the
host fills; QEMU never runs it). Per round, in rotating order, every save method runs once:
  qemu10 savevm wb        QEMU 10 HMP savevm into a fresh qcow2 (cache=writeback)
  qemu10 savevm none      the same, cache=none (O_DIRECT)
  qemu10 file plain       QEMU 10 `migrate file:` (plain stream), max-bandwidth unthrottled
  qemu10 file mr          ... with capability mapped-ram
  qemu10 file mr+mfd      ... mapped-ram + multifd (MULTIFD channels)
  qemu10 file mr+mfd+dio  ... mapped-ram + multifd + direct-io
  vmsnap save             vmsnap save into a fresh qcow2 internal snapshot (buffered, O_DIRECT)
and every restore method:
  qemu10 loadvm           QEMU 10 HMP loadvm of its own savevm snapshot (cache=none)
  qemu10 loadvm vmsnap    QEMU 10 HMP loadvm of vmsnap's snapshot
  qemu10 incoming mr+mfd+dio   `migrate-incoming file:` (mapped-ram + multifd + direct-io) of a file written by
                          `vmsnap export --mapped-ram` (its time shown as "vmsnap export --mapped-ram")
  vmsnap load             vmsnap load of its snapshot into a fresh RAM file
Times are the operations' own: QEMU's HMP command, or migrate/migrate-incoming to "completed" (polled every
5 ms); vmsnap's --json seconds (image open to its fdatasync and snapshot switch). A `file:` save leaves its data
in the page cache (except direct-io's pages), so the table also gives each file save plus the fdatasync of its
file (measured right after), which is what vmsnap's time includes. Every restore is checked against the source RAM
with cmp. Medians over ROUNDS; ratios against vmsnap save and the fastest QEMU file: save in the same run. The
disk's own limit (fio, bench/disk_limit.sh) is measured at the start of each round.
"""
import json, os, shutil, socket, subprocess, sys, tempfile, time

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMSNAP = ["dotnet", os.path.join(ROOT, "src/Vmsnap.Cli/bin/Release/net10.0/vmsnap.dll")]
QEMU10 = os.environ.get("VMSNAP_QEMU10") or os.path.join(ROOT, "tests/.deps/qemu-10.0/bin")
QEMU = os.path.join(QEMU10, "qemu-system-x86_64")
QEMU_IMG = os.path.join(QEMU10, "qemu-img")
CHANNELS = int(os.environ.get("MULTIFD", "2"))


def parse_size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


def make_ram(path, size):
    with open(path, "wb") as f:
        for _ in range(0, size, 16 * MiB):
            f.write(os.urandom(16 * MiB))


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        for _ in range(400):
            try:
                self.s.connect(path)
                break
            except OSError:
                time.sleep(0.05)
        self.f = self.s.makefile("rwb")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"QMP {name}: {r['error']}")

    def hmp(self, line):
        out = self.cmd("human-monitor-command", **{"command-line": line})
        if out.strip():
            raise RuntimeError(f"QEMU: {line}: {out.strip()}")


class Guest:
    """A paused QEMU 10 machine-none guest whose RAM is the file `ram` (optionally with a drive, or incoming)."""

    def __init__(self, ram, image=None, cache="none", incoming=False):
        size = os.path.getsize(ram)
        self.sock = tempfile.mktemp(suffix=".qmp")
        args = [QEMU, "-machine", "none", "-m", f"{size // MiB}M",
                "-object", f"memory-backend-file,id=ram0,size={size},mem-path={ram},share=on",
                "-machine", "memory-backend=ram0", "-nodefaults", "-display", "none", "-S",
                "-qmp", f"unix:{self.sock},server=on,wait=off"]
        if image:
            args += ["-drive", f"if=none,file={image},id=d0,format=qcow2,cache={cache}"]
        if incoming:
            args += ["-incoming", "defer"]
        self.p = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        self.q = Qmp(self.sock)

    def caps(self, caps, direct_io=False):
        if caps:
            self.q.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in caps])
        params = {"max-bandwidth": 1 << 40}
        if "multifd" in caps:
            params["multifd-channels"] = CHANNELS
        if direct_io:
            params["direct-io"] = True
        self.q.cmd("migrate-set-parameters", **params)

    def wait(self):
        while True:
            s = self.q.cmd("query-migrate").get("status")
            if s == "completed":
                return
            if s in ("failed", "cancelled"):
                raise RuntimeError(f"migration {s}: {self.q.cmd('query-migrate').get('error-desc')}")
            if s is None and self.q.cmd("query-status")["status"] not in ("inmigrate",):
                return
            time.sleep(0.005)

    def close(self):
        try:
            self.q.cmd("quit")
            self.p.wait(timeout=120)
        finally:
            if self.p.poll() is None:
                self.p.kill()
            if os.path.exists(self.sock):
                os.unlink(self.sock)


def hmp_op(ram, image, cache, op):
    g = Guest(ram, image, cache)
    try:
        t0 = time.perf_counter()
        g.q.hmp(op)
        return time.perf_counter() - t0
    finally:
        g.close()


def fdatasync(path):
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def file_save(ram, path, caps, direct_io=False):
    """QEMU 10 migrate file:PATH; returns (seconds to completed, seconds of the fdatasync after)."""
    if os.path.exists(path):
        os.unlink(path)
    g = Guest(ram)
    try:
        g.caps(caps, direct_io)
        t0 = time.perf_counter()
        g.q.cmd("migrate", uri=f"file:{path}")
        g.wait()
        dt = time.perf_counter() - t0
    finally:
        g.close()
    return dt, fdatasync(path)


def file_restore(target, path, caps, direct_io):
    g = Guest(target, incoming=True)
    try:
        g.caps(caps, direct_io)
        t0 = time.perf_counter()
        g.q.cmd("migrate-incoming", uri=f"file:{path}")
        g.wait()
        return time.perf_counter() - t0
    finally:
        g.close()


def vmsnap_json(*args):
    p = subprocess.run(VMSNAP + list(args) + ["--json"], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"vmsnap {' '.join(args)}: {p.stderr.strip()}")
    return json.loads(p.stdout)


def fresh_image(path):
    if os.path.exists(path):
        os.unlink(path)
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", path, "1G"], check=True)


def same_file(a, b):
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


def empty_ram(path, size):
    if os.path.exists(path):
        os.unlink(path)
    with open(path, "wb") as f:
        f.truncate(size)


def disk_limit(folder, size):
    out = subprocess.run([os.path.join(ROOT, "bench/disk_limit.sh"), folder, size], check=True,
                         capture_output=True, text=True).stdout
    return {k: float(v) for k, v in (line.split() for line in out.splitlines())}


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


SAVES = ["qemu10 savevm wb", "qemu10 savevm none", "qemu10 file plain", "qemu10 file mr", "qemu10 file mr+mfd",
         "qemu10 file mr+mfd+dio", "vmsnap save"]
FILE_CAPS = {"qemu10 file plain": ([], False), "qemu10 file mr": (["mapped-ram"], False),
             "qemu10 file mr+mfd": (["mapped-ram", "multifd"], False),
             "qemu10 file mr+mfd+dio": (["mapped-ram", "multifd"], True)}


def main():
    size_text = os.environ.get("SIZE", "1G")
    size = parse_size(size_text)
    rounds = int(os.environ.get("ROUNDS", "3"))
    disk = os.path.abspath(os.environ.get("DIR", os.path.join(ROOT, "bench/.scratch")))
    shm = os.environ.get("SHM", "/dev/shm/vmsnap-savevm10")
    os.makedirs(disk, exist_ok=True)
    os.makedirs(shm, exist_ok=True)
    version = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    print(f"# QEMU 10 save/restore benchmark {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: guest RAM {size_text} "
          f"random, machine none, {rounds} rounds, {os.cpu_count()} cores, load {open('/proc/loadavg').read().split()[0]}")
    print(f"# {version}; multifd channels {CHANNELS}; images and files in {disk}; guest RAM in {shm}")
    ram = os.path.join(shm, "guest.ram")
    target = os.path.join(shm, "target.ram")
    times = {k: [] for k in SAVES}
    synced = {k: [] for k in FILE_CAPS}
    restores = {k: [] for k in ("qemu10 loadvm", "qemu10 loadvm vmsnap", "vmsnap export --mapped-ram",
                                "qemu10 incoming mr+mfd+dio", "vmsnap load")}
    limits, vm_bytes, checks = [], 0, []
    try:
        make_ram(ram, size)
        for rnd in range(rounds):
            limits.append(disk_limit(disk, size_text))
            order = SAVES[rnd % len(SAVES):] + SAVES[:rnd % len(SAVES)]
            for name in order:
                if name.startswith("qemu10 savevm"):
                    cache = "writeback" if name.endswith("wb") else "none"
                    img = os.path.join(disk, f"qemu-{cache}.qcow2")
                    fresh_image(img)
                    times[name].append(hmp_op(ram, img, cache, "savevm bench"))
                elif name in FILE_CAPS:
                    caps, dio = FILE_CAPS[name]
                    path = os.path.join(disk, "qemu-file.mig")
                    dt, sync = file_save(ram, path, caps, dio)
                    times[name].append(dt)
                    synced[name].append(dt + sync)
                    os.unlink(path)
                else:
                    img = os.path.join(disk, "vmsnap.qcow2")
                    fresh_image(img)
                    r = vmsnap_json("save", img, "--name", "bench", "--machine", "none", "--ram", f"ram0={ram}")
                    times[name].append(r["seconds"])
                    vm_bytes = r["vm-state-size"]
            # Restores of this round's snapshots.
            qimg, vimg = os.path.join(disk, "qemu-none.qcow2"), os.path.join(disk, "vmsnap.qcow2")
            for name, image in (("qemu10 loadvm", qimg), ("qemu10 loadvm vmsnap", vimg)):
                empty_ram(target, size)
                restores[name].append(hmp_op(target, image, "none", "loadvm bench"))
                checks.append((name, same_file(ram, target)))
            mr = os.path.join(disk, "vmsnap-export.mig")
            if os.path.exists(mr):
                os.unlink(mr)
            r = vmsnap_json("export", vimg, "bench", "-o", mr, "--mapped-ram")
            restores["vmsnap export --mapped-ram"].append(r["seconds"])
            empty_ram(target, size)
            restores["qemu10 incoming mr+mfd+dio"].append(file_restore(target, mr, ["mapped-ram", "multifd"], True))
            checks.append(("qemu10 incoming mr+mfd+dio", same_file(ram, target)))
            os.unlink(mr)
            os.unlink(target)
            r = vmsnap_json("load", vimg, "bench", "--ram", f"ram0={target}")
            restores["vmsnap load"].append(r["seconds"])
            checks.append(("vmsnap load", same_file(ram, target)))
            os.unlink(target)
            check = subprocess.run([QEMU_IMG, "check", vimg], capture_output=True, text=True)
            checks.append(("qemu-img check of vmsnap's image", check.returncode == 0))
        report(size, vm_bytes, times, synced, restores, limits, checks)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        for f in ("qemu-writeback.qcow2", "qemu-none.qcow2", "vmsnap.qcow2", "qemu-file.mig", "vmsnap-export.mig"):
            p = os.path.join(disk, f)
            if os.path.exists(p):
                os.unlink(p)


def report(size, vm_bytes, times, synced, restores, limits, checks):
    fio_w = median([l["write_qd8"] for l in limits])
    fio_r = median([l["read_qd8"] for l in limits])
    fio_s = vm_bytes / (fio_w * MiB)
    vm = median(times["vmsnap save"])
    fastest = min(FILE_CAPS, key=lambda k: median(times[k]))
    fastest_synced = min(FILE_CAPS, key=lambda k: median(synced[k]))
    print()
    each = ", ".join("%.0f" % l["write_qd8"] for l in limits)
    print(f"## save: guest RAM {size // MiB} MiB, VM state {vm_bytes / MiB:.0f} MiB; fio 1 MiB O_DIRECT write qd8 "
          f"{fio_w:.0f} MiB/s (median of {len(limits)}: {each}) = {fio_s:.3f} s")
    print(f"{'operation':28} {'median s':>9} {'MiB/s':>7} {'x vmsnap':>9} {'+fdatasync s':>13}  runs")
    for name in SAVES:
        m = median(times[name])
        extra = f"{median(synced[name]):13.3f}" if name in synced else f"{'':13}"
        print(f"{name:28} {m:9.3f} {vm_bytes / m / MiB:7.0f} {m / vm:9.2f} {extra}  " +
              " ".join(f"{t:.3f}" for t in times[name]))
    print(f"# vmsnap save vs QEMU 10's fastest file: save ({fastest}, {median(times[fastest]):.3f} s): "
          f"{vm / median(times[fastest]):.2f} x its time; with the file's fdatasync ({fastest_synced}, "
          f"{median(synced[fastest_synced]):.3f} s): {vm / median(synced[fastest_synced]):.2f} x; vmsnap vs fio {vm / fio_s:.2f} x")
    print()
    print(f"## restore; fio 1 MiB O_DIRECT read qd8 {fio_r:.0f} MiB/s = {vm_bytes / (fio_r * MiB):.3f} s")
    load = median(restores["vmsnap load"])
    print(f"{'operation':28} {'median s':>9} {'MiB/s':>7} {'x vmsnap load':>14}  runs")
    for name, ts in restores.items():
        m = median(ts)
        print(f"{name:28} {m:9.3f} {vm_bytes / m / MiB:7.0f} {m / load:14.2f}  " + " ".join(f"{t:.3f}" for t in ts))
    bad = [n for n, ok in checks if not ok]
    print(f"# RAM checks and qemu-img check: {'all good' if not bad else 'FAILED: ' + ', '.join(sorted(set(bad)))}")


if __name__ == "__main__":
    main()
