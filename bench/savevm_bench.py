#!/usr/bin/env python3
"""Save/load benchmark (issue 5): vmsnap against real QEMU and against the disk's own limit, one run.

For each guest RAM file (random pages; half zero pages) of SIZE bytes, on the same disk folder:
  fio limit            bench/disk_limit.sh (1 MiB O_DIRECT writes, 8 in flight) -> expected time for the bytes
  qemu savevm none     QEMU 7.x savevm into a fresh qcow2 opened cache=none (O_DIRECT)
  qemu savevm wb       the same with cache=writeback
  vmsnap save gather   vmsnap save --mode gather (QEMU-like 32 KiB buffer)
  vmsnap save buffered vmsnap save (default: buffered, 8 x 1 MiB in flight, O_DIRECT)
  qemu loadvm          QEMU loadvm of its own snapshot (cache=none), guest RAM checked against the source
  qemu loadvm vmsnap's QEMU loadvm of vmsnap's snapshot (proves the format at full size), RAM checked
  vmsnap load          vmsnap load of its snapshot into a RAM file, checked against the source
Times are the operation's own (QEMU: the HMP command; vmsnap: its --json "seconds", open to fsync);
vmsnap's whole-process wall time and peak RSS are shown too. Guest RAM lives in /dev/shm (it is memory
for QEMU too); images live on the disk folder. Ratios compare like with like.
"""
import json, os, shutil, socket, subprocess, sys, tempfile, time

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMSNAP = ["dotnet", os.path.join(ROOT, "src/Vmsnap.Cli/bin/Release/net10.0/vmsnap.dll")]


def parse_size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


def make_ram(path, size, zero_every_other, seed):
    """Random pages; with zero_every_other, a seeded half of the pages are zero (left as holes)."""
    import random
    rnd = random.Random(seed)
    page = 4096
    with open(path, "wb") as f:
        f.truncate(size)
        chunk = 1 << 20
        for off in range(0, size, chunk):
            data = bytearray(os.urandom(chunk))
            if zero_every_other:
                for p in range(0, chunk, page):
                    if rnd.random() < 0.5:
                        data[p:p + page] = bytes(page)
            f.seek(off)
            f.write(data)


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


def qemu_op(ram, image, cache, op):
    """Starts a paused machine-none guest whose RAM is the file `ram`, runs HMP `op` on `image`, returns seconds."""
    size = os.path.getsize(ram)
    sock = tempfile.mktemp(suffix=".qmp")
    args = ["qemu-system-x86_64", "-machine", "none", "-m", f"{size // MiB}M",
            "-object", f"memory-backend-file,id=ram0,size={size},mem-path={ram},share=on",
            "-machine", "memory-backend=ram0", "-nodefaults", "-display", "none", "-S",
            "-drive", f"if=none,file={image},id=d0,format=qcow2,cache={cache}",
            "-qmp", f"unix:{sock},server=on,wait=off"]
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL)
    try:
        q = Qmp(sock)
        t0 = time.perf_counter()
        q.hmp(op)
        dt = time.perf_counter() - t0
        q.cmd("quit")
        p.wait(timeout=120)
        return dt
    finally:
        if p.poll() is None:
            p.kill()
        if os.path.exists(sock):
            os.unlink(sock)


