using Vmsnap.Storage;

namespace Vmsnap.Qcow2;

/// <summary>
/// Reference counts, the one owner of every refcount write: the refcount table and the refcount
/// blocks (kept in the engine's state, <see cref="Qcow2State"/>), cluster allocation, freeing, and
/// growing the refcount table when the file outgrows it; the refcounts of a new metadata generation
/// (<see cref="Generation"/>, for snapshot create, delete and apply); and installing a rebuilt
/// structure (the check's repair). Not thread-safe: the engine calls it under its metadata lock.
/// </summary>
/// <remarks>
/// Write order: a new reference needs its refcount increment on disk first, so an increment makes
/// the L2 cache depend on the refcount block cache; a dropped reference must be on disk before the
/// decrement, so a decrement makes the refcount block cache depend on the L2 cache (see
/// <see cref="MetadataCache.SetDependency"/>: dirty refcount blocks hold either pending increments or
/// pending decrements, never both). A crash can then leak clusters but never leave a referenced
/// cluster counted free. A cluster freed is not handed out again until the L2 cache was flushed
/// after the free (the references to it are gone on disk by then).
/// </remarks>
internal sealed partial class RefcountManager
{
    private readonly Qcow2File _file;
    private readonly ClusterGeometry _g;
    private readonly Qcow2Header _header;
    private readonly RefcountTable _table;
    private readonly MetadataCache _blocks;
    private readonly MetadataCache _mapping;
    private readonly ImageHealth _health;
    private readonly HashSet<long> _freedSinceFlush = [];
    private long _freedAtMappingFlush;   // the L2 cache's flush count when _freedSinceFlush was filled
    // Refcount decrements owed for references already dropped in memory (the clusters of a failed
    // data write, or an old reference whose decrement failed on the device): done at the next flush.
    private readonly List<(long Offset, long Length)> _owed = [];
    private long _freeHint;
    private long _lowestFreed = long.MaxValue;

    /// <param name="file">The image file, for refcount blocks and table writes.</param>
    /// <param name="geometry">The image's geometry.</param>
    /// <param name="header">The header (its refcount table fields change when the table moves).</param>
    /// <param name="table">The refcount table in memory.</param>
    /// <param name="blocks">The refcount block cache.</param>
    /// <param name="mapping">The L2 table cache: the cache an increment's new reference lives in, and a decrement waits for.</param>
    /// <param name="health">Where a corruption found is recorded.</param>
    internal RefcountManager(Qcow2File file, ClusterGeometry geometry, Qcow2Header header, RefcountTable table, MetadataCache blocks,
        MetadataCache mapping, ImageHealth health)
    {
        _file = file;
        _g = geometry;
        _header = header;
        _table = table;
        _blocks = blocks;
        _mapping = mapping;
        _health = health;
        HighWater = geometry.ClustersFor(file.Device.Length);
    }

    internal MetadataCache Blocks => _blocks;
    internal long TableOffset => _table.Offset;
    internal int TableClusters => _table.Clusters;
    internal ReadOnlySpan<ulong> Table => _table.Entries;

    /// <summary>No cluster below this one is free (where allocation starts looking).</summary>
    internal long FreeHint
    {
        get
        {
            SyncFreed();
            return _freeHint;
        }
    }

    /// <summary>One past the highest cluster index allocated or present in the file.</summary>
    internal long HighWater { get; private set; }

    private Qcow2FormatException Corrupt(string structure, long? offset, string problem) => _health.Corrupt(structure, offset, problem);

    private Qcow2FormatException CorruptionFound(string structure, long? offset, string problem) => _health.Found(structure, offset, problem);

    /// <summary>Reads refcounts of many clusters, looking each refcount block up once per run of clusters it covers.</summary>
    internal struct Reader(RefcountManager refcounts)
    {
        private long _index = -1;
        private byte[]? _block;

        internal ulong Get(long cluster)
        {
            long index = cluster >> refcounts._g.RefcountBlockBits;
            if (index != _index)
            {
                long offset = refcounts.BlockOffset(index);
                _block = offset == 0 ? null : refcounts._blocks.Get(offset).Data;
                _index = index;
            }
            return _block is null ? 0 : RefcountBlock.Get(_block, cluster & (refcounts._g.RefcountBlockEntries - 1), refcounts._g.RefcountOrder);
        }
    }

