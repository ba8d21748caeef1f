using System.Diagnostics;
using System.Security.Cryptography;
using System.Text;
using System.Text.RegularExpressions;

namespace Vmsnap.Tests.Interop;

/// <summary>One line the test guest prints per tick on its serial port.</summary>
/// <param name="N">The counter.</param>
/// <param name="Boot">The kernel's boot ID (a new one on every boot, the same after a restore).</param>
/// <param name="Disks">"ok" when the block written on the previous tick read back right from both disks, else what was wrong.</param>
/// <param name="Sum">MD5 of the guest's filled memory region, on every eighth tick; null on the others.</param>
/// <param name="Churn">With <see cref="GuestOptions.Churn"/>, on the ticks with <paramref name="Sum"/>: "ok" when the last complete copy
/// of the region and the last zero-filled file read back right, else what was wrong; null otherwise.</param>
internal sealed record GuestTick(long N, string Boot, string Disks, string? Sum, string? Churn = null);

/// <summary>How a <see cref="TestGuest"/> is set up.</summary>
internal sealed record GuestOptions
{
    /// <summary>"pc" or "q35": the current machine type of that kind for the QEMU in use.</summary>
    public string Machine { get; init; } = "pc";

    /// <summary>Attach the first disk through <c>-device virtio-blk-pci,share-rw=on</c> (so QEMU can export it writable, for failure injection).</summary>
    public bool ShareFirstDisk { get; init; }

    /// <summary>
    /// Keep rewriting memory in the background: a loop that copies the filled region into a new tmpfs file and
    /// writes a zero-filled one, each replacing the previous one, so pages keep being dirtied, freed and reused,
    /// turning from data to zeros and back (the pre-copy of a live save sees them change between passes).
    /// </summary>
    public bool Churn { get; init; }

    /// <summary>More QEMU arguments.</summary>
    public string[] Extra { get; init; } = [];
}

/// <summary>
/// A real Linux guest for live save/load tests, every byte from Debian packages: the cloud kernel
/// unpacked by tests/install-deps.sh (tests/.deps/guest), and an initramfs this class builds from
/// /bin/busybox (busybox-static), the kernel's virtio modules and an init script. The init script
/// fills 16 MiB of memory (a tmpfs file) with a fixed pattern, then loops: each tick writes the
/// counter into a block of both virtio disks with O_DIRECT, reads back the block of the previous
/// tick, and prints the counter, its boot ID, whether the disks read back right, and every eighth
/// tick the MD5 of the memory region. Machines pc and q35 (this QEMU's current types), two
/// virtio-blk disks of 64 MiB, virtio-net on a user netdev, 256 MiB of RAM, TCG.
/// </summary>
internal sealed partial class TestGuest : IDisposable
{
    public const int RamMiB = 256;
    public const long DiskBytes = 64L << 20;
    private const int FillMiB = 16;

    private static readonly Lazy<string> s_initramfs = new(BuildInitramfs, LazyThreadSafetyMode.ExecutionAndPublication);
    private static readonly Lazy<string> s_fillSum = new(ComputeFillSum);
    private static int s_instances;

    private readonly string[] _args;

    private TestGuest(TempDir dir, QemuVm vm, string serial, string vmsnapSocket, string[] disks, string machine, string[] args)
    {
        Dir = dir;
        Vm = vm;
        Serial = serial;
        VmsnapSocket = vmsnapSocket;
        Disks = disks;
        Machine = machine;
        _args = args;
    }

    public TempDir Dir { get; }

    /// <summary>The QEMU process, with the test's own QMP connection.</summary>
    public QemuVm Vm { get; }

    /// <summary>A second QMP socket for vmsnap (QEMU's QMP socket serves one client at a time).</summary>
    public string VmsnapSocket { get; }

    /// <summary>The serial port's output file.</summary>
    public string Serial { get; }

    /// <summary>The two disks' images.</summary>
    public string[] Disks { get; }

    /// <summary>The machine type QEMU runs.</summary>
    public string Machine { get; }

    /// <summary>MD5 of the memory region as the init script fills it, computed here from the same pattern.</summary>
    public static string ExpectedFillSum => s_fillSum.Value;

