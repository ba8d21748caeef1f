using System.Collections.Concurrent;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Migration;

/// <summary>
/// Migration streams made by real QEMU, once per version for the whole test run: a device-less guest
/// (<c>-machine none</c>) and a paused PC of that version's current machine type (<c>pc-i440fx-7.2</c>,
/// <c>pc-i440fx-10.0</c>), each with 64 MiB of seeded RAM held in a memory-backend-file, migrated with
/// <c>migrate "exec:cat &gt; FILE"</c>. <c>qemu.ForCurrent()</c> gives the test's version's streams (made on first use,
/// by that version's QEMU).
/// </summary>
public sealed class QemuStreams
{
    public const long RamBytes = 64 << 20;

    private static readonly ConcurrentDictionary<string, Lazy<VersionStreams>> Made = new();

    /// <summary>The streams of the QEMU this test runs on.</summary>
    public VersionStreams ForCurrent() => For(QemuInstall.Current.Version);

    /// <summary>The streams of QEMU <paramref name="version"/>.</summary>
    public VersionStreams For(string version) =>
        Made.GetOrAdd(version, v => new Lazy<VersionStreams>(() => new VersionStreams(v), LazyThreadSafetyMode.ExecutionAndPublication)).Value;
}

/// <summary>The streams one QEMU version made; their folder goes when the test process ends.</summary>
public sealed class VersionStreams
{
    private readonly TempDir _dir = new();

    internal VersionStreams(string version)
    {
        Version = version;
        using var _ = QemuInstall.Use(version);
        NoneRam = _dir.File("none-ram0");
        NoneZeroPages = GuestRam.Create(NoneRam, QemuStreams.RamBytes, seed: 11);
        NoneStream = _dir.File("none.mig");
        QemuVm.SaveStream(QemuVm.MachineNone(NoneRam, QemuStreams.RamBytes), NoneStream);

        PcMachine = QemuInstall.Current.PcMachine;
        PcRam = _dir.File("pc-ram0");
        GuestRam.Create(PcRam, QemuStreams.RamBytes, seed: 12);
        PcStream = _dir.File("pc.mig");
        QemuVm.SaveStream(QemuVm.MachinePc(PcRam, QemuStreams.RamBytes), PcStream);
        AppDomain.CurrentDomain.ProcessExit += (_, _) => _dir.Dispose();
    }

    /// <summary>The QEMU version that made them.</summary>
    public string Version { get; }

    /// <summary>RAM file of the machine-none guest (unchanged by the migration: the guest never ran).</summary>
    public string NoneRam { get; }

    /// <summary>All-zero pages the RAM generator made for <see cref="NoneRam"/>.</summary>
    public long NoneZeroPages { get; }

    public string NoneStream { get; }

    /// <summary>The PC's machine type (the version's current i440FX type).</summary>
    public string PcMachine { get; }

    /// <summary>RAM file (block ram0) of the PC guest.</summary>
    public string PcRam { get; }

    public string PcStream { get; }
}