    private long BlockOffset(long tableIndex)
    {
        if (tableIndex >= _table.Length) return 0;
        ulong e = _table.Entries[tableIndex];
        long offset = (long)(e & RefcountTableEntry.OffsetMask);
        if ((offset & (_g.ClusterSize - 1)) != 0)
            throw CorruptionFound("refcount table", TableOffset + tableIndex * 8, $"entry {tableIndex} points to unaligned refcount block offset 0x{offset:x}");
        if (offset < 0 || (offset != 0 && offset < _g.ClusterSize))
            throw CorruptionFound("refcount table", TableOffset + tableIndex * 8, $"entry {tableIndex} points to refcount block offset 0x{(ulong)offset:x}, outside the file");
        return offset;
    }

    /// <summary>The refcount of one cluster (0 where no refcount block exists).</summary>
    internal ulong Get(long cluster)
    {
        long offset = BlockOffset(cluster >> _g.RefcountBlockBits);
        if (offset == 0) return 0;
        return RefcountBlock.Get(_blocks.Get(offset).Data, cluster & (_g.RefcountBlockEntries - 1), _g.RefcountOrder);
    }

    /// <summary>
    /// One past the last cluster below <paramref name="clusters"/> whose refcount is not 0 (at least
    /// 1: the header). Ranges without a refcount block are skipped whole, so a huge free tail costs
    /// little.
    /// </summary>
    internal long EndOfUsed(long clusters)
    {
        long c = Math.Min(clusters, (long)_table.Length << _g.RefcountBlockBits);
        while (c > 1)
        {
            long index = (c - 1) >> _g.RefcountBlockBits;
            long blockStart = index << _g.RefcountBlockBits;
            long offset = BlockOffset(index);
            if (offset != 0)
            {
                byte[] data = _blocks.Get(offset).Data;
                for (long k = c - 1; k >= Math.Max(blockStart, 1); k--)
                    if (RefcountBlock.Get(data, k - blockStart, _g.RefcountOrder) != 0) return k + 1;
            }
            c = Math.Max(blockStart, 1);
        }
        return 1;
    }

    /// <summary>Adds <paramref name="delta"/> to the refcount of each cluster touched by [offset, offset + length).</summary>
    internal void Update(long offset, long length, long delta)
    {
        if (length <= 0 || delta == 0) return;
        long first = offset >> _g.ClusterBits, last = (offset + length - 1) >> _g.ClusterBits;
        if (delta > 0)
        {
            EnsureBlocks(first, last - first + 1);
            _mapping.SetDependency(_blocks);
        }
        else
        {
            _blocks.SetDependency(_mapping);
        }
        for (long c = first; c <= last; c++) Add(c, delta);
    }

    private void Add(long cluster, long delta)
    {
        long blockOffset = BlockOffset(cluster >> _g.RefcountBlockBits);
        if (blockOffset == 0)
            throw CorruptionFound("refcount table", TableOffset, $"cluster {cluster} (offset 0x{cluster << _g.ClusterBits:x}) has no refcount block, so its refcount is 0 and cannot be lowered");
        MetadataCache.Table block = _blocks.Get(blockOffset);
        ulong value = AdjustEntry(block.Data, cluster, delta, blockOffset, reportCorruption: true);
        _blocks.MarkDirty(block);
        if (value == 0)
        {
            SyncFreed();
            _freedAtMappingFlush = _mapping.Flushes;
            _freedSinceFlush.Add(cluster);
            _lowestFreed = Math.Min(_lowestFreed, cluster);
        }
        if (cluster >= HighWater && value > 0) HighWater = cluster + 1;
    }

