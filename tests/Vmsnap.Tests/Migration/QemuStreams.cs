using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Migration;

/// <summary>
/// Migration streams made once by real QEMU 7.2 for the interop tests of a class: a device-less guest
/// (<c>-machine none</c>) and a paused PC (<c>-machine pc -S</c>), each with 64 MiB of seeded RAM held in
/// a memory-backend-file, migrated with <c>migrate "exec:cat &gt; FILE"</c>.
/// </summary>
public sealed class QemuStreams : IDisposable
{
    public const long RamBytes = 64 << 20;

    private readonly TempDir _dir = new();

    public QemuStreams()
    {
        NoneRam = _dir.File("none-ram0");
        NoneZeroPages = GuestRam.Create(NoneRam, RamBytes, seed: 11);
        NoneStream = _dir.File("none.mig");
        QemuVm.SaveStream(QemuVm.MachineNone(NoneRam, RamBytes), NoneStream);

        PcRam = _dir.File("pc-ram0");
        GuestRam.Create(PcRam, RamBytes, seed: 12);
        PcStream = _dir.File("pc.mig");
        QemuVm.SaveStream(QemuVm.MachinePc(PcRam, RamBytes), PcStream);
    }

    /// <summary>RAM file of the machine-none guest (unchanged by the migration: the guest never ran).</summary>
    public string NoneRam { get; }

    /// <summary>All-zero pages the RAM generator made for <see cref="NoneRam"/>.</summary>
    public long NoneZeroPages { get; }

    public string NoneStream { get; }

    /// <summary>RAM file (block ram0) of the PC guest.</summary>
    public string PcRam { get; }

    public string PcStream { get; }

    public void Dispose() => _dir.Dispose();
}
