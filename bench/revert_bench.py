#!/usr/bin/env python3
"""Revert benchmark (issue 18): how soon a reverted guest runs, and at what cost, for four ways to load a snapshot.

One real Linux guest per size (the tests' Debian cloud kernel, an initramfs of busybox-static built here the way
tests/Vmsnap.Tests/Interop/TestGuest.cs builds its own), machine pc, TCG, its RAM a share=on memory-backend-file in
/dev/shm. The kernel is booted with mem=256M so it uses only the low part of that RAM; once it ticks, the guest is
paused and the host writes random data into the rest of the file (clear of the first FILL_START and of the top
64 MiB below the 4 GiB hole, where the firmware keeps its tables; the file is linear: RAM below 4G, then above), the
guest runs on and must tick, and `vmsnap savevm` (guest running: vmsnap stops it, saves, resumes) makes the snapshot.
Each of REPEAT rounds then loads it once by each method, the order rotating from round to round, every load into a
fresh QEMU and a fresh (empty) RAM file:

  qemu -loadvm         QEMU started with -loadvm TAG (no -S); t0 = QEMU's start
  qemu HMP loadvm      QEMU started paused (-S); t0 = HMP `loadvm TAG`, then `cont`
  vmsnap loadvm        QEMU started -incoming defer (no -S); t0 = vmsnap's start (dotnet start-up included)
  vmsnap --postcopy    the same, `vmsnap loadvm --postcopy`
  (QEMU_SNAPSHOT=1)    the same, of QEMU's own HMP savevm snapshot of the guest (saved right after vmsnap's)

Per load, all from t0: resume = QEMU's RESUME event (its own timestamp); for -loadvm, whose RESUME comes before QMP
answers, the first `query-status` answer "running" (an upper bound); first tick = the first tick line the guest
prints on its serial console after the load (the serial file is polled every 2 ms); last page = the end of the
load (plain methods: resume; postcopy: vmsnap's seconds-to-last-page on vmsnap's clock, whose origin is placed by
its seconds-to-resume against the same RESUME event); tick rate while pages stream (postcopy: ticks between the
first tick and the last page) and after (TAIL seconds after the last page). vmsnap's peak RSS is the process's
VmHWM (wait4). Every load is checked: the guest ticks on with the saved boot ID and tick numbers past the save,
and SAMPLE pages of the host-filled region read back from the loaded RAM file as they were written.
Medians of the rounds, ratios and the issue's targets are printed at the end. Not a test: nothing is asserted.
"""
import hashlib, json, os, random, shutil, socket, statistics, subprocess, sys, tempfile, threading, time

MiB = 1 << 20
GiB = 1 << 30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QEMU = os.environ.get("QEMU", "qemu-system-x86_64")
QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
VMSNAP = os.environ.get("VMSNAP", "").split() or ["dotnet", os.path.join(ROOT, "src/Vmsnap.Cli/bin/Release/net10.0/vmsnap.dll")]
GUEST = os.environ.get("VMSNAP_GUEST", os.path.join(ROOT, "tests/.deps/guest"))
SIZES = [int(s) for s in os.environ.get("SIZES", "1 4 8").split()]
REPEAT = int(os.environ.get("REPEAT", "3"))
TAIL = float(os.environ.get("TAIL", "3"))
SAMPLE = int(os.environ.get("SAMPLE", "2048"))
GUEST_MEM_MIB = 256
FILL_START = int(os.environ.get("FILL_START_MIB", "320")) * MiB
FIRMWARE_MARGIN = 64 * MiB
TAG = "revert"
QEMU_TAG = "revert-qemu"
POSTCOPY_QEMU = "vmsnap --postcopy, QEMU's snapshot"
METHODS = ["qemu -loadvm", "qemu HMP loadvm", "vmsnap loadvm", "vmsnap --postcopy"]
# QEMU_SNAPSHOT=1: QEMU's own HMP savevm of the same guest too, loaded with --postcopy (a snapshot vmsnap did not save
# carries no index of vmsnap's: what postcopy costs on it).
if os.environ.get("QEMU_SNAPSHOT", "0") == "1":
    METHODS.append(POSTCOPY_QEMU)