    /// <summary>
    /// Adds <paramref name="delta"/> to a cluster's entry in <paramref name="block"/> (the live block
    /// at <paramref name="blockOffset"/>, or a generation's copy of it), refusing to go below 0 or
    /// above the refcount width; returns the new value. Every refcount change goes through here.
    /// </summary>
    private ulong AdjustEntry(byte[] block, long cluster, long delta, long blockOffset, bool reportCorruption)
    {
        long index = cluster & (_g.RefcountBlockEntries - 1);
        ulong old = RefcountBlock.Get(block, index, _g.RefcountOrder);
        ulong value;
        if (delta < 0)
        {
            if (old < (ulong)-delta)
            {
                string problem = $"refcount of cluster {cluster} (offset 0x{cluster << _g.ClusterBits:x}) is {old} and cannot be lowered by {-delta}; the image is corrupt";
                throw reportCorruption ? _health.FoundRepairFirst("refcount block", blockOffset, problem) : _health.RepairFirst("refcount block", blockOffset, problem);
            }
            value = old - (ulong)-delta;
        }
        else
        {
            if (_g.RefcountMax - old < (ulong)delta)
                throw Corrupt("refcount block", blockOffset, $"refcount of cluster {cluster} (offset 0x{cluster << _g.ClusterBits:x}) would exceed {_g.RefcountMax}, the largest {_g.RefcountBits}-bit refcount");
            value = old + (ulong)delta;
        }
        RefcountBlock.Set(block, index, _g.RefcountOrder, value);
        return value;
    }

    /// <summary>Lowers the refcount of every cluster touched by the range (freeing those that reach 0).</summary>
    internal void Free(long offset, long length) => Update(offset, length, -1);

    /// <summary>Lowers a refcount for a reference dropped in memory; if the device fails meanwhile, the decrement is owed (not lost) and the error goes on.</summary>
    internal void FreeOrOwe(long offset, long length)
    {
        try
        {
            Free(offset, length);
        }
        catch (Exception e) when (e is StorageException or IOException)
        {
            _owed.Add((offset, length));
            throw;
        }
    }

    /// <summary>Owes the decrement of a range whose reference was dropped in memory (made by the next <see cref="FreeOwed"/>).</summary>
    internal void Owe(long offset, long length) => _owed.Add((offset, length));

    /// <summary>Makes the owed refcount decrements; one that fails stays owed.</summary>
    internal void FreeOwed()
    {
        while (_owed.Count > 0)
        {
            (long offset, long length) = _owed[^1];
            Free(offset, length);
            _owed.RemoveAt(_owed.Count - 1);
        }
    }

    /// <summary>
    /// A repair's refcount change (the check's): nothing in memory depends on it, so no write order
    /// is declared and nothing is flushed; like QEMU's, the change stays cached until the repair ends.
    /// </summary>
    internal void Repair(long cluster, long delta)
    {
        Update(cluster << _g.ClusterBits, 1, delta);
        _mapping.ForgetDependency();
        _blocks.ForgetDependency();
    }

    /// <summary>
    /// Shortens the file to the end of the last cluster in use when the clusters after it are free
    /// (a VM-state area given up or taken over, preallocated but unused). Call with the metadata
    /// flushed, on an image open for writing.
    /// </summary>
    internal void TrimFreeTail()
    {
        if (_file.Stopped) return;   // the refcounts in memory may be what made a write hit metadata: nothing is cut by them
        long clusters = _g.ClustersFor(_file.Device.Length);
        long end = Math.Max(EndOfUsed(clusters), ReservedEnd);
        if (end < clusters) _file.Device.SetLength(end << _g.ClusterBits);
    }

    /// <summary>Allocates <paramref name="count"/> contiguous clusters (refcount 1 each); returns the host offset of the first.</summary>
    internal long Allocate(long count)
    {
        if (count <= 0) throw new ArgumentOutOfRangeException(nameof(count));
        while (true)
        {
            long start = FindFreeRun(count);
            if (EnsureBlocks(start, count)) continue;   // new refcount metadata took clusters: search again
            _file.CheckAllocation(start << _g.ClusterBits, count << _g.ClusterBits);
            _mapping.SetDependency(_blocks);
            for (long c = start; c < start + count; c++) Add(c, 1);
            if (start <= _freeHint) _freeHint = start + count;
            return start << _g.ClusterBits;
        }
    }

