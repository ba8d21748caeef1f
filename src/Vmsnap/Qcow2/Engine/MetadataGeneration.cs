using Vmsnap.Storage;

namespace Vmsnap.Qcow2;

/// <summary>
/// A new generation of an image's metadata, built beside the current one and made current by one
/// header write. Snapshot create, delete and apply change refcounts, COPIED flags and tables that
/// live in different clusters; no order of in-place writes keeps all of them consistent at every
/// instant (a refcount going from 1 to 2 and the COPIED flag of the entry that references the
/// cluster cannot change together). So nothing the current header reaches is overwritten: changed
/// refcount blocks, the refcount table, a new active L1 table, copied L2 tables and the snapshot
/// table go to clusters that are free in the current generation, and one write of header bytes
/// 36..71 (l1_size, l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots,
/// snapshots_offset: one sector) switches to all of them at once. A crash before that write leaves
/// the old generation whole (the new clusters are free in it); after it, the new one.
/// </summary>
/// <remarks>
/// Refcounts count references per path, as QEMU does: a data cluster is counted once for every L1
/// entry (of the active and of each snapshot L1 table) that reaches an L2 table referencing it.
/// Writes here may also go to clusters the current generation uses only in ways the image check
/// ignores (COPIED flags of snapshot L2 tables that are not active), queued with
/// <see cref="Write"/>. The engine's lock is held and its caches are clean (flushed) throughout.
/// </remarks>
internal sealed class MetadataGeneration
{
    /// <summary>Offset of the header bytes switched in one write.</summary>
    internal const int SwitchOffset = Qcow2Header.L1SizeOffset;

    /// <summary>Length of the header bytes switched in one write (36..71).</summary>
    internal const int SwitchLength = Qcow2Header.SnapshotFieldsOffset + 12 - Qcow2Header.L1SizeOffset;

    private readonly Qcow2Engine _e;
    private readonly ClusterGeometry _g;
    private readonly RefcountManager _live;
    private readonly ulong[] _liveTable;
    private ulong[] _table;
    private readonly Dictionary<long, byte[]> _blocks = [];
    private readonly HashSet<long> _placed = [];
    private readonly List<(long Offset, byte[] Data)> _writes = [];
    private readonly List<(long Start, long End)> _allocated = [];   // runs this generation allocated (refcount blocks placed included)
    private readonly Func<long, bool>? _excluded;
    private long _cursor;
    private long _end;   // one past the highest cluster allocated in this generation
    private byte[]? _tableBytes;
    private long _tableOffset;

    /// <summary>A new generation of the engine's current metadata.</summary>
    /// <param name="engine">The engine (its lock held, caches clean).</param>
    /// <param name="excluded">Clusters this generation must not allocate (another generation's, built alongside).</param>
    internal MetadataGeneration(Qcow2Engine engine, Func<long, bool>? excluded = null)
    {
        _e = engine;
        _g = engine.Geometry;
        _live = engine.Refcounts;
        _liveTable = _live.Table.ToArray();
        _table = (ulong[])_liveTable.Clone();
        _cursor = Math.Max(1, _live.FreeHint);
        _excluded = excluded;
    }

    /// <summary>True when this generation allocated the cluster (for a generation built alongside, which must avoid it).</summary>
    internal bool AllocatedHere(long cluster)
    {
        foreach ((long start, long end) in _allocated)
            if (cluster >= start && cluster < end) return true;
        return false;
    }

    private void NoteAllocated(long start, long count)
    {
        if (_allocated.Count > 0 && _allocated[^1].End == start) _allocated[^1] = (_allocated[^1].Start, start + count);
        else _allocated.Add((start, start + count));
    }

    /// <summary>Clusters no allocation here may take: reserved in memory (a VM-state area being written) or another generation's.</summary>
    private bool Unavailable(long cluster) => _live.IsReserved(cluster) || _excluded?.Invoke(cluster) == true;

    /// <summary>The refcount table the new generation uses (valid after <see cref="Prepare"/>).</summary>
    internal ulong[] NewTable { get; private set; } = [];

    /// <summary>The new refcount blocks by offset, as written (valid after <see cref="Prepare"/>).</summary>
    internal IEnumerable<(long Offset, byte[] Data)> NewBlocks =>
        _blocks.Select(b => ((long)(_table[b.Key] & RefcountTableEntry.OffsetMask), b.Value));

    /// <summary>One past the highest cluster this generation allocated.</summary>
    internal long End => _end;

    private long LiveBlockOffset(long index) =>
        index < _liveTable.Length ? (long)(_liveTable[index] & RefcountTableEntry.OffsetMask) : 0;

    private Qcow2FormatException Corrupt(string structure, long? offset, string problem) => new(structure, offset, problem, _e.Path);

    /// <summary>The refcount of a cluster in the new generation.</summary>
    internal ulong Get(long cluster)
    {
        long index = cluster >> _g.RefcountBlockBits;
        if (_blocks.TryGetValue(index, out byte[]? block))
            return RefcountBlock.Get(block, cluster & (_g.RefcountBlockEntries - 1), _g.RefcountOrder);
        return _live.Get(cluster);
    }

