namespace Vmsnap.Qcow2;

/// <summary>
/// One entry of the snapshot table: where the snapshot's L1 table is, its ID and name, when it was
/// taken, how much VM state it holds, and the extra data (64-bit VM-state size, disk size, icount,
/// then bytes vmsnap does not know, kept as they are). Reading lives in SnapshotEntry.Read.cs,
/// writing in SnapshotEntry.Write.cs.
/// </summary>
internal sealed partial class SnapshotEntry
{
    internal const int FixedSize = 40;
    internal const int KnownExtraDataSize = 24;
    internal const int MaxExtraDataSize = 1024;   // QEMU: QCOW_MAX_SNAPSHOT_EXTRA_DATA

    internal long L1TableOffset { get; set; }
    internal uint L1Size { get; set; }
    internal string Id { get; set; } = "";
    internal string Name { get; set; } = "";
    internal uint DateSeconds { get; set; }
    internal uint DateNanoseconds { get; set; }
    internal ulong VmClockNanoseconds { get; set; }

    /// <summary>The 32-bit vm_state_size field as stored (ignored when the 64-bit one is present).</summary>
    internal uint VmStateSize32 { get; set; }

    /// <summary>Extra data bytes 0..7: the 64-bit VM-state size, when present.</summary>
    internal ulong? VmStateSizeLarge { get; set; }

    /// <summary>Extra data bytes 8..15: the virtual disk size when the snapshot was taken, when present.</summary>
    internal ulong? DiskSize { get; set; }

    /// <summary>Extra data bytes 16..23: the record/replay instruction count (-1 when icount was off), when present.</summary>
    internal long? Icount { get; set; }

    /// <summary>Extra data past the fields vmsnap knows, kept byte for byte.</summary>
    internal byte[] UnknownExtraData { get; set; } = [];

    /// <summary>Where the entry was read from in the file (for error messages); -1 for a new entry.</summary>
    internal long FileOffset { get; set; } = -1;

    /// <summary>Size of the VM state in bytes.</summary>
    internal long VmStateSize => VmStateSizeLarge is ulong large ? (long)Math.Min(large, long.MaxValue) : VmStateSize32;

    /// <summary>The time the snapshot was taken.</summary>
    internal DateTimeOffset Date => DateTimeOffset.FromUnixTimeSeconds(DateSeconds).AddTicks(DateNanoseconds / 100);
}
