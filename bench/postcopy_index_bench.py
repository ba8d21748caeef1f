#!/usr/bin/env python3
"""Postcopy index benchmark (issue 18, item 2): vmsnap loadvm --postcopy with the index recorded at save time
against the scan it replaces, one run.

Per SIZE (env SIZES, default "1G 4G"): one guest, machine pc, its RAM a memory-backend-file in /dev/shm that the
host fills with random data before QEMU starts (SeaBIOS idles, the RAM stays random), one qcow2 drive. Two
snapshots of it: `vmsnap savevm` (stopped; records the index) and QEMU's HMP savevm (no index: loadvm --postcopy
scans it). Then ROUNDS rounds (default 3), alternating which goes first, each a fresh QEMU with -incoming defer and
`vmsnap loadvm --postcopy --json`: the JSON's index (recorded/scanned), index-seconds, seconds-to-resume,
seconds-to-last-page, vmsnap's wall time and peak RSS. Medians. Not a test.
"""
import os, statistics, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from live_bench import Guest, MiB, fresh_image, make_ram, parse_size, vmsnap  # noqa: E402


def main():
    sizes = os.environ.get("SIZES", "1G 4G").split()
    rounds = int(os.environ.get("ROUNDS", "3"))
    work = os.path.abspath(os.environ.get("DIR", "bench/.scratch/pcindex"))
    os.makedirs(work, exist_ok=True)
    print(f"load before: {os.getloadavg()}")
    for size_text in sizes:
        size = parse_size(size_text)
        ram = f"/dev/shm/vmsnap-pcindex-bench-{os.getpid()}.ram"
        image = os.path.join(work, "disk.qcow2")
        try:
            make_ram(ram, size)
            fresh_image(image)
            g = Guest(work, ram, image, cache="none")
            time.sleep(1)
            try:
                vmsnap("savevm", "--qmp", g.vsock, "rec")
                g.q.hmp("savevm qemu")
            finally:
                g.quit()
            rows = {"rec": [], "qemu": []}
            for r in range(rounds):
                for tag in (["rec", "qemu"] if r % 2 == 0 else ["qemu", "rec"]):
                    g = Guest(work, ram, image, cache="none", extra=["-incoming", "defer"])
                    try:
                        res, wall, rss = vmsnap("loadvm", "--qmp", g.vsock, tag, "--postcopy")
                    finally:
                        g.quit()
                    pc = res["postcopy"]
                    rows[tag].append((pc["index"], pc["index-seconds"], pc["seconds-to-resume"], pc["seconds-to-last-page"], wall, rss))
                    print(f"  {size_text} round {r + 1} {tag:5} index {pc['index']:9} index {pc['index-seconds']:.3f} s, resume {pc['seconds-to-resume']:.3f} s, "
                          f"last page {pc['seconds-to-last-page']:.3f} s, wall {wall:.3f} s, peak RSS {rss:.0f} MiB", flush=True)
            print(f"{size_text}: medians over {rounds} rounds")
            print(f"  {'snapshot':24} {'index':9} {'index s':>8} {'resume s':>9} {'last page s':>12} {'wall s':>7} {'RSS MiB':>8}")
            for tag, what in (("rec", "vmsnap savevm"), ("qemu", "QEMU savevm")):
                v = rows[tag]
                med = [statistics.median(x[i] for x in v) for i in range(1, 6)]
                print(f"  {what:24} {v[0][0]:9} {med[0]:8.3f} {med[1]:9.3f} {med[2]:12.3f} {med[3]:7.3f} {med[4]:8.0f}")
        finally:
            if os.path.exists(ram):
                os.unlink(ram)
            if os.path.exists(image):
                os.unlink(image)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