    /// <summary>Adds <paramref name="delta"/> to the refcount of every cluster touched by [offset, offset + length).</summary>
    internal void AddRange(long offset, long length, long delta)
    {
        if (length <= 0 || delta == 0) return;
        for (long c = offset >> _g.ClusterBits; c <= (offset + length - 1) >> _g.ClusterBits; c++) Add(c, delta);
    }

    /// <summary>Adds <paramref name="delta"/> to one cluster's refcount in the new generation.</summary>
    internal void Add(long cluster, long delta)
    {
        if (cluster <= 0)
            throw Corrupt("refcount", null, $"a reference to cluster {cluster} (the header) cannot be counted");
        long index = cluster >> _g.RefcountBlockBits;
        if (index >= ClusterGeometry.MaxRefcountTableBytes / 8)
            throw Corrupt("refcount table", _live.TableOffset, $"cluster {cluster} lies beyond what a refcount table can describe");
        byte[] block = Block(index);
        long entry = cluster & (_g.RefcountBlockEntries - 1);
        ulong old = RefcountBlock.Get(block, entry, _g.RefcountOrder);
        ulong value;
        if (delta < 0)
        {
            if (old < (ulong)-delta)
                throw Corrupt("refcount block", LiveBlockOffset(index), $"refcount of cluster {cluster} (offset 0x{cluster << _g.ClusterBits:x}) is {old} and cannot be lowered by {-delta}; the image is corrupt (run check --repair all)");
            value = old - (ulong)-delta;
        }
        else
        {
            if (_g.RefcountMax - old < (ulong)delta)
                throw Corrupt("refcount block", LiveBlockOffset(index), $"refcount of cluster {cluster} (offset 0x{cluster << _g.ClusterBits:x}) would exceed {_g.RefcountMax}, the largest {_g.RefcountBits}-bit refcount");
            value = old + (ulong)delta;
        }
        RefcountBlock.Set(block, entry, _g.RefcountOrder, value);
    }

    /// <summary>The new generation's refcount block for a table index: a copy of the live one, or a new one placed in its own range.</summary>
    private byte[] Block(long index)
    {
        if (_blocks.TryGetValue(index, out byte[]? block)) return block;
        long live = LiveBlockOffset(index);
        if (live != 0)
        {
            _live.Get(index << _g.RefcountBlockBits);   // validates the table entry
            block = (byte[])_live.Blocks.Get(live).Data.Clone();
            _blocks.Add(index, block);
            return block;
        }
        // No block yet: nothing in its range is counted, so it describes itself in its first cluster
        // free here (not reserved, not another generation's).
        block = new byte[_g.ClusterSize];
        _blocks.Add(index, block);
        long first = Math.Max(index << _g.RefcountBlockBits, 1);
        long c = first;
        long rangeEnd = (index + 1) << _g.RefcountBlockBits;
        while (c < rangeEnd && (RefcountBlock.Get(block, c & (_g.RefcountBlockEntries - 1), _g.RefcountOrder) != 0 || Unavailable(c))) c++;
        _placed.Add(index);
        if (c == rangeEnd)
        {
            // Its whole range is taken (a VM-state area reserved it): the block lives elsewhere,
            // counted in the block of that range.
            long elsewhere = Allocate(1);
            SetTableEntry(index, elsewhere);
            return block;
        }
        RefcountBlock.Set(block, c & (_g.RefcountBlockEntries - 1), _g.RefcountOrder, 1);
        SetTableEntry(index, c << _g.ClusterBits);
        NoteAllocated(c, 1);
        _end = Math.Max(_end, c + 1);
        return block;
    }

    private void SetTableEntry(long index, long offset)
    {
        if (index >= _table.Length) Array.Resize(ref _table, (int)(index + 1));
        _table[index] = (ulong)offset;
    }

    private bool IsFree(long cluster) => cluster > 0 && !Unavailable(cluster) && _live.Get(cluster) == 0 && Get(cluster) == 0;

    /// <summary>
    /// Allocates <paramref name="count"/> contiguous clusters that are free in both generations
    /// (refcount 1 in the new one); returns the first cluster's offset.
    /// </summary>
    internal long Allocate(long count)
    {
        if (count <= 0) throw new ArgumentOutOfRangeException(nameof(count));
        while (true)
        {
            long start = FindFreeRun(count);
            // Make sure the run's refcount blocks exist; a new one may take a cluster of the run: look again.
            bool moved = false;
            for (long index = start >> _g.RefcountBlockBits; index <= (start + count - 1) >> _g.RefcountBlockBits; index++)
            {
                bool existed = _blocks.ContainsKey(index) || LiveBlockOffset(index) != 0;
                Block(index);
                if (!existed) moved = true;
            }
            if (moved)
            {
                bool stillFree = true;
                for (long c = start; c < start + count && stillFree; c++) stillFree = IsFree(c);
                if (!stillFree) continue;
            }
            for (long c = start; c < start + count; c++) Add(c, 1);
            if (start == _cursor) _cursor = start + count;
            _end = Math.Max(_end, start + count);
            NoteAllocated(start, count);
            return start << _g.ClusterBits;
        }
    }