    private bool IsFree(long cluster) => Get(cluster) == 0 && !_freedSinceFlush.Contains(cluster) && !IsReserved(cluster);

    // Runs of clusters [start, end) held in memory only, for the VM-state area being written: their
    // refcounts stay 0 on disk until a snapshot takes them over, so a save that fails or is killed
    // leaves nothing counted. Allocation skips them.
    private readonly SortedList<long, long> _reserved = [];

    /// <summary>True when the cluster lies in a reserved run.</summary>
    internal bool IsReserved(long cluster) => ReservedRunEnd(cluster) > cluster;

    /// <summary>The end of the reserved run holding <paramref name="cluster"/>, or <paramref name="cluster"/> itself when none does.</summary>
    internal long ReservedRunEnd(long cluster)
    {
        if (_reserved.Count == 0) return cluster;
        IList<long> starts = _reserved.Keys;
        int lo = 0, hi = starts.Count - 1;
        while (lo <= hi)
        {
            int mid = (lo + hi) >> 1;
            if (starts[mid] <= cluster) lo = mid + 1;
            else hi = mid - 1;
        }
        return hi >= 0 && cluster < _reserved.Values[hi] ? _reserved.Values[hi] : cluster;
    }

    /// <summary>One past the last reserved cluster (0 without reservations).</summary>
    internal long ReservedEnd => _reserved.Count == 0 ? 0 : _reserved.Values[^1];

    /// <summary>
    /// Reserves <paramref name="count"/> contiguous clusters at the free tail of the image: past every
    /// cluster in use (or freed but maybe still referenced on disk) and every earlier reservation.
    /// Only memory changes. Returns the first cluster.
    /// </summary>
    internal long ReserveTail(long count)
    {
        SyncFreed();
        long start = Math.Max(EndOfUsed(HighWater), ReservedEnd);
        foreach (long c in _freedSinceFlush) start = Math.Max(start, c + 1);
        _file.CheckAllocation(start << _g.ClusterBits, count << _g.ClusterBits);
        _reserved.Add(start, start + count);
        if (start + count > HighWater) HighWater = start + count;
        return start;
    }

    /// <summary>
    /// Reserves the clusters [<paramref name="first"/>, + <paramref name="count"/>), whose refcounts the
    /// caller found 0 (a region written outside the engine): only memory changes.
    /// </summary>
    internal void ReserveRange(long first, long count)
    {
        if (IsReserved(first) || IsReserved(first + count - 1))
            throw new InvalidOperationException($"clusters {first}..{first + count - 1} overlap a reservation");
        _reserved.Add(first, first + count);
        if (first + count > HighWater) HighWater = first + count;
    }

    /// <summary>Gives reserved runs back (nothing on disk changes).</summary>
    internal void ReleaseReserved() => _reserved.Clear();

    private long FindFreeRun(long count)
    {
        SyncFreed();
        long run = 0, runStart = _freeHint;
        for (long c = _freeHint; ; c++)
        {
            // Past everything ever allocated and past the refcount table's reach all clusters are free.
            if (c >= HighWater && c >= ((long)_table.Length << _g.RefcountBlockBits) && !_freedSinceFlush.Contains(c))
            {
                if (run == 0) runStart = c;
                return runStart;
            }
            long skip = ReservedRunEnd(c);
            if (skip > c)
            {
                run = 0;
                c = skip - 1;   // the loop's c++ lands on the run's end
                continue;
            }
            if (IsFree(c))   // the header cluster too, when its refcount says free: the allocation check refuses it
            {
                if (run == 0) runStart = c;
                if (++run == count) return runStart;
            }
            else
            {
                run = 0;
                if (c == _freeHint) _freeHint = c + 1;
            }
        }
    }

    /// <summary>Makes sure refcount blocks exist for clusters [first, first + count); true when it had to allocate any.</summary>
    private bool EnsureBlocks(long first, long count)
    {
        bool changed = false;
        long firstIndex = first >> _g.RefcountBlockBits, lastIndex = (first + count - 1) >> _g.RefcountBlockBits;
        if (lastIndex >= _table.Length)
        {
            GrowTable(lastIndex);
            changed = true;
        }
        for (long i = firstIndex; i <= lastIndex; i++)
        {
            if (BlockOffset(i) != 0) continue;
            AllocateBlock(i);
            changed = true;
        }
        return changed;
    }

