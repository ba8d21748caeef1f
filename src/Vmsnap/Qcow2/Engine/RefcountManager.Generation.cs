namespace Vmsnap.Qcow2;

internal sealed partial class RefcountManager
{
    /// <summary>Starts the refcounts of a new metadata generation: a copy-on-write view of the live counts (see <see cref="MetadataGeneration"/>).</summary>
    /// <param name="excluded">Clusters the generation must not allocate (another generation's, built alongside).</param>
    internal Generation BeginGeneration(Func<long, bool>? excluded = null) => new(this, excluded);

    /// <summary>
    /// Makes the refcounts of a generation live once the header points to them: its table, its
    /// blocks (clean, they were written before the switch) and the clusters it allocated.
    /// </summary>
    internal void Adopt(Generation gen)
    {
        Reload(gen.NewTable);
        foreach ((long offset, byte[] data) in gen.NewBlocks) _blocks.PutClean(offset, data);
        NoteHighWater(gen.End);
    }

    /// <summary>
    /// The refcounts of a new metadata generation, built beside the live ones: changed refcount
    /// blocks are copies (moved to fresh clusters before the switch), new blocks and the new
    /// refcount table go to clusters free in both generations. Nothing live is written.
    /// </summary>
    internal sealed class Generation
    {
        private readonly RefcountManager _live;
        private readonly ClusterGeometry _g;
        private readonly ulong[] _liveTable;
        private ulong[] _table;
        private readonly Dictionary<long, byte[]> _blocks = [];
        private readonly HashSet<long> _placed = [];
        private readonly List<(long Start, long End)> _allocated = [];   // runs this generation allocated (refcount blocks placed included)
        private readonly Func<long, bool>? _excluded;
        private long _cursor;
        private long _end;   // one past the highest cluster allocated in this generation
        private byte[]? _tableBytes;
        private long _tableOffset;

        internal Generation(RefcountManager live, Func<long, bool>? excluded)
        {
            _live = live;
            _g = live._g;
            _liveTable = live._table.Entries.ToArray();
            _table = (ulong[])_liveTable.Clone();
            _cursor = Math.Max(1, live.FreeHint);
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
                throw _live.Corrupt("refcount", null, $"a reference to cluster {cluster} (the header) cannot be counted");
            long index = cluster >> _g.RefcountBlockBits;
            if (index >= ClusterGeometry.MaxRefcountTableBytes / 8)
                throw _live.Corrupt("refcount table", _live.TableOffset, $"cluster {cluster} lies beyond what a refcount table can describe");
            _live.AdjustEntry(Block(index), cluster, delta, LiveBlockOffset(index), reportCorruption: false);
        }

        /// <summary>The new generation's refcount block for a table index: a copy of the live one, or a new one placed in its own range.</summary>
        private byte[] Block(long index)
        {
            if (_blocks.TryGetValue(index, out byte[]? block)) return block;
            long live = LiveBlockOffset(index);
            if (live != 0)
            {
                _live.Get(index << _g.RefcountBlockBits);   // validates the table entry
                block = (byte[])_live._blocks.Get(live).Data.Clone();
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
            _live._file.CheckAllocation(c << _g.ClusterBits, _g.ClusterSize);
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
                _live._file.CheckAllocation(start << _g.ClusterBits, count << _g.ClusterBits);
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
            while (true)
            {
                RelocateChangedBlocks();
                long need = Math.Max(liveTableClusters, _live.TableClustersFor(Math.Max(_table.Length, 1)));
                if (need * _g.ClusterSize > ClusterGeometry.MaxRefcountTableBytes)
                    throw _live.Corrupt("refcount table", _live.TableOffset, $"would need {need} clusters, more than QEMU's limit of {ClusterGeometry.MaxRefcountTableBytes} bytes");
                if (tableClusters >= need && _blocks.Keys.All(_placed.Contains)) break;
                if (tableClusters > 0) AddRange(tableOffset, tableClusters << _g.ClusterBits, -1);
                tableClusters = need;
                tableOffset = Allocate(need);
            }

            var table = new ulong[tableClusters * (_g.ClusterSize / 8)];
            _table.CopyTo(table, 0);
            _tableBytes = EncodeTable(table);
            _tableOffset = tableOffset;
            header.RefcountTableOffset = (ulong)tableOffset;
            header.RefcountTableClusters = (uint)tableClusters;
            NewTable = table;
        }

        /// <summary>Writes the new refcount blocks and the new refcount table (no flush; nothing live changes). Call after <see cref="Prepare"/>.</summary>
        internal void WriteOut()
        {
            if (_tableBytes is null) throw new InvalidOperationException("the generation was not prepared");
            foreach ((long offset, byte[] data) in NewBlocks) _live.WriteBlock(data, offset);
            _live._file.Write(_tableBytes, _tableOffset, Qcow2Metadata.None);
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
    }
}
