using Kind = Vmsnap.Qcow2.Qcow2CheckFindingKind;

namespace Vmsnap.Qcow2;

// A new refcount structure written from the in-memory counts, placed as QEMU's
// rebuild_refcount_structure places it (so that both tools leave the same image).
internal sealed partial class Qcow2Checker
{
    /// <summary>
    /// Writes refcount blocks for every range that holds a used cluster, each in the first cluster
    /// free in the in-memory counts (from the start of its own range on), then the refcount table in
    /// the first free run, repeating while the table has to grow; then the header switches to the
    /// new table in one write. The old structure is simply no longer referenced (a leak, freed by
    /// the comparison that follows).
    /// </summary>
    private void RebuildRefcountStructure()
    {
        _caches.FlushAll();
        ulong[] table = [];
        bool grown = WriteRefblocks(0, _clusters, ref table);
        if (!grown) throw new InvalidOperationException("a rebuild found no cluster in use");   // the header cluster always is
        long tableOffset;
        long tableClusters;
        do
        {
            tableClusters = _g.ClustersFor(table.LongLength * 8);
            long firstFree = 0;
            tableOffset = AllocateInCounts(tableClusters, ref firstFree);
            long startCluster = tableOffset >> _g.ClusterBits;
            // The table's own clusters are counted now: the blocks covering them are written again.
            grown = WriteRefblocks(startCluster, startCluster + tableClusters, ref table);
        }
        while (grown);

        if (Overlap(Qcow2Metadata.None, tableOffset, table.LongLength * 8) is string what)
        {
            SignalCorruption($"Preventing invalid write on metadata (overlaps with {what})");
            Report(Kind.Error, "ERROR writing reftable: Input/output error");
            throw new CheckFailedException($"the rebuilt refcount table at 0x{tableOffset:x} would overwrite the {what}");
        }
        _refcounts.InstallRebuilt(table, tableOffset);
    }

    /// <summary>
    /// Writes the refcount blocks for the used clusters of [first, end), allocating those not yet
    /// placed (QEMU's rebuild_refcounts_write_refblocks); true when <paramref name="table"/> grew.
    /// </summary>
    private bool WriteRefblocks(long first, long end, ref ulong[] table)
    {
        long firstFree = 0;
        bool grown = false;
        long perBlock = _g.RefcountBlockEntries;
        for (long cluster = first; cluster < end; cluster++)
        {
            if (Count(cluster) == 0) continue;
            long index = cluster >> _g.RefcountBlockBits;
            long blockStart = index << _g.RefcountBlockBits;
            long blockOffset;
            if (index < table.LongLength && table[index] != 0)
            {
                blockOffset = (long)table[index];
            }
            else
            {
                // Not in a block already written: start looking in this block's own range.
                if (firstFree < blockStart) firstFree = blockStart;
                blockOffset = AllocateInCounts(1, ref firstFree);
                long blockCluster = blockOffset >> _g.ClusterBits;
                if (blockCluster >= end) end = blockCluster + 1;   // the block holding this block's refcount must be written too
                if (table.LongLength <= index)
                {
                    long entries = (((index + 1) * 8 + ClusterSize - 1) & ~(long)(ClusterSize - 1)) / 8;
                    if (entries * 8 > ClusterGeometry.MaxRefcountTableBytes) throw RebuildFailed("reftable memory", "the refcount table would be larger than qcow2 allows");
                    Array.Resize(ref table, (int)entries);
                    grown = true;
                }
                table[index] = (ulong)blockOffset;
            }
            if (Overlap(Qcow2Metadata.None, blockOffset, ClusterSize) is string what)
            {
                SignalCorruption($"Preventing invalid write on metadata (overlaps with {what})");
                throw RebuildFailed("writing refblock", $"the rebuilt refcount block at 0x{blockOffset:x} would overwrite the {what}");
            }
            _refcounts.WriteBlock(_refcounts.BuildBlock(index, Count), blockOffset);
            cluster = blockStart + perBlock - 1;   // this block is done
        }
        return grown;
    }

    private CheckFailedException RebuildFailed(string what, string reason)
    {
        Report(Kind.Error, $"ERROR {what}: Input/output error");
        _res.CheckErrors++;
        return new CheckFailedException(reason);
    }

    /// <summary>
    /// Finds <paramref name="count"/> contiguous clusters free in the in-memory counts from
    /// <paramref name="firstFree"/> on (growing the counts past their end when needed), counts them
    /// as used and returns the offset of the first (QEMU's alloc_clusters_imrt).
    /// <paramref name="firstFree"/> moves to the first free cluster seen.
    /// </summary>
    private long AllocateInCounts(long count, ref long firstFree)
    {
        long cluster = firstFree, contiguous = 0;
        bool firstGap = true;
        for (; cluster < _clusters && contiguous < count; cluster++)
        {
            if (_counts[cluster] == 0)
            {
                contiguous++;
                if (firstGap)
                {
                    firstFree = cluster;
                    firstGap = false;
                }
            }
            else
            {
                contiguous = 0;
            }
        }
        if (contiguous < count) Grow(cluster + count - contiguous);
        cluster -= contiguous;
        for (long i = 0; i < count; i++) _counts[cluster + i] = 1;
        return cluster << _g.ClusterBits;
    }
}
