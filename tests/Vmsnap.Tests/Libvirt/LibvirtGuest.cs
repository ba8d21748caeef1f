using System.Diagnostics;
using System.Security;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Libvirt;

/// <summary>
/// The libvirt tests share one libvirtd, which <see cref="LibvirtKillTests"/> kills and starts again: they run one class at a time.
/// </summary>
[CollectionDefinition(Name)]
public sealed class LibvirtdCollection
{
    public const string Name = "libvirtd";
}

/// <summary>
/// One libvirt the libvirt tests run on, with the QEMU its domains run: Debian 12's libvirt 9.0 (qemu:///system; tests/libvirtd.sh
/// starts it) with its QEMU 7.2, and libvirt 11.3 from the backports with QEMU 10.0, beside it (tests/libvirtd11.sh starts it in a
/// mount namespace of its own, on a socket in tests/.deps/libvirt-11.3). Each test runs on both (<see cref="Names"/>).
/// </summary>
internal sealed class LibvirtSetup
{
    private readonly Lazy<bool> _daemon;

    private LibvirtSetup(string name, string uri, string qemuVersion, string daemonScript, string pidFile, string libDir, bool readsSaveHeaderTwice)
    {
        Name = name;
        LibDir = libDir;
        ReadsSaveHeaderTwice = readsSaveHeaderTwice;
        Uri = uri;
        QemuVersion = qemuVersion;
        DaemonScript = daemonScript;
        PidFile = pidFile;
        _daemon = new(() => { StartDaemon(); return true; }, LazyThreadSafetyMode.ExecutionAndPublication);
    }

    private static string Scripts => Path.GetDirectoryName(TestDeps.Folder)!;

    private static string State11 => Path.Combine(TestDeps.Folder, "libvirt-11.3", "state");

    public static readonly IReadOnlyList<LibvirtSetup> All =
    [
        new("libvirt 9.0, QEMU 7.2", "qemu:///system", "7.2", Path.Combine(Scripts, "libvirtd.sh"), "/run/libvirtd.pid", "/var/lib/libvirt", readsSaveHeaderTwice: false),
        new("libvirt 11.3, QEMU 10.0", $"qemu:///system?socket={Path.Combine(State11, "run", "libvirt-sock")}", "10.0",
            Path.Combine(Scripts, "libvirtd11.sh"), Path.Combine(State11, "run", "libvirtd.pid"), Path.Combine(State11, "lib"),
            readsSaveHeaderTwice: true),
    ];

    /// <summary>The setups' names, for [MemberData]: a test's name says which libvirt and QEMU it ran.</summary>
    public static TheoryData<string> Names => new(All.Select(s => s.Name));

    public static LibvirtSetup Get(string name) => All.Single(s => s.Name == name);

    /// <summary>"libvirt 9.0, QEMU 7.2" or "libvirt 11.3, QEMU 10.0".</summary>
    public string Name { get; }

    /// <summary>The URI virsh and vmsnap (--connect) reach this libvirtd on.</summary>
    public string Uri { get; }

    /// <summary>The QEMU its domains run (the tests' qemu-img is that version's).</summary>
    public string QemuVersion { get; }

    /// <summary>The script that starts this libvirtd when it does not answer.</summary>
    public string DaemonScript { get; }

    /// <summary>Where this libvirtd writes its process ID.</summary>
    public string PidFile { get; }

    /// <summary>Whether its restore reads a save image's header and XML twice (measured: 11.3 does, 9.0 does not; docs/libvirt.md).</summary>
    public bool ReadsSaveHeaderTwice { get; }

    /// <summary>The daemon's /var/lib/libvirt (11.3's is a folder of its unpacked tree, in its own mount namespace).</summary>
    public string LibDir { get; }

    /// <summary>Where the daemon puts a domain's RAM when it is a file (libvirt's default memory_backing_dir).</summary>
    public string MemoryBackingDir => Path.Combine(LibDir, "qemu", "ram");

    /// <summary>The emulator its domains name: this QEMU's qemu-system-x86_64.</summary>
    public string Emulator => QemuInstall.Get(QemuVersion).Path("qemu-system-x86_64");

    /// <summary>Makes sure the daemon answers (once per test run; <see cref="StartDaemon"/> again after a kill).</summary>
    public void EnsureDaemon() => _ = _daemon.Value;

    /// <summary>Starts this libvirtd unless it answers; again after <see cref="KillDaemon"/>, when it reconnects to the running domains.</summary>
    public void StartDaemon()
    {
        Tool.Result r = Tool.RunPath(DaemonScript, [], TimeSpan.FromMinutes(1));
        if (r.ExitCode != 0) throw new InvalidOperationException($"{DaemonScript} could not start libvirtd (tests/run.sh installs it): {r.Stderr}");
    }

    /// <summary>Kills this libvirtd with SIGKILL (its pid file names it) and waits until it is gone; its QEMUs run on.</summary>
    public void KillDaemon()
    {
        int pid = int.Parse(File.ReadAllText(PidFile).Trim(), System.Globalization.CultureInfo.InvariantCulture);
        using Process daemon = Process.GetProcessById(pid);
        Assert.Equal("libvirtd", daemon.ProcessName);
        daemon.Kill();
        daemon.WaitForExit();
    }