    private long FindFreeRun(long count)
    {
        long run = 0, runStart = _cursor;
        for (long c = _cursor; ; c++)
        {
            // Past every live refcount block and everything allocated here, all clusters are free.
            if (c >= (long)_liveTable.Length << _g.RefcountBlockBits && c >= _end && c >= _live.HighWater && !Unavailable(c))
                return run == 0 ? c : runStart;
            long skip = _live.ReservedRunEnd(c);
            if (skip > c)
            {
                run = 0;
                c = skip - 1;
                continue;
            }
            if (IsFree(c))
            {
                if (run == 0) runStart = c;
                if (++run == count) return runStart;
            }
            else
            {
                run = 0;
                if (c == _cursor) _cursor = c + 1;
            }
        }
    }

    /// <summary>Queues a write done before the switch: new tables in clusters allocated here, or COPIED flags of non-active snapshot L2 tables.</summary>
    internal void Write(long offset, byte[] data) => _writes.Add((offset, data));

    /// <summary>
    /// Moves every changed refcount block to a fresh cluster and places the new refcount table:
    /// after this nothing more is allocated or counted, and nothing of the live state is consulted
    /// again (a generation built alongside may be switched to first). Sets the refcount table fields
    /// of <paramref name="header"/> (a copy of the header that the caller switches to).
    /// </summary>
    internal void Prepare(Qcow2Header header)
    {
        long liveTableClusters = _live.TableClusters;
        AddRange(_live.TableOffset, liveTableClusters << _g.ClusterBits, -1);
        long tableOffset = 0, tableClusters = 0;
        long entriesPerCluster = _g.ClusterSize / 8;
        while (true)
        {
            RelocateChangedBlocks();
            long entries = Math.Max(_table.Length, 1);
            long need = Math.Max(liveTableClusters, (entries + entriesPerCluster - 1) / entriesPerCluster);
            if (need * _g.ClusterSize > ClusterGeometry.MaxRefcountTableBytes)
                throw Corrupt("refcount table", _live.TableOffset, $"would need {need} clusters, more than QEMU's limit of {ClusterGeometry.MaxRefcountTableBytes} bytes");
            if (tableClusters >= need && _blocks.Keys.All(_placed.Contains)) break;
            if (tableClusters > 0) AddRange(tableOffset, tableClusters << _g.ClusterBits, -1);
            tableClusters = need;
            tableOffset = Allocate(need);
        }

        var table = new ulong[tableClusters * entriesPerCluster];
        _table.CopyTo(table, 0);
        _tableBytes = new byte[tableClusters << _g.ClusterBits];
        L1Entry.Encode(table, _tableBytes);
        _tableOffset = tableOffset;
        header.RefcountTableOffset = (ulong)tableOffset;
        header.RefcountTableClusters = (uint)tableClusters;
        NewTable = table;
    }

    /// <summary>
    /// Writes the refcount blocks, the refcount table and the queued tables, then flushes:
    /// everything the header switch will point to is durable. Nothing the live generation uses is
    /// changed. Call after <see cref="Prepare"/>.
    /// </summary>
    internal void WriteOut()
    {
        if (_tableBytes is null) throw new InvalidOperationException("the generation was not prepared");
        IBlockDevice device = _e.Device;
        foreach ((long offset, byte[] data) in NewBlocks) device.Write(data, offset);
        device.Write(_tableBytes, _tableOffset);
        foreach ((long offset, byte[] data) in _writes) device.Write(data, offset);
        device.Flush();
    }

    /// <summary>Gives every changed refcount block that still lives where the current generation has it a fresh cluster.</summary>
    private void RelocateChangedBlocks()
    {
        while (true)
        {
            long[] pending = _blocks.Keys.Where(i => !_placed.Contains(i)).ToArray();
            if (pending.Length == 0) return;
            foreach (long index in pending)
            {
                _placed.Add(index);
                long fresh = Allocate(1);
                long old = LiveBlockOffset(index);
                SetTableEntry(index, fresh);
                Add(old >> _g.ClusterBits, -1);
            }
        }
    }

    /// <summary>The 36 header bytes at <see cref="SwitchOffset"/> for <paramref name="h"/>'s L1, refcount table and snapshot table fields.</summary>
    internal static byte[] SwitchBytes(Qcow2Header h)
    {
        byte[] b = new byte[SwitchLength];
        h.EncodeL1Fields().CopyTo(b, 0);
        h.EncodeRefcountTableFields().CopyTo(b, Qcow2Header.RefcountTableFieldsOffset - SwitchOffset);
        h.EncodeSnapshotFields().CopyTo(b, Qcow2Header.SnapshotFieldsOffset - SwitchOffset);
        return b;
    }
}