def run_measured(cmd):
    """Runs a command, returns (stdout, wall seconds, peak RSS in MiB of that child)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {code}: {err.decode().strip()}")
    return out, wall, usage.ru_maxrss / 1024


def vmsnap_json(*args):
    out, wall, rss = run_measured(VMSNAP + list(args) + ["--json"])
    return json.loads(out), wall, rss


def same_file(a, b):
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


def fresh_image(path):
    if os.path.exists(path):
        os.unlink(path)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "1G"], check=True)


def disk_limit(folder, size):
    out = subprocess.run([os.path.join(ROOT, "bench/disk_limit.sh"), folder, size], check=True,
                         capture_output=True, text=True).stdout
    return {k: float(v) for k, v in (line.split() for line in out.splitlines())}


def main():
    size_text = os.environ.get("SIZE", "2G")
    size = parse_size(size_text)
    disk = os.path.abspath(os.environ.get("DIR", os.path.join(ROOT, "bench/.scratch")))
    shm = os.environ.get("SHM", "/dev/shm/vmsnap-savevm")
    os.makedirs(disk, exist_ok=True)
    os.makedirs(shm, exist_ok=True)
    print(f"# save/load benchmark {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: guest RAM {size_text}, "
          f"{os.cpu_count()} cores, load {open('/proc/loadavg').read().split()[0]}")
    print(f"# images in {disk}; guest RAM files in {shm}")
    print("# " + subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.splitlines()[0])
    try:
        rows = []
        for label, half_zero in (("random", False), ("half-zero", True)):
            ram = os.path.join(shm, f"{label}.ram")
            make_ram(ram, size, half_zero, seed=5)
            limit = disk_limit(disk, size_text)
            img = {k: os.path.join(disk, f"{label}-{k}.qcow2") for k in ("none", "wb", "gather", "buffered")}
            r = {"limit": limit}
            for cache, key in (("none", "none"), ("writeback", "wb")):
                fresh_image(img[key])
                r[f"qemu_save_{key}"] = qemu_op(ram, img[key], cache, "savevm bench")
            fresh_image(img["gather"])
            res, wall, rss = vmsnap_json("save", img["gather"], "--name", "bench", "--machine", "none",
                                         "--ram", f"ram0={ram}", "--mode", "gather")
            r["vmsnap_save_gather"] = (res["seconds"], wall, rss, res["vm-state-size"])
            # The disk's speed drifts by tens of percent within minutes: measure fio right before each
            # buffered save and take the median ratio of ROUNDS such pairs.
            rounds = []
            for _ in range(int(os.environ.get("ROUNDS", "3"))):
                before = disk_limit(disk, size_text)["write_qd8"]
                fresh_image(img["buffered"])
                res, wall, rss = vmsnap_json("save", img["buffered"], "--name", "bench", "--machine", "none",
                                             "--ram", f"ram0={ram}")
                fio_s = res["vm-state-size"] / (before * MiB)
                rounds.append((res["seconds"] / fio_s, res["seconds"], wall, rss, res["vm-state-size"], before))
            rounds.sort()
            ratio, secs, wall, rss, vm_bytes, _ = rounds[len(rounds) // 2]
            r["vmsnap_save_buffered"] = (secs, wall, rss, vm_bytes)
            r["interleaved"] = rounds
            # Loads, each into a fresh RAM file, checked against the source.
            target = os.path.join(shm, "loaded.ram")
            for key, image in (("qemu_load", img["none"]), ("qemu_load_vmsnap", img["buffered"])):
                with open(target, "wb") as f:
                    f.truncate(size)
                r[key] = (qemu_op(target, image, "none", "loadvm bench"), same_file(ram, target))
                os.unlink(target)
            res, wall, rss = vmsnap_json("load", img["buffered"], "bench", "--ram", f"ram0={target}")
            r["vmsnap_load"] = (res["seconds"], wall, rss, same_file(ram, target))
            os.unlink(target)
            check = subprocess.run(["qemu-img", "check", img["buffered"]], capture_output=True, text=True)
            r["check"] = check.returncode == 0
            rows.append((label, r))
            for k in img.values():
                os.unlink(k)
            os.unlink(ram)
        report(size, rows)
        memory_scaling(disk, shm)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def report(size, rows):
    for label, r in rows:
        vm_bytes = r["vmsnap_save_buffered"][3]
        fio_s = vm_bytes / (r["limit"]["write_qd8"] * MiB)
        fio_read_s = vm_bytes / (r["limit"]["read_qd8"] * MiB)
        print()
        print(f"## guest RAM {size // MiB} MiB, {label} pages; VM state {vm_bytes / MiB:.0f} MiB; "
              f"fio 1 MiB O_DIRECT: write qd8 {r['limit']['write_qd8']:.0f} MiB/s, qd1 {r['limit']['write_qd1']:.0f}, "
              f"read qd8 {r['limit']['read_qd8']:.0f}")
        print(f"{'operation':34} {'seconds':>8} {'MiB/s':>7} {'x fio':>6}  {'vmsnap buffered is':>20}  notes")
        buf = r["vmsnap_save_buffered"][0]

        def line(name, secs, note="", ref=fio_s, faster=buf):
            print(f"{name:34} {secs:8.3f} {vm_bytes / secs / MiB:7.0f} {secs / ref:6.2f}  "
                  f"{secs / faster:17.1f} x  {note}")
        print(f"{'fio (same bytes, write qd8)':34} {fio_s:8.3f} {r['limit']['write_qd8']:7.0f} {1:6.2f}")
        inter = r["interleaved"]
        print("# vmsnap buffered save vs fio measured just before it, per round: " +
              ", ".join(f"{x[1]:.3f} s at fio {x[5]:.0f} MiB/s = {x[0]:.2f} x" for x in inter) +
              f"; median {inter[len(inter) // 2][0]:.2f} x fio")
        line("qemu savevm cache=none", r["qemu_save_none"])
        line("qemu savevm cache=writeback", r["qemu_save_wb"])
        s, wall, rss, _ = r["vmsnap_save_gather"]
        line("vmsnap save --mode gather", s, f"process {wall:.2f} s, peak RSS {rss:.0f} MiB")
        s, wall, rss, _ = r["vmsnap_save_buffered"]
        line("vmsnap save (buffered)", s, f"process {wall:.2f} s, peak RSS {rss:.0f} MiB")
        load = r["vmsnap_load"][0]
        print(f"{'operation':34} {'seconds':>8} {'MiB/s':>7} {'x fio':>6}  {'vmsnap load is':>20}  notes")
        print(f"{'fio (same bytes, read qd8)':34} {fio_read_s:8.3f} {r['limit']['read_qd8']:7.0f} {1:6.2f}")
        qs, ok = r["qemu_load"]
        line("qemu loadvm (its own snapshot)", qs, f"RAM {'matches' if ok else 'DIFFERS'}", fio_read_s, load)
        qs, ok = r["qemu_load_vmsnap"]
        line("qemu loadvm (vmsnap's snapshot)", qs, f"RAM {'matches' if ok else 'DIFFERS'}", fio_read_s, load)
        s, wall, rss, ok = r["vmsnap_load"]
        line("vmsnap load", s, f"RAM {'matches' if ok else 'DIFFERS'}; process {wall:.2f} s, peak RSS {rss:.0f} MiB", fio_read_s, load)
        print(f"qemu-img check of vmsnap's image: {'clean' if r['check'] else 'PROBLEMS'}")


def memory_scaling(disk, shm):
    """Peak RSS of vmsnap save and load for guests of different sizes: it should not grow with the guest."""
    print()
    print("## vmsnap peak memory by guest size (random pages)")
    print(f"{'guest RAM':>10} {'save peak RSS MiB':>18} {'load peak RSS MiB':>18}")
    for mib in (256, 1024, 4096):
        ram = os.path.join(shm, "scale.ram")
        make_ram(ram, mib * MiB, False, seed=9)
        image = os.path.join(disk, "scale.qcow2")
        fresh_image(image)
        _, _, save_rss = vmsnap_json("save", image, "--name", "s", "--machine", "none", "--ram", f"ram0={ram}")
        os.unlink(ram)
        _, _, load_rss = vmsnap_json("load", image, "s", "--ram", f"ram0={ram}")
        os.unlink(ram)
        os.unlink(image)
        print(f"{mib:>7} MiB {save_rss:18.0f} {load_rss:18.0f}")


if __name__ == "__main__":
    main()