    public override string ToString() => Name;
}

/// <summary>
/// The test guest (<see cref="TestGuest"/>'s kernel and initramfs) as a persistent libvirt domain of type qemu (TCG) with direct kernel
/// boot and two qcow2 virtio disks, on one <see cref="LibvirtSetup"/>'s libvirtd (started when it does not answer).
/// Its serial port goes to a file libvirt appends to, so ticks printed before and after a restore are both there. Disposing destroys and
/// undefines the domain with its snapshot metadata, through libvirt.
/// </summary>
internal sealed class LibvirtGuest : IDisposable
{
    public const int RamMiB = 256;

    private LibvirtGuest(LibvirtSetup setup, TempDir dir, string name, string serial, string[] disks)
    {
        Setup = setup;
        Dir = dir;
        Name = name;
        Serial = serial;
        Disks = disks;
    }

    public LibvirtSetup Setup { get; }

    /// <summary>The libvirt URI virsh and vmsnap reach the domain's libvirtd on.</summary>
    public string Uri => Setup.Uri;

    /// <summary>vmsnap's arguments that name this domain: --domain NAME --connect URI.</summary>
    public string[] Domain => ["--domain", Name, "--connect", Uri];

    public TempDir Dir { get; }
    public string Name { get; }
    public string Serial { get; }
    public string[] Disks { get; }

    /// <summary>Defines and starts the domain in <paramref name="dir"/> on <paramref name="setup"/>; returns once the guest printed its first tick.</summary>
    /// <param name="memoryBacking">A &lt;memoryBacking&gt; element for the domain, or null for ordinary RAM.</param>
    public static LibvirtGuest Boot(TempDir dir, LibvirtSetup setup, string? memoryBacking = null)
    {
        setup.EnsureDaemon();
        string name = "vmsnap-test-" + Guid.NewGuid().ToString("N")[..10];
        string[] disks = [dir.File("disk0.qcow2"), dir.File("disk1.qcow2")];
        foreach (string d in disks) Tool.QemuImg("create", "-q", "-f", "qcow2", d, TestGuest.DiskBytes.ToString());
        string serial = dir.File("serial.log");
        string x(string s) => SecurityElement.Escape(s);
        string xml = $"""
            <domain type='qemu'>
              <name>{name}</name>
              <memory unit='MiB'>{RamMiB}</memory>
              {memoryBacking}
              <vcpu>1</vcpu>
              <os>
                <type arch='x86_64' machine='pc'>hvm</type>
                <kernel>{x(Path.Combine(TestDeps.Guest, "vmlinuz"))}</kernel>
                <initrd>{x(TestGuest.Initramfs)}</initrd>
                <cmdline>console=ttyS0 quiet panic=-1</cmdline>
              </os>
              <on_reboot>destroy</on_reboot>
              <devices>
                <emulator>{x(setup.Emulator)}</emulator>
                <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{x(disks[0])}'/><target dev='vda' bus='virtio'/></disk>
                <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{x(disks[1])}'/><target dev='vdb' bus='virtio'/></disk>
                <serial type='file'><source path='{x(serial)}' append='on'/><target port='0'/></serial>
                <memballoon model='none'/>
              </devices>
            </domain>
            """;
        string file = dir.File("domain.xml");
        File.WriteAllText(file, xml);
        var guest = new LibvirtGuest(setup, dir, name, serial, disks);
        guest.Virsh("define", file);
        try
        {
            guest.Virsh("start", name);
            guest.WaitForTick(_ => true, TimeSpan.FromMinutes(3));
            return guest;
        }
        catch
        {
            guest.Dispose();
            throw;
        }
    }

    /// <summary>Starts the domain's libvirtd unless it answers (after <see cref="KillDaemon"/>: it reconnects to the running domains).</summary>
    public void StartDaemon() => Setup.StartDaemon();

    /// <summary>Kills the domain's libvirtd with SIGKILL; its QEMUs run on.</summary>
    public void KillDaemon() => Setup.KillDaemon();

    /// <summary>Runs virsh on <see cref="Uri"/>; requires success and returns its output.</summary>
    public string Virsh(params string[] args)
    {
        Tool.Result r = TryVirsh(args);
        Assert.True(r.ExitCode == 0, $"virsh {string.Join(' ', args)} exited {r.ExitCode}: {r.Stderr}");
        return r.Stdout;
    }

    /// <summary>Runs virsh on <see cref="Uri"/>.</summary>
    public Tool.Result TryVirsh(params string[] args) => Tool.RunPath(Tool.Find("virsh"), ["-c", Uri, .. args], TimeSpan.FromMinutes(3));

    /// <summary>virsh domstate: running, paused, shut off, ...</summary>
    public string State() => Virsh("domstate", Name).Trim();

