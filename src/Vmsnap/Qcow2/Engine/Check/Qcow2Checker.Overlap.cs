namespace Vmsnap.Qcow2;

// QEMU's metadata overlap check (qcow2_check_metadata_overlap with its default "cached" set): a
// repair write that would land on metadata is refused, and the image is marked corrupt.
internal sealed partial class Qcow2Checker
{
    [Flags]
    private enum Metadata
    {
        None = 0,
        MainHeader = 1 << 0,
        ActiveL1 = 1 << 1,
        ActiveL2 = 1 << 2,
        RefcountTable = 1 << 3,
        RefcountBlock = 1 << 4,
        SnapshotTable = 1 << 5,
        InactiveL1 = 1 << 6,
        InactiveL2 = 1 << 7,   // not in QEMU's default set: it means reading every snapshot L1 table
        BitmapDirectory = 1 << 8,
    }

    private const Metadata DefaultOverlapChecks = Metadata.MainHeader | Metadata.ActiveL1 | Metadata.ActiveL2 | Metadata.RefcountTable
        | Metadata.RefcountBlock | Metadata.SnapshotTable | Metadata.InactiveL1 | Metadata.BitmapDirectory;

    /// <summary>The metadata a write of [offset, offset + size) would hit, in QEMU's words, or null.</summary>
    private string? Overlap(Metadata ignore, long offset, long size)
    {
        Metadata checks = DefaultOverlapChecks & ~ignore;
        if (size == 0) return null;
        if ((checks & Metadata.MainHeader) != 0 && offset < ClusterSize) return "qcow2_header";
        // Whole clusters, as QEMU compares them.
        ulong start = (ulong)offset & ~(ulong)(ClusterSize - 1);
        ulong length = ((ulong)(offset & (ClusterSize - 1)) + (ulong)size + (ulong)ClusterSize - 1) & ~(ulong)(ClusterSize - 1);
        bool Hits(ulong at, ulong bytes) => bytes > 0 && !(at + bytes - 1 < start || start + length - 1 < at);

        if ((checks & Metadata.ActiveL1) != 0 && H.L1Size > 0 && Hits(H.L1TableOffset, H.L1Size * 8UL)) return "active L1 table";
        if ((checks & Metadata.RefcountTable) != 0 && H.RefcountTableClusters > 0
            && Hits(H.RefcountTableOffset, (ulong)H.RefcountTableClusters * (ulong)ClusterSize)) return "refcount table";
        if ((checks & Metadata.SnapshotTable) != 0 && _snapshotsSize > 0 && Hits((ulong)_snapshotsOffset, (ulong)_snapshotsSize)) return "snapshot table";
        if ((checks & Metadata.InactiveL1) != 0)
            foreach (SnapshotEntry sn in _snapshots)
                if (sn.L1Size > 0 && Hits((ulong)sn.L1TableOffset, sn.L1Size * 8UL)) return "inactive L1 table";
        if ((checks & Metadata.ActiveL2) != 0)
            foreach (ulong entry in _activeL1.Entries)
                if ((entry & L1Entry.OffsetMask) != 0 && Hits(entry & L1Entry.OffsetMask, (ulong)ClusterSize)) return "active L2 table";
        if ((checks & Metadata.RefcountBlock) != 0)
            foreach (ulong entry in _refcounts.Table)
                if ((entry & RefcountTableEntry.OffsetMask) != 0 && Hits(entry & RefcountTableEntry.OffsetMask, (ulong)ClusterSize)) return "refcount block";
        if ((checks & Metadata.BitmapDirectory) != 0 && (H.AutoclearFeatures & Qcow2Header.AutoclearBitmaps) != 0
            && H.FindExtension(HeaderExtension.Bitmaps) is { } ext)
        {
            var (_, dirOffset, dirSize) = BitmapDirectory.ParseExtension(ext.Data);
            if (Hits((ulong)dirOffset, (ulong)dirSize)) return "bitmap directory";
        }
        return null;
    }
}