    /// <summary>
    /// Allocates the refcount block for table index <paramref name="index"/> in the first free
    /// cluster. When that cluster lies in the block's own range the block describes itself;
    /// otherwise its refcount goes into the block of its own range (allocated first if missing).
    /// </summary>
    private void AllocateBlock(long index)
    {
        while (true)
        {
            long c = FindFreeRun(1);
            long ci = c >> _g.RefcountBlockBits;
            if (ci >= _table.Length)
            {
                GrowTable(ci);
                if (BlockOffset(index) != 0) return;   // the new area may already hold it
                continue;
            }
            if (ci != index && BlockOffset(ci) == 0)
            {
                AllocateBlock(ci);   // c lies in ci's own range: that block describes itself
                continue;
            }
            _file.CheckAllocation(c << _g.ClusterBits, _g.ClusterSize);
            _mapping.SetDependency(_blocks);
            if (ci != index) Add(c, 1);
            MetadataCache.Table block = _blocks.GetEmpty(c << _g.ClusterBits);
            if (ci == index) RefcountBlock.Set(block.Data, c & (_g.RefcountBlockEntries - 1), _g.RefcountOrder, 1);
            _table.Set(index, c << _g.ClusterBits);
            if (c >= HighWater) HighWater = c + 1;
            if (c == _freeHint) _freeHint = c + 1;
            return;
        }
    }

    /// <summary>
    /// Moves the refcount table to a bigger one at the end of the file, with new refcount blocks
    /// that describe the new area itself; the header switches to it in one write; the old table's
    /// clusters are freed afterwards.
    /// </summary>
    private void GrowTable(long neededIndex)
    {
        _blocks.Flush();
        long oldEntries = _table.Length;
        long entriesPerCluster = _g.ClusterSize / 8;
        long areaStart = Math.Max(Math.Max(HighWater, _g.ClustersFor(_file.Device.Length)), oldEntries << _g.RefcountBlockBits);
        long newEntries = RoundUp(Math.Max(neededIndex + 1, oldEntries * 2), entriesPerCluster);
        long tableClusters, blocks, firstIndex;
        while (true)
        {
            tableClusters = _g.ClustersFor(newEntries * 8);
            blocks = 0;
            firstIndex = areaStart >> _g.RefcountBlockBits;
            while (true)
            {
                long end = areaStart + blocks + tableClusters;
                long need = ((end - 1) >> _g.RefcountBlockBits) - firstIndex + 1;
                if (need == blocks) break;
                blocks = need;
            }
            long lastIndex = firstIndex + blocks - 1;
            if (lastIndex < newEntries) break;
            newEntries = RoundUp(lastIndex + 1, entriesPerCluster);
        }
        if (newEntries * 8 > ClusterGeometry.MaxRefcountTableBytes)
            throw Corrupt("refcount table", TableOffset, $"would need {newEntries * 8} bytes, more than QEMU's limit of {ClusterGeometry.MaxRefcountTableBytes}");

        var newTable = new ulong[newEntries];
        _table.Entries.CopyTo(newTable, 0);
        long areaEnd = areaStart + blocks + tableClusters;
        _file.CheckAllocation(areaStart << _g.ClusterBits, (areaEnd - areaStart) << _g.ClusterBits);
        var blockData = new byte[blocks][];
        for (long k = 0; k < blocks; k++)
        {
            long index = firstIndex + k;
            blockData[k] = BuildBlock(index, c => c >= areaStart && c < areaEnd ? 1UL : 0);   // the new area counts itself
            newTable[index] = (ulong)((areaStart + k) << _g.ClusterBits);
        }
        for (long k = 0; k < blocks; k++) WriteBlock(blockData[k], (areaStart + k) << _g.ClusterBits);
        long oldOffset = TableOffset;
        long oldClusters = TableClusters;
        SwitchTable(newTable, (areaStart + blocks) << _g.ClusterBits);
        _table.Replace(newTable);
        for (long k = 0; k < blocks; k++) _blocks.PutClean((areaStart + k) << _g.ClusterBits, blockData[k]);
        HighWater = Math.Max(HighWater, areaEnd);
        Free(oldOffset, oldClusters << _g.ClusterBits);
    }