    /// <summary>The names of the domain's snapshots in libvirt.</summary>
    public string[] SnapshotNames() => Virsh("snapshot-list", Name, "--name").Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);

    /// <summary>The names of the snapshots in a disk's table, as qemu-img lists them (shared: the domain's QEMU may hold it).</summary>
    public static string[] DiskSnapshotNames(string image) => Live.LiveKit.Snapshots(image).Select(s => s.Name).ToArray();

    /// <summary>Every tick in the serial output, across restores.</summary>
    public IReadOnlyList<GuestTick> Ticks() => TestGuest.TicksIn(Serial);

    /// <summary>
    /// libvirt's own snapshot <paramref name="tag"/> (virsh snapshot-create-as) of the running guest; returns the ticks around it
    /// and the serial log's mark, for <see cref="AssertResumes"/> after a revert to it.
    /// </summary>
    public (Live.SaveWindow Window, int Mark) VirshSnapshot(string tag)
    {
        GuestTick before = LastTick();
        Virsh("snapshot-create-as", Name, tag);
        var window = new Live.SaveWindow(before.N, WaitForTickAfter(LastTick().N).N, before.Boot);
        return (window, MarkBeforeRestore(window));
    }

    /// <summary>
    /// Before a restore to a snapshot taken in <paramref name="window"/>: waits until the guest has counted past the window, and returns
    /// how many ticks there are, so that the restored guest's ticks (back inside the window) are told from those printed before.
    /// </summary>
    /// <remarks>
    /// The running guest's tick is the log's last one: after an earlier restore, the log also holds the ticks of the run that was
    /// loaded over, numbered past this window, so a tick found anywhere in the log does not say where the running guest is.
    /// </remarks>
    public int MarkBeforeRestore(Live.SaveWindow window)
    {
        WaitForTick(t => t.N > window.After + 2, source: () => Ticks().TakeLast(1).ToList());
        return Ticks().Count;
    }

    /// <summary>
    /// The first tick the running guest prints after tick <paramref name="n"/>, the log's last one now. Only ticks printed from now on
    /// count, for the reason <see cref="MarkBeforeRestore"/> gives.
    /// </summary>
    public GuestTick WaitForTickAfter(long n)
    {
        int printed = Ticks().Count;
        return WaitForTick(t => t.N > n, source: () => Ticks().Skip(printed).ToList());
    }

    /// <summary>The ticks printed since <paramref name="mark"/> from the first one back inside <paramref name="window"/> on: the restored guest's.</summary>
    private List<GuestTick> RestoredTicks(int mark, Live.SaveWindow window) =>
        Ticks().Skip(mark).SkipWhile(t => t.N > window.After + 1).ToList();

    public GuestTick LastTick() => Ticks().LastOrDefault() ?? throw new InvalidOperationException("the guest printed no tick yet");

    /// <summary>Waits for a tick matching <paramref name="predicate"/> among <paramref name="source"/> (default: all ticks).</summary>
    public GuestTick WaitForTick(Func<GuestTick, bool> predicate, TimeSpan? timeout = null, Func<IReadOnlyList<GuestTick>>? source = null)
    {
        var clock = Stopwatch.StartNew();
        TimeSpan limit = timeout ?? TimeSpan.FromSeconds(90);
        while (true)
        {
            GuestTick? t = (source ?? Ticks)().FirstOrDefault(predicate);
            if (t is not null) return t;
            if (clock.Elapsed > limit)
                throw new InvalidOperationException($"domain {Name}: the guest did not print the tick awaited within {limit.TotalSeconds:0} s (state {State()}); serial:\n{Tail()}");
            Thread.Sleep(100);
        }
    }

    private string Tail()
    {
        try
        {
            using var f = new FileStream(Serial, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
            string s = new StreamReader(f).ReadToEnd();
            return s.Length > 2000 ? s[^2000..] : s;
        }
        catch (FileNotFoundException)
        {
            return "(no serial output)";
        }
    }

    /// <summary>
    /// Checks the guest restored from a snapshot taken in <paramref name="window"/>: its first tick after the restore inside the window,
    /// the same boot, the disks reading back right, the memory region's checksum, and consecutive ticks. <paramref name="mark"/>: from <see cref="MarkBeforeRestore"/>.
    /// </summary>
    public void AssertResumes(Live.SaveWindow window, int mark)
    {
        WaitForTick(_ => true, source: () => RestoredTicks(mark, window));
        window.AssertResumedIn(RestoredTicks(mark, window)[0]);
        GuestTick summed = WaitForTick(t => t.Sum is not null, source: () => RestoredTicks(mark, window));
        Assert.Equal(TestGuest.ExpectedFillSum, summed.Sum);
        var ticks = RestoredTicks(mark, window);
        foreach (GuestTick t in ticks)
        {
            Assert.Equal(window.Boot, t.Boot);
            Assert.True(t.Disks == "ok", $"tick {t.N} after the restore: the disks did not read back what the guest wrote ({t.Disks})");
        }
        for (int i = 1; i < ticks.Count; i++) Assert.Equal(ticks[i - 1].N + 1, ticks[i].N);
    }

    public void Dispose()
    {
        // A test that killed libvirtd and failed before starting it again: the domain can only be destroyed through it.
        try { StartDaemon(); }
        catch (InvalidOperationException) { }
        TryVirsh("destroy", Name);
        TryVirsh("undefine", Name, "--snapshots-metadata");
    }
}
