#!/usr/bin/env python3
"""The stop window of vmsnap savevm --live (issue 20), vmsnap builds side by side, quiet and under CPU load.

One guest as bench/live_bench.py makes it (machine pc, TCG, SIZE of random RAM in a memory-backend-file,
one qcow2 drive; SeaBIOS idles): each round starts a fresh QEMU and image per variant and runs
`vmsnap savevm --live`, taking vmsnap's downtime-seconds (QEMU's STOP to RESUME events: how long the guest
was stopped), and how much of it came after QEMU's own part (downtime-seconds minus QEMU's downtime figure:
vmsnap's commit and cont, where a JIT would compile). Variants (VARIANTS, lines "label<TAB>command...") alternate within each round; the rounds run
with no added load, then with `stress-ng --cpu 2` busy on both cores (LOADS="none stress"). Reports the
median and the worst per variant and load. Not a test.
"""
import os, shlex, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import live_bench as lb  # noqa: E402


def main():
    variants = [line.split("\t", 1) for line in os.environ["VARIANTS"].strip().split("\n")]
    size = lb.parse_size(os.environ.get("SIZE", "256M"))
    rounds = int(os.environ.get("ROUNDS", "8"))
    loads = os.environ.get("LOADS", "none stress").split()
    disk = os.path.abspath(os.environ.get("DIR", os.path.join(lb.ROOT, "bench/.scratch")))
    os.makedirs(disk, exist_ok=True)
    work = tempfile.mkdtemp(prefix="vmsnap-live-stop-", dir=disk)
    shm = tempfile.mkdtemp(prefix="vmsnap-live-stop-", dir="/dev/shm")
    ram, image = os.path.join(shm, "ram"), os.path.join(work, "vm.qcow2")
    lb.make_ram(ram, size)
    results = {}
    try:
        for load in loads:
            stress = subprocess.Popen(["stress-ng", "--cpu", "2", "--quiet"]) if load == "stress" else None
            try:
                time.sleep(1 if stress else 0)
                print(f"load {load}: loadavg {open('/proc/loadavg').read().split()[:3]}", flush=True)
                for r in range(rounds):
                    for label, command in variants:
                        lb.VMSNAP = shlex.split(command)
                        res, wall, _ = lb.op_vmsnap_savevm(work, ram, image, live=True)
                        down = res["downtime-seconds"]
                        ours = down - (res["qemu-downtime-seconds"] or 0)
                        results.setdefault((label, load), []).append((down, ours))
                        print(f"  round {r + 1} {label:<28} stop {down * 1000:7.1f} ms (after QEMU's part {ours * 1000:6.1f} ms)"
                              f"  save {res['seconds']:.2f} s  wall {wall:.2f} s", flush=True)
            finally:
                if stress:
                    stress.terminate()
                    stress.wait()
    finally:
        subprocess.run(["rm", "-rf", work, shm])
    print()
    print(f"{'':<37} {'':>4} {'stop window':>21} {'after QEMU part':>21}")
    print(f"{'variant':<28} {'load':<8} {'runs':>4} {'median ms':>10} {'worst ms':>10} {'median ms':>10} {'worst ms':>10}")
    for (label, load), runs in results.items():
        down, ours = [d for d, _ in runs], [o for _, o in runs]
        print(f"{label:<28} {load:<8} {len(runs):>4} {statistics.median(down) * 1000:>10.1f} {max(down) * 1000:>10.1f}"
              f" {statistics.median(ours) * 1000:>10.1f} {max(ours) * 1000:>10.1f}")


if __name__ == "__main__":
    main()
