#!/usr/bin/env python3
"""Live savevm/loadvm benchmark (issue 9): vmsnap savevm/loadvm of a running QEMU against QEMU's own, one run.

One guest: machine pc, SIZE (default 1G) of RAM in a memory-backend-file the host fills with random data
before QEMU starts (the guest runs SeaBIOS, which finds nothing to boot and idles, so the RAM stays
random), one qcow2 drive in the disk folder. Operations, alternated over ROUNDS rounds (default 3),
medians reported, each on a fresh QEMU and a fresh image:
  qemu savevm none        HMP savevm, drive cache=none
  qemu savevm writeback   HMP savevm, drive cache=writeback
  qemu snapshot-save      the QMP snapshot-save job (cache=writeback)
  vmsnap savevm           stopped guest (vmsnap's --json seconds; process wall time and peak RSS beside)
  vmsnap savevm --live    guest running during the save; downtime-seconds from QEMU's STOP/RESUME events
  qemu migrate to file    migrate "exec:cat > FILE" with the guest stopped and max-bandwidth 0: the rate
                          at which QEMU produces the stream (no fsync, as a plain migration does not sync)
  qemu loadvm             HMP loadvm on a fresh paused QEMU (the code -loadvm runs), of QEMU's own snapshot,
                          drive cache=none (reads bypass the page cache, as vmsnap's do)
  qemu snapshot-load      the QMP snapshot-load job, same snapshot, cache=none
  vmsnap loadvm           into a fresh QEMU started with -incoming defer -S, of vmsnap's snapshot
Every load is checked: the guest RAM file after the load equals the source RAM (cmp). vmsnap's peak
memory (VmHWM, via wait4) is measured for guests of SIZE and 2 x SIZE.
Targets (issue 9): vmsnap savevm <= 1.2 x migrate-to-file and <= 0.5 x QEMU savevm writeback; --live
downtime <= 0.5 s; vmsnap loadvm >= 3 x faster than QEMU's loadvm; peak memory flat.
"""
import json, os, shutil, socket, statistics, subprocess, sys, tempfile, time

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMSNAP = ["dotnet", os.path.join(ROOT, "src/Vmsnap.Cli/bin/Release/net10.0/vmsnap.dll")]
QEMU = os.environ.get("QEMU", "qemu-system-x86_64")
# BASELINE=DIR: a checkout of another commit, built with `dotnet build src/Vmsnap.Cli -c Release`; its
# vmsnap savevm, savevm --live and loadvm then run in every round beside this build's, for before/after
# figures in one run.
BASELINE = os.environ.get("BASELINE", "")
VMSNAP_BASE = ["dotnet", os.path.join(os.path.abspath(BASELINE), "src/Vmsnap.Cli/bin/Release/net10.0/vmsnap.dll")] if BASELINE else None
QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")


def parse_size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        for _ in range(600):
            try:
                self.s.connect(path)
                break
            except OSError:
                time.sleep(0.02)
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
                raise RuntimeError(f"QMP {name}: {r['error']['desc']}")

    def hmp(self, line):
        out = self.cmd("human-monitor-command", **{"command-line": line})
        if out.strip():
            raise RuntimeError(f"QEMU: {line}: {out.strip()}")

    def wait_job(self, job):
        while True:
            for j in self.cmd("query-jobs"):
                if j["id"] == job and j["status"] == "concluded":
                    if j.get("error"):
                        raise RuntimeError(f"job {job}: {j['error']}")
                    self.cmd("job-dismiss", id=job)
                    return
            time.sleep(0.005)


class Guest:
    """A QEMU with the guest's RAM file and one qcow2 drive; a QMP socket for the script, one for vmsnap."""

    def __init__(self, work, ram, image, cache="writeback", extra=()):
        size = os.path.getsize(ram)
        self.sock = tempfile.mktemp(prefix="qmp", dir=work)
        self.vsock = tempfile.mktemp(prefix="vmsnap", dir=work)
        args = [QEMU, "-machine", "pc,memory-backend=ram0", "-accel", "tcg", "-m", f"{size // MiB}M",
                "-object", f"memory-backend-file,id=ram0,size={size},mem-path={ram},share=on",
                "-drive", f"file={image},if=virtio,format=qcow2,cache={cache}",
                "-nodefaults", "-display", "none", "-boot", "reboot-timeout=-1",
                "-qmp", f"unix:{self.sock},server=on,wait=off", "-qmp", f"unix:{self.vsock},server=on,wait=off", *extra]
        self.p = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        self.q = Qmp(self.sock)

    def quit(self):
        try:
            self.q.cmd("quit")
        except Exception:
            pass
        try:
            self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()
        for s in (self.sock, self.vsock):
            if os.path.exists(s):
                os.unlink(s)


