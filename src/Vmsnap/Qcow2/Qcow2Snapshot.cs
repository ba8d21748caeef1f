namespace Vmsnap.Qcow2;

/// <summary>
/// An internal snapshot of a qcow2 image as its snapshot table records it (what <c>qemu-img
/// snapshot -l</c> lists): ID and name, when it was taken, the guest clock, how much VM state it
/// holds, and where its L1 table is.
/// </summary>
public sealed record Qcow2Snapshot
{
    /// <summary>The snapshot's ID: a decimal number as text when QEMU or vmsnap picked it ("1", "2", ...).</summary>
    public required string Id { get; init; }

    /// <summary>The snapshot's name (QEMU's TAG column).</summary>
    public required string Name { get; init; }

    /// <summary>Bytes of VM state (a migration stream) stored with the snapshot; 0 for a disk-only snapshot.</summary>
    public long VmStateSize { get; init; }

    /// <summary>When the snapshot was taken (UTC; the table keeps seconds and nanoseconds).</summary>
    public DateTimeOffset Date { get; init; }

    /// <summary>Seconds since the Unix epoch of <see cref="Date"/>, as the table stores them (date_sec).</summary>
    public long DateSeconds { get; init; }

    /// <summary>Nanoseconds part of <see cref="Date"/>, as the table stores it (date_nsec; <see cref="Date"/> keeps 100 ns).</summary>
    public long DateNanoseconds { get; init; }

    /// <summary>The guest's virtual clock when the snapshot was taken, in nanoseconds.</summary>
    public long VmClock { get; init; }

    /// <summary>Size of the virtual disk when the snapshot was taken, in bytes.</summary>
    public long DiskSize { get; init; }

    /// <summary>Instruction count of record/replay when the snapshot was taken; -1 when icount was not in use.</summary>
    public long Icount { get; init; } = -1;

    /// <summary>File offset of the snapshot's L1 table.</summary>
    public long L1TableOffset { get; init; }

    /// <summary>Entries in the snapshot's L1 table.</summary>
    public int L1Size { get; init; }
}

/// <summary>What to record in a new snapshot besides its name. The defaults are those of <c>qemu-img snapshot -c</c>, except <see cref="Icount"/>.</summary>
public sealed record Qcow2SnapshotCreateOptions
{
    /// <summary>
    /// Bytes of VM state the snapshot keeps: what was written through
    /// <see cref="Qcow2Image.OpenVmStateAreaForWriting"/> from offset 0. 0 (the default) makes a disk-only snapshot.
    /// </summary>
    public long VmStateSize { get; init; }

    /// <summary>The guest's virtual clock in nanoseconds (default 0).</summary>
    public long VmClock { get; init; }

    /// <summary>When the snapshot was taken (default: now). Kept with microsecond precision, as QEMU does.</summary>
    public DateTimeOffset? Date { get; init; }

    /// <summary>Record/replay instruction count; -1 (the default) means icount was not in use, as QEMU's savevm records it.</summary>
    public long Icount { get; init; } = -1;

    /// <summary>
    /// Bytes the table entry keeps in its extra data after QEMU's fields (at most 1000): QEMU keeps such bytes as they are when
    /// it rewrites the table, and so does vmsnap. Read them back with <see cref="Qcow2Image.GetSnapshotExtraData"/>.
    /// </summary>
    public ReadOnlyMemory<byte> ExtraData { get; init; }
}