# ONLY="vmsnap --postcopy,vmsnap loadvm": just these methods (a quick look; the ratios need the ones they compare).
if os.environ.get("ONLY"):
    METHODS = [m for m in METHODS if m in os.environ["ONLY"].split(",")]


def loadavg():
    return " ".join(open("/proc/loadavg").read().split()[:3])


# ---- the guest's initramfs ---------------------------------------------------------------------------------

# Ticks every TICK_US microseconds; each tick also reads and hashes a 64 KiB slice of a 16 MiB random region the
# guest filled at boot (so a tick touches memory and starts processes, as a workload would), and prints it.
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
boot=$(cat /proc/sys/kernel/random/boot_id)
mkdir -p /mem && mount -t tmpfs -o size=32m tmpfs /mem
dd if=/dev/urandom of=/mem/fill bs=1048576 count=16 2>/dev/null
echo "vmsnap-guest ready boot=$boot"
n=0
while true; do
  n=$((n+1))
  s=$(dd if=/mem/fill bs=65536 skip=$((n % 256)) count=1 2>/dev/null | md5sum | cut -c1-8)
  echo "vmsnap-guest tick=$n boot=$boot sum=$s end=$n"
  usleep TICK_US
done
"""


def cpio_newc(entries):
    """A newc cpio archive of (name, mode, data, rdev major, rdev minor)."""
    out = bytearray()
    ino = 1
    for name, mode, data, major, minor in entries + [("TRAILER!!!", 0, b"", 0, 0)]:
        nb = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, major, minor, len(nb), 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + nb
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
        ino += 1
    return bytes(out)


def build_initramfs(path, tick_us):
    with open("/bin/busybox", "rb") as f:
        busybox = f.read()
    entries = [(d, 0o40755, b"", 0, 0) for d in ("bin", "dev", "proc", "sys", "mem")]
    entries.append(("dev/console", 0o20600, b"", 5, 1))
    entries.append(("bin/busybox", 0o100755, busybox, 0, 0))
    entries.append(("init", 0o100755, INIT.replace("TICK_US", str(tick_us)).encode(), 0, 0))
    with open(path, "wb") as f:
        f.write(cpio_newc(entries))


# ---- QMP and the serial console ----------------------------------------------------------------------------

class Qmp:
    """A QMP client whose reader thread keeps every event with QEMU's own timestamp (wall clock)."""

    def __init__(self, path, deadline=60):
        self.s = socket.socket(socket.AF_UNIX)
        end = time.time() + deadline
        while True:
            try:
                self.s.connect(path)
                break
            except OSError:
                if time.time() > end:
                    raise
                time.sleep(0.005)
        self.f = self.s.makefile("rb")
        self.replies = []
        self.events = []
        self.cv = threading.Condition()
        self.closed = False
        self.greeted = None
        threading.Thread(target=self._read, daemon=True).start()
        with self.cv:
            self.cv.wait_for(lambda: self.greeted or self.closed, timeout=deadline)
        self.cmd("qmp_capabilities")

    def _read(self):
        try:
            for line in self.f:
                msg = json.loads(line)
                with self.cv:
                    if "QMP" in msg:
                        self.greeted = time.time()
                    elif "event" in msg:
                        ts = msg["timestamp"]
                        self.events.append((msg["event"], ts["seconds"] + ts["microseconds"] / 1e6, msg.get("data")))
                    else:
                        self.replies.append(msg)
                    self.cv.notify_all()
        except (OSError, ValueError):
            pass
        with self.cv:
            self.closed = True
            self.cv.notify_all()

    def cmd(self, name, timeout=600, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.s.sendall(json.dumps(msg).encode() + b"\n")
        with self.cv:
            if not self.cv.wait_for(lambda: self.replies or self.closed, timeout=timeout):
                raise RuntimeError(f"QMP {name}: no answer within {timeout} s")
            if not self.replies:
                raise RuntimeError(f"QMP {name}: QEMU closed the connection")
            r = self.replies.pop(0)
        if "error" in r:
            raise RuntimeError(f"QMP {name}: {r['error']['desc']}")
        return r["return"]

    def hmp(self, line, timeout=600):
        out = self.cmd("human-monitor-command", timeout=timeout, **{"command-line": line})
        if out.strip():
            raise RuntimeError(f"HMP {line}: {out.strip()}")

    def event(self, name, after=0.0, timeout=600):
        """The wall time of the first event NAME stamped after AFTER."""
        with self.cv:
            ok = self.cv.wait_for(lambda: any(e[0] == name and e[1] >= after for e in self.events) or self.closed, timeout=timeout)
            hit = [e[1] for e in self.events if e[0] == name and e[1] >= after]
        if not hit:
            raise RuntimeError(f"no {name} event from QEMU" + ("" if ok else f" within {timeout} s"))
        return hit[0]


class Serial:
    """Follows QEMU's serial output file; each complete tick line with the wall time it was seen (polled every 2 ms)."""

    def __init__(self, path):
        self.path = path
        self.ticks = []  # (seen, n, boot)
        self.lines = []
        self.stop = False
        self.lock = threading.Lock()
        self.t = threading.Thread(target=self._poll, daemon=True)
        self.t.start()

    def _poll(self):
        buf = b""
        f = None
        while not self.stop:
            if f is None:
                try:
                    f = open(self.path, "rb")
                except FileNotFoundError:
                    time.sleep(0.002)
                    continue
            chunk = f.read()
            if not chunk:
                time.sleep(0.002)
                continue
            now = time.time()
            buf += chunk
            *done, buf = buf.split(b"\n")
            with self.lock:
                for raw in done:
                    line = raw.decode("latin-1").strip("\r")
                    self.lines.append(line)
                    t = tick_of(line)
                    if t:
                        self.ticks.append((now, *t))
        if f:
            f.close()

    def close(self):
        self.stop = True
        self.t.join()

    def snapshot(self):
        with self.lock:
            return list(self.ticks)

    def wait_tick(self, after_n=0, timeout=120):
        end = time.time() + timeout
        while time.time() < end:
            ts = [t for t in self.snapshot() if t[1] > after_n]
            if ts:
                return ts[0]
            time.sleep(0.01)
        with self.lock:
            tail = "\n".join(self.lines[-20:])
        raise RuntimeError(f"the guest printed no tick past {after_n} within {timeout} s; serial:\n{tail}")


def tick_of(line):
    """(n, boot) of a whole tick line, else None (a line cut by a restore has a different or no end)."""
    if not line.startswith("vmsnap-guest tick="):
        return None
    f = dict(p.split("=", 1) for p in line[len("vmsnap-guest "):].split() if "=" in p)
    if f.get("tick") != f.get("end") or "boot" not in f or not f["tick"].isdigit():
        return None
    return int(f["tick"]), f["boot"]


# ---- one guest ---------------------------------------------------------------------------------------------

class Guest:
    def __init__(self, work, ram, size, image, initrd, extra=(), name="g"):
        self.sock = os.path.join(work, f"{name}.qmp")
        self.vsock = os.path.join(work, f"{name}.vmsnap")
        self.serial_path = os.path.join(work, f"{name}.serial")
        for p in (self.sock, self.vsock, self.serial_path):
            if os.path.exists(p):
                os.unlink(p)
        args = [QEMU, "-machine", "pc,memory-backend=ram0", "-accel", "tcg", "-m", f"{size // MiB}M",
                "-object", f"memory-backend-file,id=ram0,size={size},mem-path={ram},share=on",
                "-kernel", os.path.join(GUEST, "vmlinuz"), "-initrd", initrd,
                "-append", f"console=ttyS0 quiet panic=-1 mem={GUEST_MEM_MIB}M",
                "-drive", f"file={image},if=virtio,format=qcow2,cache=none",
                "-nodefaults", "-display", "none", "-no-reboot", "-serial", f"file:{self.serial_path}",
                "-qmp", f"unix:{self.sock},server=on,wait=off", "-qmp", f"unix:{self.vsock},server=on,wait=off", *extra]
        self.serial = Serial(self.serial_path)
        self.started = time.time()
        self.p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.q = None

    def connect(self):
        self.q = Qmp(self.sock)
        return self.q

    def quit(self):
        try:
            if self.q:
                self.q.cmd("quit", timeout=30)
        except Exception:
            pass
        try:
            self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.serial.close()
        err = self.p.stderr.read().decode(errors="replace").strip()
        self.p.stderr.close()
        for p in (self.sock, self.vsock, self.serial_path):
            if os.path.exists(p):
                os.unlink(p)
        return err


def vmsnap(*args):
    """vmsnap with --json: (result, start and end wall time, peak RSS MiB from wait4)."""
    start = time.time()
    t0 = time.perf_counter()
    p = subprocess.Popen(VMSNAP + list(args) + ["--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out_chunks, err_chunks = [], []
    te = threading.Thread(target=lambda: err_chunks.append(p.stderr.read()), daemon=True)
    te.start()
    out_chunks.append(p.stdout.read())
    te.join()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    end = time.time()
    if p.returncode != 0:
        raise RuntimeError(f"vmsnap {' '.join(args)}: {err_chunks[0].decode().strip()}")
    trace = {}
    for line in err_chunks[0].decode(errors="replace").splitlines():
        # VMSNAP_LIVE_TRACE=1: "vmsnap trace <ms since the process's clock started> ms <UTC> <phase>"; the first mark of a name wins.
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[:2] == ["vmsnap", "trace"] and parts[3] == "ms":
            trace.setdefault(parts[5], float(parts[2]))
    return json.loads(out_chunks[0]), start, end, usage.ru_maxrss / 1024, trace


# ---- RAM: the fill and its check ---------------------------------------------------------------------------

def below_4g(q, size):
    """The bytes of RAM the pc machine maps below 4 GiB (the file's first part), from `info mtree`."""
    out = q.cmd("human-monitor-command", **{"command-line": "info mtree"})
    for line in out.splitlines():
        if "alias ram-below-4g " in line:
            rng = line.split()[-1]
            lo, hi = (int(x, 16) for x in rng.split("-"))
            return hi - lo + 1
    return size  # no split: all of it is below 4 GiB


def fill_ranges(size, low):
    """File ranges the host fills: clear of the guest's own RAM and of the firmware's top 64 MiB below 4 GiB."""
    ranges = [(FILL_START, min(low, size) - FIRMWARE_MARGIN)]
    if size > low:
        ranges.append((low, size))
    return [(a, b) for a, b in ranges if b > a]


def fill(ram, ranges):
    chunk = 8 * MiB
    fd = os.open(ram, os.O_WRONLY)
    try:
        for a, b in ranges:
            for off in range(a, b, chunk):
                os.pwrite(fd, os.urandom(min(chunk, b - off)), off)
    finally:
        os.close(fd)


def sample_pages(ram, ranges, n, seed=18):
    """n pages spread over the filled ranges: (offset, SHA-1 of its 4 KiB)."""
    rnd = random.Random(seed)
    total = sum(b - a for a, b in ranges) // 4096
    picks = sorted(rnd.randrange(total) for _ in range(n))
    out = []
    with open(ram, "rb") as f:
        for k in picks:
            for a, b in ranges:
                pages = (b - a) // 4096
                if k < pages:
                    off = a + k * 4096
                    break
                k -= pages
            f.seek(off)
            out.append((off, hashlib.sha1(f.read(4096)).digest()))
    return out


def check_pages(ram, samples):
    bad = 0
    with open(ram, "rb") as f:
        for off, h in samples:
            f.seek(off)
            if hashlib.sha1(f.read(4096)).digest() != h:
                bad += 1
    return bad


def blank(path, size):
    if os.path.exists(path):
        os.unlink(path)
    with open(path, "wb") as f:
        f.truncate(size)


# ---- the loads ---------------------------------------------------------------------------------------------

def rate(ticks, lo, hi):
    """Ticks per second among the ticks seen in [lo, hi] (None with fewer than 2)."""
    ts = [t[0] for t in ticks if lo <= t[0] <= hi]
    if len(ts) < 2 or ts[-1] <= ts[0]:
        return None
    return (len(ts) - 1) / (ts[-1] - ts[0])


def load_once(method, ctx):
    work, ram, size, image, initrd = ctx["work"], ctx["loadram"], ctx["size"], ctx["image"], ctx["initrd"]
    blank(ram, size)
    r = {"method": method, "rss": None, "index": None, "on_demand": None, "streamed": None}
    extra = {"qemu -loadvm": ["-loadvm", TAG], "qemu HMP loadvm": ["-S"]}.get(method, ["-incoming", "defer"])
    g = Guest(work, ram, size, image, initrd, extra, name="load")
    try:
        if method == "qemu -loadvm":
            t0 = g.started
            q = g.connect()
            resume = last = None
            while resume is None:
                if q.cmd("query-status")["status"] == "running":
                    resume = time.time()
                else:
                    time.sleep(0.002)
            last = resume
        elif method == "qemu HMP loadvm":
            q = g.connect()
            r["qemu_start"] = time.time() - g.started
            t0 = time.time()
            q.hmp(f"loadvm {TAG}")
            last = time.time()
            q.cmd("cont")
            resume = q.event("RESUME", after=t0)
        else:
            q = g.connect()
            r["qemu_start"] = time.time() - g.started
            tag = QEMU_TAG if method == POSTCOPY_QEMU else TAG
            args = ["loadvm", "--qmp", g.vsock, tag] + (["--postcopy"] if "--postcopy" in method else [])
            res, t0, end, rss, trace = vmsnap(*args)
            r["rss"] = rss
            r["trace"] = trace
            resume = q.event("RESUME", after=t0)
            r["vmsnap_seconds"] = res.get("seconds")
            pc = res.get("postcopy")
            if pc:
                origin = resume - pc["seconds-to-resume"] if pc.get("seconds-to-resume") is not None else t0
                last = origin + pc["seconds-to-last-page"]
                r["index"] = pc.get("index-seconds")
                r["on_demand"] = pc.get("pages-on-demand")
                r["streamed"] = pc.get("pages-streamed")
                r["own_resume"] = pc.get("seconds-to-resume")
            else:
                last = resume
            r["process"] = end - t0
        first = g.serial.wait_tick(ctx["saved_tick"])
        time.sleep(max(0.0, last + TAIL - time.time()))
        ticks = [t for t in g.serial.snapshot() if t[1] > ctx["saved_tick"]]
        r["resume"] = resume - t0
        r["first_tick"] = first[0] - t0
        r["last_page"] = last - t0
        r["rate_during"] = rate(ticks, first[0], last) if last > first[0] + 0.2 else None
        r["rate_after"] = rate(ticks, max(last, first[0]), last + TAIL)
        problems = []
        if any(t[2] != ctx["boot"] for t in ticks):
            problems.append("a tick with another boot ID")
        ns = [t[1] for t in ticks]
        if ns != list(range(ns[0], ns[0] + len(ns))):
            problems.append("tick numbers skip")
        if len(ns) < 2:
            problems.append("fewer than 2 ticks")
        if q.cmd("query-status")["status"] != "running":
            problems.append("not running at the end")
        bad = check_pages(ram, ctx["samples"])
        if bad:
            problems.append(f"{bad} of {len(ctx['samples'])} sampled pages differ")
        r["problems"] = problems
        return r
    finally:
        err = g.quit()
        if err and any(w in err.lower() for w in ("error", "fail")):
            print(f"#   QEMU said: {err[-400:]}", flush=True)
        os.unlink(ram)


def prepare(size_gib, work, shm, disk, initrd):
    """Boots the guest, fills its RAM, saves the snapshot; returns the context for the loads."""
    size = size_gib * GiB
    ram = os.path.join(shm, "source.ram")
    image = os.path.join(disk, f"revert-{size_gib}G.qcow2")
    if os.path.exists(image):
        os.unlink(image)
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", image, "64M"], check=True)
    blank(ram, size)
    g = Guest(work, ram, size, image, initrd, name="source")
    try:
        q = g.connect()
        t = time.time()
        boot_tick = g.serial.wait_tick(0, timeout=300)
        boot = boot_tick[2]
        print(f"#   booted in {time.time() - g.started:.1f} s (boot {boot})", flush=True)
        q.cmd("stop")
        ranges = fill_ranges(size, below_4g(q, size))
        filled = sum(b - a for a, b in ranges)
        t = time.time()
        fill(ram, ranges)
        samples = sample_pages(ram, ranges, SAMPLE)
        print(f"#   filled {filled / MiB:.0f} MiB of {size // MiB} MiB with random data ({100 * filled / size:.0f} %) in {time.time() - t:.1f} s; "
              f"ranges {', '.join(f'{a // MiB}-{b // MiB} MiB' for a, b in ranges)}", flush=True)
        before = g.serial.snapshot()[-1][1]
        q.cmd("cont")
        g.serial.wait_tick(before + 2, timeout=60)  # it ticks after the fill
        # The snapshot holds the guest as it was after some tick at or past this one: every tick after a load is above it.
        saved_tick = g.serial.snapshot()[-1][1]
        res, start, end, _, _ = vmsnap("savevm", "--qmp", g.vsock, TAG)
        wall = end - start
        g.serial.wait_tick(saved_tick + 2, timeout=60)  # and after the save
        if POSTCOPY_QEMU in METHODS:
            t = time.time()
            q.hmp(f"savevm {QEMU_TAG}")
            print(f"#   QEMU's HMP savevm {QEMU_TAG}: {time.time() - t:.2f} s", flush=True)
        print(f"#   vmsnap savevm: {res['seconds']:.2f} s (process {wall:.2f} s), VM state {res['bytes'] / MiB:.0f} MiB; guest ticks on", flush=True)
        bad = check_pages(ram, samples)
        if bad:
            raise RuntimeError(f"{bad} sampled pages changed in the source guest: the guest wrote into the host-filled region")
    finally:
        g.quit()
        os.unlink(ram)
    return {"size": size, "image": image, "initrd": initrd, "work": work, "loadram": os.path.join(shm, "load.ram"),
            "boot": boot, "saved_tick": saved_tick, "samples": samples, "filled": filled, "vmstate": res["bytes"]}


# ---- the report --------------------------------------------------------------------------------------------

def med(rs, key):
    xs = [r[key] for r in rs if r.get(key) is not None]
    return statistics.median(xs) if xs else None


def fmt(x, unit="", digits=3):
    return "-" if x is None else f"{x:.{digits}f}{unit}"


def report(results, info):
    print()
    print(f"## revert benchmark: medians of {REPEAT} rounds; {info}")
    print("times in seconds from each method's start (see bench/README.md); ticks/s = the guest's tick rate; QEMU start-up = "
          "from QEMU's spawn to its QMP answering, before t0 for all but -loadvm (whose t0 is QEMU's spawn)")
    hdr = ["GiB", "method", "resume", "first tick", "last page", "ticks/s streaming", "ticks/s after", "QEMU start-up", "vmsnap peak MiB",
           "index s", "on demand", "streamed", "all resumes", "all last pages"]
    print("| " + " | ".join(hdr) + " |")
    print("|" + "|".join(["---"] * 2 + ["---:"] * (len(hdr) - 2)) + "|")
    for size, by in results.items():
        for m in METHODS:
            rs = by[m]
            if not rs:
                continue
            rss = max((r["rss"] for r in rs if r["rss"] is not None), default=None)
            row = [str(size), m, fmt(med(rs, "resume")), fmt(med(rs, "first_tick")), fmt(med(rs, "last_page")),
                   fmt(med(rs, "rate_during"), digits=1), fmt(med(rs, "rate_after"), digits=1), fmt(med(rs, "qemu_start"), digits=2), fmt(rss, digits=0),
                   fmt(med(rs, "index"), digits=2), fmt(med(rs, "on_demand"), digits=0), fmt(med(rs, "streamed"), digits=0),
                   " ".join(f"{r['resume']:.2f}" for r in rs), " ".join(f"{r['last_page']:.2f}" for r in rs)]
            print("| " + " | ".join(row) + " |")
    print()
    print("## ratios and the issue's targets")
    print("| GiB | postcopy resume / plain vmsnap resume | postcopy first tick / plain | postcopy last page / plain vmsnap "
          "(target <= 1.2) | postcopy resume on vmsnap's clock | of which index | resume - index | vmsnap peak MiB plain / postcopy |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, by in results.items():
        p, c = by.get("vmsnap --postcopy", []), by.get("vmsnap loadvm", [])
        if not p or not c:
            continue
        own = med(p, "own_resume")
        idx = med(p, "index")
        pr = max((r["rss"] for r in p), default=None)
        cr = max((r["rss"] for r in c), default=None)
        print(f"| {size} | {med(p, 'resume') / med(c, 'resume'):.2f} | {med(p, 'first_tick') / med(c, 'first_tick'):.2f} | "
              f"{med(p, 'last_page') / med(c, 'last_page'):.2f} | {fmt(own)} | {fmt(idx)} | "
              f"{fmt(own - idx if own is not None and idx is not None else None)} | {fmt(cr, digits=0)} / {fmt(pr, digits=0)} |")
    traced = [(size, m) for size, by in results.items() for m in METHODS if any(r.get("trace") for r in by[m])]
    if traced:
        print()
        print("## where vmsnap's time goes (VMSNAP_LIVE_TRACE=1): median ms from the process's start to each phase's mark")
        for size, m in traced:
            rs = results[size][m]
            marks = list(dict.fromkeys(k for r in rs for k in (r.get("trace") or {})))
            cells = []
            for k in marks:
                xs = [r["trace"][k] for r in rs if k in (r.get("trace") or {})]
                cells.append(f"{k} {statistics.median(xs):.0f}")
            print(f"- {size} GiB {m}: " + ", ".join(cells))
    print()
    sizes = [s for s in results if results[s].get("vmsnap --postcopy")]
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        a, b = med(results[lo]["vmsnap --postcopy"], "resume"), med(results[hi]["vmsnap --postcopy"], "resume")
        print(f"flat? postcopy resume at {hi} GiB / at {lo} GiB: {b / a:.2f} (target: flat, about 1)")
    print()
    problems = [(s, r["method"], p) for s, by in results.items() for rs in by.values() for r in rs for p in r["problems"]]
    if problems:
        print("PROBLEMS: " + "; ".join(f"{s} GiB {m}: {p}" for s, m, p in problems))
    else:
        print("every load checked: the guest ticked on from the snapshot (same boot, consecutive ticks past the save), "
              f"running at the end, {SAMPLE} sampled pages of the filled region as written")


def main():
    for t in (QEMU, QEMU_IMG):
        if not shutil.which(t):
            sys.exit(f"bench/revert.sh: {t} is not installed")
    if not os.path.exists("/bin/busybox"):
        sys.exit("bench/revert.sh: /bin/busybox is missing (apt-get install busybox-static)")
    if not os.path.exists(os.path.join(GUEST, "vmlinuz")):
        sys.exit(f"bench/revert.sh: no guest kernel in {GUEST} (tests/install-deps.sh, or VMSNAP_GUEST=DIR)")
    disk = os.path.abspath(os.environ.get("DIR", os.path.join(ROOT, "bench/.scratch")))
    shm = os.environ.get("SHM", "/dev/shm/vmsnap-revert-bench")
    os.makedirs(disk, exist_ok=True)
    os.makedirs(shm, exist_ok=True)
    work = tempfile.mkdtemp(prefix="vmsnap-revert-")
    initrd = os.path.join(work, "initramfs.cpio")
    build_initramfs(initrd, int(os.environ.get("TICK_US", "20000")))
    qv = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"# revert benchmark {started}: sizes {SIZES} GiB, {REPEAT} rounds, {os.cpu_count()} cores, load {loadavg()}")
    print(f"# {qv}; vmsnap: {' '.join(VMSNAP)}; image in {disk}; guest RAM in {shm}", flush=True)
    results = {}
    try:
        for size in SIZES:
            print(f"# {size} GiB: preparing (load {loadavg()})", flush=True)
            ctx = prepare(size, work, shm, disk, initrd)
            by = results[size] = {m: [] for m in METHODS}
            for rnd in range(REPEAT):
                order = METHODS[rnd % len(METHODS):] + METHODS[:rnd % len(METHODS)]
                for m in order:
                    r = load_once(m, ctx)
                    by[m].append(r)
                    extra = f", index {r['index']:.2f} s, on demand {r['on_demand']}" if r["index"] is not None else ""
                    print(f"#   {size} GiB round {rnd + 1} {m:18}: resume {r['resume']:.3f}, first tick {r['first_tick']:.3f}, "
                          f"last page {r['last_page']:.3f}, ticks/s {fmt(r['rate_during'], digits=1)} / {fmt(r['rate_after'], digits=1)}"
                          f"{'' if r['rss'] is None else ', peak %.0f MiB' % r['rss']}{extra}"
                          f"{'; PROBLEMS: ' + '; '.join(r['problems']) if r['problems'] else ''}; load {loadavg()}", flush=True)
            os.unlink(ctx["image"])
        report(results, f"{qv}, started {started}, load at the end {loadavg()}")
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        for s in SIZES:
            p = os.path.join(disk, f"revert-{s}G.qcow2")
            if os.path.exists(p):
                os.unlink(p)


if __name__ == "__main__":
    main()