    /// <summary>Creates two fresh disks in <paramref name="dir"/> and boots the guest; returns once it printed its first tick.</summary>
    public static TestGuest Boot(TempDir dir, GuestOptions? options = null)
    {
        options ??= new GuestOptions();
        (string[] disks, string machine, string[] args) = Arguments(dir, options);
        foreach (string d in disks) Tool.QemuImg("create", "-q", "-f", "qcow2", d, DiskBytes.ToString());
        TestGuest guest = Start(dir, disks, machine, args, []);
        guest.WaitForTick(_ => true, TimeSpan.FromMinutes(3));
        return guest;
    }

    /// <summary>A fresh QEMU on the same disks and command line, plus <paramref name="more"/> (e.g. <c>-loadvm TAG</c>, <c>-incoming defer</c>).</summary>
    public TestGuest Restart(params string[] more) => Start(Dir, Disks, Machine, _args, more);

    /// <summary>As <see cref="Restart(string[])"/> for a guest booted in <paramref name="dir"/> with <paramref name="options"/> (whose QEMU is gone).</summary>
    public static TestGuest Restart(TempDir dir, GuestOptions options, params string[] more)
    {
        (string[] disks, string machine, string[] args) = Arguments(dir, options);
        return Start(dir, disks, machine, args, more);
    }

    private static (string[] Disks, string Machine, string[] Args) Arguments(TempDir dir, GuestOptions options)
    {
        string[] disks = [dir.File("disk0.qcow2"), dir.File("disk1.qcow2")];
        string machine = options.Machine switch
        {
            "pc" => QemuInstall.Current.PcMachine,
            "q35" => QemuInstall.Current.Q35Machine,
            _ => options.Machine,
        };
        var args = new List<string>
        {
            "-machine", machine, "-accel", "tcg", "-m", $"{RamMiB}M", "-no-reboot",
            "-kernel", Path.Combine(TestDeps.Guest, "vmlinuz"), "-initrd", s_initramfs.Value, "-append", "console=ttyS0 quiet panic=-1" + (options.Churn ? " vmsnap.churn" : ""),
            "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
        };
        if (options.ShareFirstDisk)
            args.AddRange(["-drive", $"file={disks[0]},if=none,id=d0,format=qcow2", "-device", "virtio-blk-pci,drive=d0,share-rw=on"]);
        else
            args.AddRange(["-drive", $"file={disks[0]},if=virtio,format=qcow2"]);
        args.AddRange(["-drive", $"file={disks[1]},if=virtio,format=qcow2"]);
        args.AddRange(options.Extra);
        return (disks, machine, args.ToArray());
    }

    private static TestGuest Start(TempDir dir, string[] disks, string machine, string[] args, string[] more)
    {
        int n = Interlocked.Increment(ref s_instances);
        string serial = dir.File($"serial-{n}.log");
        string socket = dir.File($"vmsnap-{n}.qmp");
        QemuVm vm = QemuVm.Start([.. args, .. more, "-serial", $"file:{serial}", "-qmp", $"unix:{socket},server=on,wait=off"]);
        return new TestGuest(dir, vm, serial, socket, disks, machine, args);
    }

    /// <summary>Every tick line printed so far (lines cut by a restore are skipped).</summary>
    public IReadOnlyList<GuestTick> Ticks() => TicksIn(Serial);

    /// <summary>The initramfs the guest boots (built once, named by its content).</summary>
    public static string Initramfs => s_initramfs.Value;