    private static long RoundUp(long value, long multiple) => (value + multiple - 1) / multiple * multiple;

    /// <summary>Clusters a refcount table of <paramref name="entries"/> entries takes.</summary>
    internal long TableClustersFor(long entries) => (entries * 8 + _g.ClusterSize - 1) >> _g.ClusterBits;

    /// <summary>A refcount table's bytes on disk (its length a whole number of clusters when the table's is).</summary>
    internal static byte[] EncodeTable(ulong[] table)
    {
        byte[] bytes = new byte[table.LongLength * 8];
        L1Entry.Encode(table, bytes);
        return bytes;
    }

    /// <summary>A refcount block for table index <paramref name="index"/> holding <paramref name="countOf"/>(cluster) for each cluster of its range.</summary>
    internal byte[] BuildBlock(long index, Func<long, ulong> countOf)
    {
        byte[] block = new byte[_g.ClusterSize];
        long rangeStart = index << _g.RefcountBlockBits;
        for (long j = 0; j < _g.RefcountBlockEntries; j++)
        {
            ulong v = countOf(rangeStart + j);
            if (v != 0) RefcountBlock.Set(block, j, _g.RefcountOrder, v);
        }
        return block;
    }

    /// <summary>Writes a refcount block that the refcount table is about to reference (or already does, for a block being replaced whole).</summary>
    internal void WriteBlock(byte[] data, long offset) => _file.Write(data, offset, Qcow2Metadata.None);

    /// <summary>
    /// Writes <paramref name="table"/> (whole clusters of entries, its blocks written already) at
    /// <paramref name="offset"/>, then switches the header's refcount table fields to it in one
    /// write, with a flush before and after. The in-memory state is the caller's to adopt.
    /// </summary>
    internal void SwitchTable(ulong[] table, long offset)
    {
        _file.Write(EncodeTable(table), offset, Qcow2Metadata.None);
        _file.Flush();
        _header.RefcountTableOffset = (ulong)offset;
        _header.RefcountTableClusters = (uint)TableClustersFor(table.LongLength);
        _file.WriteHeader(_header.EncodeRefcountTableFields(), Qcow2Header.RefcountTableFieldsOffset);
        _file.Flush();
    }

    /// <summary>
    /// Installs a refcount structure rebuilt from counted references (the check's repair): the
    /// blocks are written by the caller with <see cref="WriteBlock"/>; the table switches in and
    /// everything cached of the old structure is dropped.
    /// </summary>
    internal void InstallRebuilt(ulong[] table, long offset)
    {
        SwitchTable(table, offset);
        Reload(table);
        NoteHighWater(_g.ClustersFor(_file.Device.Length));
    }

    /// <summary>Clusters freed earlier may be reused once the references to them are gone on disk: after the L2 cache's next flush.</summary>
    private void SyncFreed()
    {
        if (_freedSinceFlush.Count > 0 && _mapping.Flushes != _freedAtMappingFlush) ReleaseFreed();
    }

    private void ReleaseFreed()
    {
        _freedSinceFlush.Clear();
        if (_lowestFreed < _freeHint) _freeHint = _lowestFreed;
        _lowestFreed = long.MaxValue;
    }

    /// <summary>Replaces the in-memory state after the refcount structure was rebuilt on disk.</summary>
    internal void Reload(ulong[] table)
    {
        _blocks.Clear();
        _table.Replace(table);
        _freedSinceFlush.Clear();
        _freeHint = 0;
        _lowestFreed = long.MaxValue;
        HighWater = Math.Max(HighWater, _g.ClustersFor(_file.Device.Length));
    }

    /// <summary>Records that clusters up to <paramref name="endCluster"/> exist (e.g. after the file grew).</summary>
    internal void NoteHighWater(long endCluster)
    {
        if (endCluster > HighWater) HighWater = endCluster;
    }
}
