namespace Vmsnap.Qcow2;

/// <summary>Sizes and index arithmetic that follow from cluster_bits, extended_l2 and refcount_order.</summary>
internal sealed class ClusterGeometry
{
    internal const int SubclustersPerCluster = 32;
    internal const long MaxL1Bytes = 32L << 20;        // QEMU: QCOW_MAX_L1_SIZE
    internal const long MaxRefcountTableBytes = 8L << 20; // QEMU: QCOW_MAX_REFTABLE_SIZE
    internal const long MaxGuestOffset = 1L << 56;      // L2 entries hold host offsets below 2^56

    internal ClusterGeometry(int clusterBits, bool extendedL2, int refcountOrder)
    {
        ClusterBits = clusterBits;
        ClusterSize = 1 << clusterBits;
        ExtendedL2 = extendedL2;
        L2EntrySize = extendedL2 ? 16 : 8;
        L2Bits = clusterBits - (extendedL2 ? 4 : 3);
        L2Entries = 1 << L2Bits;
        SubclusterCount = extendedL2 ? SubclustersPerCluster : 1;
        SubclusterSize = ClusterSize / SubclusterCount;
        RefcountOrder = refcountOrder;
        RefcountBits = 1 << refcountOrder;
        RefcountBlockBits = clusterBits + 3 - refcountOrder;
        RefcountBlockEntries = 1L << RefcountBlockBits;
        RefcountMax = refcountOrder == 6 ? ulong.MaxValue : (1UL << RefcountBits) - 1;
        CompressedSizeShift = 62 - (clusterBits - 8);
        CompressedSizeMask = (1UL << (clusterBits - 8)) - 1;
        CompressedOffsetMask = (1UL << CompressedSizeShift) - 1;
    }

    internal int ClusterBits { get; }
    internal int ClusterSize { get; }
    internal bool ExtendedL2 { get; }
    internal int L2EntrySize { get; }
    internal int L2Bits { get; }
    internal int L2Entries { get; }
    internal int SubclusterCount { get; }
    internal int SubclusterSize { get; }
    internal int RefcountOrder { get; }
    internal int RefcountBits { get; }
    internal int RefcountBlockBits { get; }
    internal long RefcountBlockEntries { get; }
    internal ulong RefcountMax { get; }
    internal int CompressedSizeShift { get; }
    internal ulong CompressedSizeMask { get; }
    internal ulong CompressedOffsetMask { get; }

    /// <summary>Guest bytes one L2 table maps.</summary>
    internal long BytesPerL2 => (long)ClusterSize << L2Bits;

    internal long L1Index(long guestOffset) => guestOffset >> (ClusterBits + L2Bits);
    internal int L2Index(long guestOffset) => (int)((guestOffset >> ClusterBits) & (L2Entries - 1));
    internal long OffsetInCluster(long offset) => offset & (ClusterSize - 1);
    internal long ClustersFor(long bytes) => (bytes + ClusterSize - 1) >> ClusterBits;

    /// <summary>L1 entries needed to map <paramref name="size"/> guest bytes (QEMU's size_to_l1).</summary>
    internal long L1EntriesFor(long size) => (size + BytesPerL2 - 1) / BytesPerL2;
}