    /// <summary>Every tick line in the serial output file <paramref name="serial"/> (lines cut by a restore are skipped).</summary>
    public static IReadOnlyList<GuestTick> TicksIn(string serial)
    {
        string text;
        try
        {
            using var f = new FileStream(serial, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
            using var r = new StreamReader(f, Encoding.Latin1);
            text = r.ReadToEnd();
        }
        catch (FileNotFoundException)
        {
            return [];
        }
        var ticks = new List<GuestTick>();
        foreach (string line in text.Split('\n'))
        {
            Match m = TickLine().Match(line.TrimEnd('\r'));
            // A line whose start and end name different ticks was spliced: its start printed by a guest that was then
            // loaded over (HMP loadvm in the same QEMU), its end by the loaded guest. Such a line is not a tick.
            if (!m.Success || m.Groups[1].Value != m.Groups[6].Value) continue;
            ticks.Add(new GuestTick(long.Parse(m.Groups[1].Value), m.Groups[2].Value, m.Groups[3].Value,
                m.Groups[4].Value == "-" ? null : m.Groups[4].Value, m.Groups[5].Value == "-" ? null : m.Groups[5].Value));
        }
        return ticks;
    }

    /// <summary>Lines that begin as a tick line but are not one (spliced or cut by a restore).</summary>
    public IReadOnlyList<string> RejectedLines() =>
        SerialLines().Where(l => l.StartsWith("vmsnap-guest tick=", StringComparison.Ordinal) && !(TickLine().Match(l) is { Success: true } m && m.Groups[1].Value == m.Groups[6].Value)).ToList();

    private string[] SerialLines()
    {
        try
        {
            using var f = new FileStream(Serial, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
            using var r = new StreamReader(f, Encoding.Latin1);
            return r.ReadToEnd().Split('\n').Select(l => l.TrimEnd('\r')).ToArray();
        }
        catch (FileNotFoundException)
        {
            return [];
        }
    }

    /// <summary>The last tick printed so far.</summary>
    public GuestTick LastTick() => Ticks().LastOrDefault() ?? throw new InvalidOperationException($"the guest printed no tick yet:\n{SerialText()}");

    /// <summary>Waits for a tick line matching <paramref name="predicate"/> and returns the first such; fails with the serial output on timeout.</summary>
    public GuestTick WaitForTick(Func<GuestTick, bool> predicate, TimeSpan? timeout = null)
    {
        var clock = Stopwatch.StartNew();
        TimeSpan limit = timeout ?? TimeSpan.FromSeconds(90);
        while (true)
        {
            GuestTick? t = Ticks().FirstOrDefault(predicate);
            if (t is not null) return t;
            if (Vm.HasExited || clock.Elapsed > limit)
                throw new InvalidOperationException($"the guest did not print the tick awaited within {limit.TotalSeconds:0} s (QEMU {(Vm.HasExited ? "exited" : "runs")}); serial:\n{SerialText()}\nQEMU: {Vm.Output}");
            Thread.Sleep(100);
        }
    }

    /// <summary>The serial output (its end, for messages).</summary>
    public string SerialText()
    {
        try
        {
            using var f = new FileStream(Serial, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
            using var r = new StreamReader(f, Encoding.Latin1);
            string s = r.ReadToEnd();
            return s.Length > 3000 ? s[^3000..] : s;
        }
        catch (FileNotFoundException)
        {
            return "(no serial output)";
        }
    }

    /// <summary>QEMU's run state as its QMP says.</summary>
    public string RunState() => Vm.Execute("query-status")?["status"]?.GetValue<string>() ?? "?";

    public void Dispose() => Vm.Dispose();

    // Every field in its exact shape, and the tick number again at the end: see Ticks.
    [GeneratedRegex(@"^vmsnap-guest tick=(\d+) boot=([0-9a-f-]{36}) disks=(ok|bad:vd[ab]) sum=([0-9a-f]{32}|-) churn=(ok|bad:\w+|-) end=(\d+)$")]
    private static partial Regex TickLine();

    // ---- the initramfs ------------------------------------------------------------------------

    private static readonly string[] s_modules =
        ["virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_blk", "failover", "net_failover", "virtio_net"];

    // The pattern: "1\n2\n...500\n", doubled 14 times (31 MB); the first 16 MiB of that are the region.
    private const string InitScript = """
        #!/bin/busybox sh
        /bin/busybox --install -s /bin
        export PATH=/bin
        mount -t proc proc /proc
        mount -t sysfs sys /sys
        mount -t devtmpfs dev /dev
        for m in MODULES; do insmod /modules/$m.ko || echo "vmsnap-guest insmod $m failed"; done
        i=0; while [ ! -b /dev/vdb ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
        boot=$(cat /proc/sys/kernel/random/boot_id)
        mkdir -p /mem && mount -t tmpfs -o size=96m tmpfs /mem
        seq 1 500 > /mem/a
        i=0; while [ $i -lt 14 ]; do cat /mem/a /mem/a > /mem/b; mv /mem/b /mem/a; i=$((i+1)); done
        dd if=/mem/a of=/mem/fill bs=1048576 count=FILLMIB 2>/dev/null; rm /mem/a
        sum=$(md5sum < /mem/fill | cut -d' ' -f1)
        echo "vmsnap-guest ready boot=$boot fill=$sum"
        churn=; grep -q vmsnap.churn /proc/cmdline && churn=1
        if [ -n "$churn" ]; then
          zsum=$(dd if=/dev/zero bs=1048576 count=4 2>/dev/null | md5sum | cut -d' ' -f1)
          cp /mem/fill /mem/c; dd if=/dev/zero of=/mem/z bs=1048576 count=4 2>/dev/null
          ( while true; do
              cp /mem/fill /mem/c.tmp && mv /mem/c.tmp /mem/c
              dd if=/dev/zero of=/mem/z.tmp bs=1048576 count=4 2>/dev/null && mv /mem/z.tmp /mem/z
            done ) &
        fi
        n=0
        while true; do
          n=$((n+1)); b=$((n % 64)); p=$(((n + 63) % 64))
          for d in vda vdb; do printf 'vmsnap %s %08d\n' $d $n | dd of=/dev/$d bs=512 seek=$b count=1 conv=sync oflag=direct 2>/dev/null; done
          ok=ok
          if [ $n -gt 1 ]; then
            for d in vda vdb; do
              got=$(dd if=/dev/$d bs=512 skip=$p count=1 iflag=direct 2>/dev/null | head -n 1)
              [ "$got" = "$(printf 'vmsnap %s %08d' $d $((n - 1)))" ] || ok="bad:$d"
            done
          fi
          s=-; c=-
          if [ $((n % 8)) -eq 0 ]; then
            s=$(md5sum < /mem/fill | cut -d' ' -f1)
            if [ -n "$churn" ]; then
              c=ok
              [ "$(md5sum < /mem/c | cut -d' ' -f1)" = "$sum" ] || c=bad:copy
              [ "$(md5sum < /mem/z | cut -d' ' -f1)" = "$zsum" ] || c=bad:zero
            fi
          fi
          echo "vmsnap-guest tick=$n boot=$boot disks=$ok sum=$s churn=$c end=$n"
          sleep 0.1
        done
        """;

    private static string BuildInitramfs()
    {
        string busybox = "/bin/busybox";
        if (!File.Exists(busybox))
            throw new InvalidOperationException("/bin/busybox is missing; tests/run.sh installs it (busybox-static)");
        var cpio = new NewcArchive();
        foreach (string d in new[] { "bin", "dev", "proc", "sys", "modules", "mem" }) cpio.AddDirectory(d);
        cpio.AddCharDevice("dev/console", 5, 1);
        cpio.AddFile("bin/busybox", File.ReadAllBytes(busybox), 0x1ed);
        foreach (string m in s_modules)
        {
            string path = Path.Combine(TestDeps.Guest, "modules", m + ".ko");
            if (!File.Exists(path)) throw new InvalidOperationException($"the guest module {path} is missing; tests/run.sh downloads it (tests/install-deps.sh)");
            cpio.AddFile($"modules/{m}.ko", File.ReadAllBytes(path));
        }
        string script = InitScript.Replace("MODULES", string.Join(' ', s_modules)).Replace("FILLMIB", FillMiB.ToString()).ReplaceLineEndings("\n") + "\n";
        cpio.AddFile("init", Encoding.ASCII.GetBytes(script), 0x1ed);
        // Named by its content: every test process (and run) with the same busybox, modules and script shares one file.
        byte[] archive = cpio.ToArray();
        string name = Convert.ToHexString(SHA256.HashData(archive))[..16].ToLowerInvariant();
        string folder = Path.Combine(Path.GetTempPath(), "vmsnap-tests", "guest-initramfs");
        Directory.CreateDirectory(folder);
        string file = Path.Combine(folder, name + ".cpio");
        if (!File.Exists(file) || new FileInfo(file).Length != archive.Length)
        {
            string part = file + "." + Guid.NewGuid().ToString("N")[..8];
            File.WriteAllBytes(part, archive);
            File.Move(part, file, overwrite: true);
        }
        return file;
    }

    private static string ComputeFillSum()
    {
        var pattern = new StringBuilder();
        for (int i = 1; i <= 500; i++) pattern.Append(i).Append('\n');
        byte[] unit = Encoding.ASCII.GetBytes(pattern.ToString());
        byte[] region = new byte[FillMiB << 20];
        for (int at = 0; at < region.Length; at += unit.Length) unit.AsSpan(0, Math.Min(unit.Length, region.Length - at)).CopyTo(region.AsSpan(at));
        return Convert.ToHexString(MD5.HashData(region)).ToLowerInvariant();
    }
}