def vmsnap(*args, exe=None):
    """vmsnap (or the baseline's, with exe) with --json: (result, wall seconds, peak RSS MiB)."""
    t0 = time.perf_counter()
    p = subprocess.Popen((exe or VMSNAP) + list(args) + ["--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"vmsnap {' '.join(args)}: {err.decode().strip()}")
    return json.loads(out), wall, usage.ru_maxrss / 1024


def fresh_image(path):
    if os.path.exists(path):
        os.unlink(path)
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", path, "1G"], check=True)


def make_ram(path, size):
    with open(path, "wb") as f:
        for _ in range(size // (8 * MiB)):
            f.write(os.urandom(8 * MiB))


def same(a, b):
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


def blank(path, size):
    with open(path, "wb") as f:
        f.truncate(size)


def op_qemu_savevm(work, ram, image, cache):
    fresh_image(image)
    g = Guest(work, ram, image, cache)
    try:
        time.sleep(0.3)
        t0 = time.perf_counter()
        g.q.hmp("savevm bench")
        return time.perf_counter() - t0
    finally:
        g.quit()


def op_qemu_snapshot_save(work, ram, image):
    fresh_image(image)
    g = Guest(work, ram, image)
    try:
        time.sleep(0.3)
        node = g.q.cmd("query-block")[0]["inserted"]["node-name"]
        t0 = time.perf_counter()
        g.q.cmd("snapshot-save", **{"job-id": "s", "tag": "bench", "vmstate": node, "devices": [node]})
        g.q.wait_job("s")
        return time.perf_counter() - t0
    finally:
        g.quit()


def op_vmsnap_savevm(work, ram, image, live, exe=None):
    fresh_image(image)
    g = Guest(work, ram, image)
    try:
        time.sleep(0.3)
        r, wall, rss = vmsnap("savevm", "--qmp", g.vsock, "bench", *(["--live"] if live else []), exe=exe)
        return r, wall, rss
    finally:
        g.quit()


def op_migrate_to_file(work, ram, image, target):
    fresh_image(image)
    g = Guest(work, ram, image)
    try:
        time.sleep(0.3)
        g.q.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
        g.q.cmd("stop")
        if os.path.exists(target):
            os.unlink(target)
        t0 = time.perf_counter()
        g.q.cmd("migrate", uri=f"exec:cat > {target}")
        while g.q.cmd("query-migrate")["status"] not in ("completed", "failed"):
            time.sleep(0.002)
        dt = time.perf_counter() - t0
        return dt, os.path.getsize(target)
    finally:
        g.quit()
        if os.path.exists(target):
            os.unlink(target)


def op_qemu_load(work, image, size, source, how):
    # cache=none: QEMU reads the VM state with O_DIRECT, as vmsnap does, not from a page cache the save
    # left warm (vmsnap's own O_DIRECT writes leave nothing there).
    target = os.path.join(os.path.dirname(source), "loaded.ram")
    blank(target, size)
    g = Guest(work, target, image, cache="none", extra=["-S"])
    try:
        t0 = time.perf_counter()
        if how == "hmp":
            g.q.hmp("loadvm qemu")
        else:
            node = g.q.cmd("query-block")[0]["inserted"]["node-name"]
            g.q.cmd("snapshot-load", **{"job-id": "l", "tag": "qemu", "vmstate": node, "devices": [node]})
            g.q.wait_job("l")
        dt = time.perf_counter() - t0
        return dt, same(source, target)
    finally:
        g.quit()
        os.unlink(target)


def op_vmsnap_load(work, image, size, source, tag, exe=None):
    target = os.path.join(os.path.dirname(source), "loaded.ram")
    blank(target, size)
    g = Guest(work, target, image, extra=["-incoming", "defer", "-S"])
    try:
        r, wall, rss = vmsnap("loadvm", "--qmp", g.vsock, tag, exe=exe)
        return r["seconds"], wall, rss, same(source, target)
    finally:
        g.quit()
        os.unlink(target)


def loadavg():
    return " ".join(open("/proc/loadavg").read().split()[:3])


def median(xs):
    return statistics.median(xs)


def main():
    size_text = os.environ.get("SIZE", "1G")
    size = parse_size(size_text)
    rounds = int(os.environ.get("ROUNDS", "3"))
    disk = os.path.abspath(os.environ.get("DIR", os.path.join(ROOT, "bench/.scratch")))
    shm = os.environ.get("SHM", "/dev/shm/vmsnap-live-bench")
    os.makedirs(disk, exist_ok=True)
    os.makedirs(shm, exist_ok=True)
    work = tempfile.mkdtemp(prefix="vmsnap-live-")
    qemu_version = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    print(f"# live savevm/loadvm benchmark {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: guest RAM {size_text} random, "
          f"{rounds} rounds, {os.cpu_count()} cores, load {open('/proc/loadavg').read().split()[0]}")
    print(f"# {qemu_version}; image in {disk}; guest RAM in {shm}")
    ram = os.path.join(shm, "guest.ram")
    image = os.path.join(disk, "live-bench.qcow2")
    stream = os.path.join(disk, "live-bench.stream")
    t = {k: [] for k in ("qemu_none", "qemu_wb", "qemu_job", "vmsnap", "vmsnap_wall", "live", "live_wall", "live_down", "live_qemu_down",
                         "migrate", "qemu_loadvm", "qemu_load_job", "vmsnap_load", "vmsnap_load_wall",
                         "base", "base_live", "base_live_down", "base_load")}
    notes = []
    try:
        make_ram(ram, size)
        limit = subprocess.run([os.path.join(ROOT, "bench/disk_limit.sh"), disk, size_text], capture_output=True, text=True).stdout
        vm_bytes = 0
        for r in range(rounds):
            t["qemu_none"].append(op_qemu_savevm(work, ram, image, "none"))
            t["migrate"].append(op_migrate_to_file(work, ram, image, stream)[0])
            res, wall, rss = op_vmsnap_savevm(work, ram, image, live=False)
            t["vmsnap"].append(res["seconds"]); t["vmsnap_wall"].append(wall)
            vm_bytes = res["bytes"]
            t["qemu_wb"].append(op_qemu_savevm(work, ram, image, "writeback"))
            res, wall, rss = op_vmsnap_savevm(work, ram, image, live=True)
            t["live"].append(res["seconds"]); t["live_wall"].append(wall); t["live_down"].append(res["downtime-seconds"]); t["live_qemu_down"].append(res["qemu-downtime-seconds"])
            t["qemu_job"].append(op_qemu_snapshot_save(work, ram, image))
            if VMSNAP_BASE:
                res, _, _ = op_vmsnap_savevm(work, ram, image, live=False, exe=VMSNAP_BASE)
                t["base"].append(res["seconds"])
                res, _, _ = op_vmsnap_savevm(work, ram, image, live=True, exe=VMSNAP_BASE)
                t["base_live"].append(res["seconds"]); t["base_live_down"].append(res["downtime-seconds"])
            print(f"# round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in t.items() if v) + f"; load {loadavg()}", flush=True)

        # Loads: one image with QEMU's snapshot "qemu" and vmsnap's "vmsnap" of the same guest, stopped
        # (so both hold the same RAM, copied aside as the reference every load is compared with).
        fresh_image(image)
        reference = os.path.join(shm, "reference.ram")
        g = Guest(work, ram, image)
        try:
            time.sleep(0.3)
            g.q.cmd("stop")
            g.q.hmp("savevm qemu")
            vmsnap("savevm", "--qmp", g.vsock, "vmsnap")
            shutil.copyfile(ram, reference)
        finally:
            g.quit()
        os.unlink(ram)
        ram = reference
        for r in range(rounds):
            dt, ok = op_qemu_load(work, image, size, ram, "hmp")
            t["qemu_loadvm"].append(dt)
            if not ok: notes.append("qemu loadvm: RAM differs")
            dt, ok = op_qemu_load(work, image, size, ram, "job")
            t["qemu_load_job"].append(dt)
            if not ok: notes.append("qemu snapshot-load: RAM differs")
            secs, wall, rss, ok = op_vmsnap_load(work, image, size, ram, "vmsnap")
            t["vmsnap_load"].append(secs); t["vmsnap_load_wall"].append(wall)
            if not ok: notes.append("vmsnap loadvm: RAM differs")
            if VMSNAP_BASE:
                secs, _, _, ok = op_vmsnap_load(work, image, size, ram, "vmsnap", exe=VMSNAP_BASE)
                t["base_load"].append(secs)
                if not ok: notes.append("vmsnap loadvm (baseline): RAM differs")
            print(f"# load round {r + 1}: qemu_loadvm {t['qemu_loadvm'][-1]:.3f}, qemu_load_job {t['qemu_load_job'][-1]:.3f}, "
                  f"vmsnap_load {t['vmsnap_load'][-1]:.3f}; load {loadavg()}", flush=True)
        check = subprocess.run([QEMU_IMG, "check", image], capture_output=True, text=True)

        report(size, vm_bytes, limit, t, check.returncode == 0, notes)
        memory(work, disk, shm, size)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        for f in (image, stream):
            if os.path.exists(f):
                os.unlink(f)


def report(size, vm_bytes, limit, t, clean, notes):
    m = {k: median(v) for k, v in t.items() if v}
    print()
    print(f"## guest RAM {size // MiB} MiB random; VM state {vm_bytes / MiB:.0f} MiB; disk (fio 1 MiB O_DIRECT): "
          + ", ".join(f"{k} {v} MiB/s" for k, v in (l.split() for l in limit.splitlines())))
    print(f"{'operation':36} {'median s':>9} {'MiB/s':>7}  {'all runs':<28} notes")

    def row(name, key, note=""):
        runs = " ".join(f"{x:.2f}" for x in t[key])
        print(f"{name:36} {m[key]:9.3f} {vm_bytes / m[key] / MiB:7.0f}  {runs:<28} {note}")
    row("qemu savevm (HMP) cache=none", "qemu_none")
    row("qemu savevm (HMP) cache=writeback", "qemu_wb")
    row("qemu snapshot-save job", "qemu_job")
    row("qemu migrate to file (unthrottled)", "migrate", "the rate QEMU produces the stream")
    row("vmsnap savevm (stopped)", "vmsnap", f"process {m['vmsnap_wall']:.2f} s")
    row("vmsnap savevm --live", "live", f"process {m['live_wall']:.2f} s; guest stopped {m['live_down']:.3f} s (median), QEMU's part {m['live_qemu_down']:.3f} s")
    row("qemu loadvm (HMP, as -loadvm) none", "qemu_loadvm")
    row("qemu snapshot-load job, cache=none", "qemu_load_job")
    row("vmsnap loadvm (-incoming defer)", "vmsnap_load", f"process {m['vmsnap_load_wall']:.2f} s")
    if VMSNAP_BASE:
        row(f"baseline savevm (stopped)", "base")
        row(f"baseline savevm --live", "base_live", f"guest stopped {m['base_live_down']:.3f} s (median)")
        row(f"baseline loadvm (-incoming defer)", "base_load")
        print(f"this build / baseline: savevm {m['vmsnap'] / m['base']:.2f} x, savevm --live {m['live'] / m['base_live']:.2f} x "
              f"(stopped {m['live_down'] / m['base_live_down']:.2f} x), loadvm {m['vmsnap_load'] / m['base_load']:.2f} x")
    print(f"worst --live downtime {max(t['live_down']):.3f} s; load average at the end {loadavg()}")
    print()
    print("## targets")

    def target(name, value, limit_text, ok):
        print(f"{name:58} {value:>14}  target {limit_text:<10} {'met' if ok else 'NOT met'}")
    r1 = m["vmsnap"] / m["migrate"]
    target("vmsnap savevm / qemu migrate-to-file", f"{r1:.2f} x", "<= 1.2 x", r1 <= 1.2)
    r2 = m["vmsnap"] / m["qemu_wb"]
    target("vmsnap savevm / qemu savevm writeback", f"{r2:.2f} x", "<= 0.5 x", r2 <= 0.5)
    target("vmsnap savevm --live: guest stopped (median)", f"{m['live_down']:.3f} s", "<= 0.5 s", m["live_down"] <= 0.5)
    target("vmsnap savevm --live: guest stopped (worst)", f"{max(t['live_down']):.3f} s", "<= 0.5 s", max(t["live_down"]) <= 0.5)
    r3 = m["qemu_loadvm"] / m["vmsnap_load"]
    target("qemu loadvm / vmsnap loadvm", f"{r3:.2f} x faster", ">= 3 x", r3 >= 3)
    print(f"qemu-img check of the load image: {'clean' if clean else 'PROBLEMS'}; every load's RAM "
          + ("matches the source" if not notes else "; ".join(notes)))


def memory(work, disk, shm, size):
    print()
    print("## vmsnap peak memory (VmHWM) by guest size")
    print(f"{'guest RAM':>10} {'savevm MiB':>11} {'savevm --live MiB':>18} {'loadvm MiB':>11}")
    for n in (size, 2 * size):
        ram = os.path.join(shm, "scale.ram")
        make_ram(ram, n)
        image = os.path.join(disk, "live-scale.qcow2")
        fresh_image(image)
        g = Guest(work, ram, image)
        try:
            time.sleep(0.3)
            _, _, save_rss = vmsnap("savevm", "--qmp", g.vsock, "s")
            _, _, live_rss = vmsnap("savevm", "--qmp", g.vsock, "l", "--live")
        finally:
            g.quit()
        _, _, load_rss, _ = op_vmsnap_load(work, image, n, ram, "l")
        os.unlink(ram)
        os.unlink(image)
        print(f"{n // MiB:>7} MiB {save_rss:11.0f} {live_rss:18.0f} {load_rss:11.0f}")


if __name__ == "__main__":
    main()
