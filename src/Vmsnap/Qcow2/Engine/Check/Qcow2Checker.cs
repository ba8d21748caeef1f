using System.Buffers.Binary;

namespace Vmsnap.Qcow2;

/// <summary>
/// Consistency check and repair, counted as <c>qemu-img check</c> counts: reference counts are
/// rebuilt in memory from every structure that uses clusters (header, active and snapshot L1/L2
/// tables, data and compressed clusters, snapshot table, refcount table and blocks, bitmaps) and
/// compared with the stored ones; COPIED flags of the active tables are compared with the stored
/// refcounts. Runs under the engine's lock with its caches flushed.
/// </summary>
internal sealed class Qcow2Checker
{
    private readonly Qcow2Engine _e;
    private readonly ClusterGeometry _g;
    private readonly List<string> _messages = [];
    private ulong[] _counts = [];
    private long _clusters;          // clusters the in-memory refcounts cover (grows past the file end if references do)
    private long _fileLength;
    private bool _rebuild;
    private int _corruptions, _leaks, _checkErrors, _corruptionsFixed, _leaksFixed;
    private long _allocated, _fragmented, _compressed, _highest;
    private ulong[] _activeSeen = [];
    private readonly HashSet<long> _activeDuplicates = [];

    private Qcow2Checker(Qcow2Engine engine)
    {
        _e = engine;
        _g = engine.Geometry;
    }

    private Qcow2Header H => _e.Header;
    private int ClusterSize => _g.ClusterSize;

    /// <summary>Checks, repairs what <paramref name="mode"/> allows, and (after repairs) checks again like qemu-img does.</summary>
    internal static Qcow2CheckResult Run(Qcow2Engine engine, Qcow2RepairMode mode) => Run(engine, mode, out _);

    /// <summary>
    /// Like <see cref="Run(Qcow2Engine, Qcow2RepairMode)"/>; also returns the host clusters that more
    /// than one entry of the active L2 tables references (legal once their refcount says so).
    /// </summary>
    internal static Qcow2CheckResult Run(Qcow2Engine engine, Qcow2RepairMode mode, out IReadOnlySet<long> activeDuplicates)
    {
        var first = new Qcow2Checker(engine);
        first.CheckOnce(mode);
        Qcow2CheckResult result = first.Result();
        if (mode != Qcow2RepairMode.None && result.CorruptionsFixed + result.LeaksFixed > 0)
        {
            var second = new Qcow2Checker(engine);
            second.CheckOnce(Qcow2RepairMode.None);
            result = second.Result() with
            {
                CorruptionsFixed = result.CorruptionsFixed,
                LeaksFixed = result.LeaksFixed,
                Messages = [.. result.Messages, .. second._messages],
            };
            activeDuplicates = second._activeDuplicates;
            return result;
        }
        activeDuplicates = first._activeDuplicates;
        return result;
    }

    private Qcow2CheckResult Result() => new()
    {
        Corruptions = _corruptions,
        Leaks = _leaks,
        CheckErrors = _checkErrors,
        CorruptionsFixed = _corruptionsFixed,
        LeaksFixed = _leaksFixed,
        TotalClusters = _g.ClustersFor(_e.VirtualSize),
        AllocatedClusters = _allocated,
        FragmentedClusters = _fragmented,
        CompressedClusters = _compressed,
        ImageEndOffset = (_highest + 1) * ClusterSize,
        Messages = _messages.ToArray(),
    };

    private void CheckOnce(Qcow2RepairMode mode)
    {
        if (!_e.ReadOnly) _e.FlushAll();
        _fileLength = _e.Device.Length;
        _clusters = _g.ClustersFor(_fileLength);
        _counts = NewCounts(_clusters);
        CalculateRefcounts(mode);
        (int corruptions, int leaks, int errors) before = (_corruptions, _leaks, _checkErrors);
        int messagesBefore = _messages.Count;
        CompareRefcounts(Qcow2RepairMode.None);

        if (_rebuild && mode == Qcow2RepairMode.All)
        {
            (int corruptions, int leaks) old = (_corruptions, _leaks);
            _messages.Add("Rebuilding refcount structure");
            RebuildRefcountStructure();
            _corruptions = 0;
            _leaks = 0;
            _rebuild = false;
            _fileLength = _e.Device.Length;
            _clusters = _g.ClustersFor(_fileLength);
            _counts = NewCounts(_clusters);
            _allocated = _fragmented = _compressed = 0;
            CalculateRefcounts(Qcow2RepairMode.None);
            (int c, int l, int ce) saved = (_corruptions, _leaks, _checkErrors);
            _corruptions = _leaks = 0;
            CompareRefcounts(Qcow2RepairMode.Leaks);
            int freshLeaks = _leaks;
            (_corruptions, _leaks, _checkErrors) = saved;
            if (_corruptions < old.corruptions) _corruptionsFixed += old.corruptions - _corruptions;
            if (_leaks < old.leaks) _leaksFixed += old.leaks - _leaks;
            _leaks += freshLeaks;
        }
        else if (mode != Qcow2RepairMode.None)
        {
            if (_rebuild)
            {
                _messages.Add("ERROR need to rebuild refcount structures");
                _checkErrors++;
                return;
            }
            if (_leaks > 0 || _corruptions > 0)
            {
                (_corruptions, _leaks, _checkErrors) = before;
                _messages.RemoveRange(messagesBefore, _messages.Count - messagesBefore);   // reported again below, as repaired
                CompareRefcounts(mode);
            }
        }

        CheckCopiedFlags(mode);
        if (mode != Qcow2RepairMode.None) _e.FlushAll();
        if (mode != Qcow2RepairMode.None && _checkErrors == 0 && _corruptions == 0) MarkCleanAndConsistent();
    }

    // ---- in-memory refcounts --------------------------------------------------------------------

    /// <summary>Counts one reference to every cluster of [offset, offset + size).</summary>
    private void Inc(long offset, long size)
    {
        if (size <= 0) return;
        // The file's last cluster may be partly missing; a reference a whole cluster past the end is not.
        if (offset + size - _fileLength >= ClusterSize || offset < 0)
        {
            _messages.Add($"ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x{offset:x} size 0x{size:x}");
            _corruptions++;
            return;
        }
        long first = offset >> _g.ClusterBits, last = (offset + size - 1) >> _g.ClusterBits;
        for (long k = first; k <= last; k++)
        {
            if (k >= _clusters) Grow(k + 1);
            if (_counts[k] == _g.RefcountMax)
            {
                _messages.Add($"ERROR: overflow cluster offset=0x{k << _g.ClusterBits:x}");
                _corruptions++;
                continue;
            }
            _counts[k]++;
        }
    }

    private ulong[] NewCounts(long clusters)
    {
        if (clusters > Array.MaxLength) throw TooManyClusters(clusters);
        try
        {
            return new ulong[Math.Max(clusters, 1)];
        }
        catch (OutOfMemoryException)
        {
            throw TooManyClusters(clusters);
        }
    }

    private void Grow(long clusters)
    {
        if (clusters > _counts.Length)
        {
            if (clusters > Array.MaxLength) throw TooManyClusters(clusters);
            try
            {
                Array.Resize(ref _counts, (int)Math.Min(Math.Max(clusters, _counts.Length * 2L), Array.MaxLength));
            }
            catch (OutOfMemoryException)
            {
                throw TooManyClusters(clusters);
            }
        }
        _clusters = clusters;
    }

    /// <summary>The in-memory refcounts (one array) cannot describe that many clusters.</summary>
    private Qcow2FormatException TooManyClusters(long clusters) =>
        new("image", null, $"checking it needs a reference count for each of {clusters} clusters, more than vmsnap can hold in memory", _e.Path);

    private ulong Count(long cluster) => cluster < _clusters ? _counts[cluster] : 0;

    private byte[] ReadCluster(long offset, int length)
    {
        byte[] data = new byte[length];
        if (offset >= 0 && offset < _fileLength)
        {
            int n = _e.Device.Read(data, offset);
            if (n < length) data.AsSpan(n).Clear();
        }
        return data;
    }

    private void CalculateRefcounts(Qcow2RepairMode mode)
    {
        Inc(0, ClusterSize);
        CheckL1((long)H.L1TableOffset, H.L1Size, fragmentation: true);
        foreach (SnapshotEntry sn in _e.Snapshots)
        {
            if ((sn.L1TableOffset & (ClusterSize - 1)) != 0)
            {
                _messages.Add($"ERROR snapshot {sn.Id} ({sn.Name}) l1_offset=0x{sn.L1TableOffset:x}: L1 table is not cluster aligned; snapshot table entry corrupted");
                _corruptions++;
                continue;
            }
            if ((long)sn.L1Size * 8 > ClusterGeometry.MaxL1Bytes)
            {
                _messages.Add($"ERROR snapshot {sn.Id} ({sn.Name}) l1_size=0x{sn.L1Size:x}: L1 table is too large; snapshot table entry corrupted");
                _corruptions++;
                continue;
            }
            CheckL1(sn.L1TableOffset, sn.L1Size, fragmentation: false);
        }
        Inc((long)H.SnapshotsOffset, _e.SnapshotTableBytes);
        Inc((long)H.RefcountTableOffset, (long)H.RefcountTableClusters * ClusterSize);
        CountBitmaps();
        CheckRefcountBlocks(mode);
    }

    private void CheckL1(long offset, uint size, bool fragmentation)
    {
        if (size == 0) return;
        Inc(offset, size * 8L);
        ulong[] l1 = L1Entry.Decode(ReadCluster(offset, (int)(size * 8L)));
        foreach (ulong entry in l1)
        {
            if (entry == 0) continue;
            if ((entry & L1Entry.ReservedMask) != 0)
            {
                _messages.Add($"ERROR found L1 entry with reserved bits set: {entry:x}");
                _corruptions++;
            }
            long l2 = L1Entry.L2Offset(entry);
            Inc(l2, ClusterSize);
            if ((l2 & (ClusterSize - 1)) != 0)
            {
                _messages.Add($"ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted");
                _corruptions++;
            }
            CheckL2(l2, fragmentation);
        }
    }

    private void CheckL2(long l2Offset, bool fragmentation)
    {
        byte[] table = ReadCluster(l2Offset, ClusterSize);
        long nextContiguous = 0;
        bool extended = _g.ExtendedL2;
        for (int i = 0; i < _g.L2Entries; i++)
        {
            L2Entry e = L2Entry.Read(table, i, extended);
            ClusterKind kind = e.Kind(extended);
            if (kind != ClusterKind.Compressed && (e.Word & L2Entry.StandardReservedMask) != 0)
            {
                _messages.Add($"ERROR found l2 entry with reserved bits set: {e.Word:x}");
                _corruptions++;
            }
            switch (kind)
            {
                case ClusterKind.Compressed:
                    if (e.IsCopied)
                    {
                        _messages.Add($"ERROR: coffset=0x{(long)(e.Word & _g.CompressedOffsetMask):x}: copied flag must never be set for compressed clusters");
                        _corruptions++;
                        e = e with { Word = e.Word & ~L2Entry.Copied };
                    }
                    if (e.Bitmap != 0)
                    {
                        _messages.Add($"ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry=0x{e.Word:x}");
                        _corruptions++;
                        break;
                    }
                    (long coffset, int csize) = e.CompressedRange(_g);
                    Inc(coffset, csize);
                    if (fragmentation)
                    {
                        _allocated++;
                        _compressed++;
                        _fragmented++;
                    }
                    break;

                case ClusterKind.ZeroAllocated or ClusterKind.Normal:
                    long offset = e.HostOffset;
                    if (extended && (e.ZeroMask & e.AllocatedMask) != 0)
                    {
                        _corruptions++;
                        _messages.Add($"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap");
                    }
                    if ((offset & (ClusterSize - 1)) != 0)
                    {
                        _corruptions++;
                        bool data = extended ? e.AllocatedMask != 0 : (e.Word & L2Entry.ZeroFlag) == 0;
                        _messages.Add(data
                            ? $"ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted."
                            : $"ERROR offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.");
                    }
                    if (fragmentation)
                    {
                        _allocated++;
                        if (nextContiguous != 0 && offset != nextContiguous) _fragmented++;
                        nextContiguous = offset + ClusterSize;
                        NoteActiveReference(offset);
                    }
                    Inc(offset, ClusterSize);
                    break;

                case ClusterKind.Unallocated when extended && e.AllocatedMask != 0:
                    _corruptions++;
                    _messages.Add("ERROR: Unallocated cluster has non-zero subcluster allocation map");
                    break;
            }
        }
    }

    /// <summary>Remembers host clusters the active tables reference more than once.</summary>
    private void NoteActiveReference(long offset)
    {
        if (offset < 0 || (offset & (ClusterSize - 1)) != 0) return;
        long c = offset >> _g.ClusterBits;
        if (c >= (long)_activeSeen.Length * 64)
        {
            if (c >= (long)int.MaxValue * 32) return;
            Array.Resize(ref _activeSeen, (int)Math.Max(c / 64 + 1, _activeSeen.Length * 2L));
        }
        ulong bit = 1UL << (int)(c & 63);
        if ((_activeSeen[c >> 6] & bit) != 0) _activeDuplicates.Add(c);
        else _activeSeen[c >> 6] |= bit;
    }

    /// <summary>Clusters used by persistent bitmaps (only when the bitmaps autoclear bit says the extension is valid, as QEMU does).</summary>
    private void CountBitmaps()
    {
        HeaderExtension? ext = H.FindExtension(HeaderExtension.Bitmaps);
        if (ext is null || (H.AutoclearFeatures & Qcow2Header.AutoclearBitmaps) == 0) return;
        var (count, dirOffset, dirSize) = BitmapDirectory.ParseExtension(ext.Data);
        if (count == 0) return;
        Inc(dirOffset, dirSize);
        BitmapDirectory dir;
        try
        {
            dir = BitmapDirectory.Read(_e.Device, ext.Data, _fileLength);
        }
        catch (Qcow2FormatException ex)
        {
            _messages.Add($"ERROR {ex.Message}");
            _corruptions++;
            return;
        }
        foreach (BitmapDirectory.Entry bm in dir.Entries)
        {
            Inc(bm.TableOffset, bm.TableSize * 8L);
            byte[] table = ReadCluster(bm.TableOffset, (int)Math.Min(bm.TableSize * 8L, 64L << 20));
            for (int i = 0; i + 8 <= table.Length; i += 8)
            {
                long offset = (long)(BinaryPrimitives.ReadUInt64BigEndian(table.AsSpan(i)) & BitmapDirectory.TableEntryOffsetMask);
                if (offset != 0) Inc(offset, ClusterSize);
            }
        }
    }

    private void CheckRefcountBlocks(Qcow2RepairMode mode)
    {
        ReadOnlySpan<ulong> table = _e.Refcounts.Table;
        for (int i = 0; i < table.Length; i++)
        {
            ulong entry = table[i];
            long offset = (long)(entry & RefcountTableEntry.OffsetMask);
            long cluster = offset >> _g.ClusterBits;
            if ((entry & RefcountTableEntry.ReservedMask) != 0)
            {
                _messages.Add($"ERROR refcount table entry {i} has reserved bits set");
                _corruptions++;
                _rebuild = true;
                continue;
            }
            if ((offset & (ClusterSize - 1)) != 0)
            {
                _messages.Add($"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted");
                _corruptions++;
                _rebuild = true;
                continue;
            }
            if (cluster >= _clusters || offset < 0)
            {
                _corruptions++;
                bool fix = mode == Qcow2RepairMode.All;
                _messages.Add($"{(fix ? "Repairing" : "ERROR")} refcount block {i} is outside image");
                if (fix && offset > 0 && offset < long.MaxValue / 2)
                {
                    try
                    {
                        // Refuse before the file grows when the counts could not follow it.
                        if (_g.ClustersFor(offset + ClusterSize) > Array.MaxLength) throw TooManyClusters(_g.ClustersFor(offset + ClusterSize));
                        _e.Device.SetLength(offset + ClusterSize);
                        _fileLength = _e.Device.Length;
                        Grow(Math.Max(_clusters, _g.ClustersFor(_fileLength)));
                        _e.Refcounts.NoteHighWater(_g.ClustersFor(_fileLength));
                        _corruptions--;
                        _corruptionsFixed++;
                        Inc(offset, ClusterSize);
                    }
                    catch (VmsnapException ex)
                    {
                        _rebuild = true;
                        _messages.Add($"ERROR could not resize image: {ex.Message}");
                    }
                }
                continue;
            }
            if (offset != 0)
            {
                Inc(offset, ClusterSize);
                if (Count(cluster) != 1)
                {
                    _messages.Add($"ERROR refcount block {i} refcount={Count(cluster)}");
                    _corruptions++;
                    _rebuild = true;
                }
            }
        }
    }

    // ---- comparison and repair ------------------------------------------------------------------

    private void CompareRefcounts(Qcow2RepairMode mode)
    {
        _highest = 0;
        for (long i = 0; i < _clusters; i++)
        {
            ulong stored;
            try
            {
                stored = _e.Refcounts.Get(i);
            }
            catch (Qcow2FormatException ex)
            {
                _messages.Add($"Can't get refcount for cluster {i}: {ex.Problem}");
                _checkErrors++;
                continue;
            }
            ulong reference = _counts[i];
            if (stored > 0 || reference > 0) _highest = i;
            if (stored == reference) continue;
            bool fixLeak = false, fixCorruption = false;
            if (stored == 0) _rebuild = true;
            else if (stored > reference && mode != Qcow2RepairMode.None) fixLeak = true;
            else if (stored < reference && mode == Qcow2RepairMode.All) fixCorruption = true;
            string what = fixLeak || fixCorruption ? "Repairing" : stored < reference ? "ERROR" : "Leaked";
            _messages.Add($"{what} cluster {i} refcount={stored} reference={reference}");
            if (fixLeak || fixCorruption)
            {
                try
                {
                    long delta = reference >= stored ? (long)(reference - stored) : -(long)(stored - reference);
                    _e.Refcounts.Update(i << _g.ClusterBits, 1, delta);
                    if (fixLeak) _leaksFixed++;
                    else _corruptionsFixed++;
                    continue;
                }
                catch (VmsnapException ex)
                {
                    _messages.Add($"ERROR could not repair cluster {i}: {ex.Message}");
                }
            }
            if (stored < reference) _corruptions++;
            else _leaks++;
        }
    }

    /// <summary>COPIED must be set exactly when the refcount is 1, in the active L1 table and its L2 tables.</summary>
    private void CheckCopiedFlags(Qcow2RepairMode mode)
    {
        bool repair = mode == Qcow2RepairMode.All
            || (mode == Qcow2RepairMode.Leaks && _checkErrors == 0 && _corruptions == 0 && _leaks == 0);
        L1Table l1 = _e.ActiveL1;
        for (int i = 0; i < l1.Size; i++)
        {
            ulong l1Entry = l1[i];
            long l2 = L1Entry.L2Offset(l1Entry);
            if (l2 == 0) continue;
            ulong refcount;
            try { refcount = _e.Refcounts.Get(l2 >> _g.ClusterBits); }
            catch (Qcow2FormatException) { continue; }
            if ((refcount == 1) != L1Entry.IsCopied(l1Entry))
            {
                _corruptions++;
                _messages.Add($"{(repair ? "Repairing" : "ERROR")} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1Entry:x} refcount={refcount}");
                if (repair)
                {
                    l1.Set(i, refcount == 1 ? l1Entry | L1Entry.Copied : l1Entry & ~L1Entry.Copied);
                    _corruptions--;
                    _corruptionsFixed++;
                }
            }
            if (l2 >= _fileLength || (l2 & (ClusterSize - 1)) != 0) continue;   // nothing to read there
            MetadataCache.Table table = _e.L2Cache.Get(l2);
            int dirty = 0;
            for (int j = 0; j < _g.L2Entries; j++)
            {
                L2Entry e = L2Entry.Read(table.Data, j, _g.ExtendedL2);
                ClusterKind kind = e.Kind(_g.ExtendedL2);
                if (kind is not (ClusterKind.Normal or ClusterKind.ZeroAllocated)) continue;
                try { refcount = _e.Refcounts.Get(e.HostOffset >> _g.ClusterBits); }
                catch (Qcow2FormatException) { continue; }
                if ((refcount == 1) == e.IsCopied) continue;
                _corruptions++;
                _messages.Add($"{(repair ? "Repairing" : "ERROR")} OFLAG_COPIED data cluster: l2_entry={e.Word:x} refcount={refcount}");
                if (repair)
                {
                    L2Entry.Write(table.Data, j, _g.ExtendedL2, e with { Word = refcount == 1 ? e.Word | L2Entry.Copied : e.Word & ~L2Entry.Copied });
                    dirty++;
                }
            }
            if (dirty > 0)
            {
                _e.L2Cache.MarkDirty(table);
                _corruptions -= dirty;
                _corruptionsFixed += dirty;
            }
        }
    }

    /// <summary>
    /// Writes a new refcount structure from the in-memory counts: refcount blocks and table in fresh
    /// clusters after the end of the file, then the header switches to them in one write. The old
    /// structure's clusters are simply no longer counted.
    /// </summary>
    private void RebuildRefcountStructure()
    {
        // The old table and blocks will not be referenced any more.
        Uncount((long)H.RefcountTableOffset, (long)H.RefcountTableClusters * ClusterSize);
        foreach (ulong entry in _e.Refcounts.Table)
        {
            long offset = (long)(entry & RefcountTableEntry.OffsetMask);
            if (offset != 0 && (entry & RefcountTableEntry.ReservedMask) == 0 && (offset & (ClusterSize - 1)) == 0) Uncount(offset, ClusterSize);
        }
        long used = 0;
        for (long i = _clusters - 1; i >= 0; i--) if (_counts[i] != 0) { used = i + 1; break; }
        long areaStart = Math.Max(used, _g.ClustersFor(_fileLength));
        long perBlock = _g.RefcountBlockEntries;
        long blocks = 1, tableClusters = 1;
        while (true)
        {
            long end = areaStart + blocks + tableClusters;
            long needBlocks = (end + perBlock - 1) / perBlock;
            long needTable = Math.Max(1, _g.ClustersFor(needBlocks * 8));
            if (needBlocks == blocks && needTable == tableClusters) break;
            blocks = needBlocks;
            tableClusters = needTable;
        }
        long areaEnd = areaStart + blocks + tableClusters;
        Grow(Math.Max(_clusters, areaEnd));
        for (long c = areaStart; c < areaEnd; c++) _counts[c] = 1;

        var table = new ulong[tableClusters * ClusterSize / 8];
        for (long k = 0; k < blocks; k++)
        {
            byte[] block = new byte[ClusterSize];
            for (long j = 0; j < perBlock; j++)
            {
                long c = k * perBlock + j;
                if (c >= _clusters) break;
                ulong v = Math.Min(_counts[c], _g.RefcountMax);
                if (v != 0) RefcountBlock.Set(block, j, _g.RefcountOrder, v);
            }
            long at = (areaStart + k) << _g.ClusterBits;
            _e.Device.Write(block, at);
            table[k] = (ulong)at;
        }
        byte[] raw = new byte[tableClusters * ClusterSize];
        L1Entry.Encode(table, raw);
        long tableOffset = (areaStart + blocks) << _g.ClusterBits;
        _e.Device.Write(raw, tableOffset);
        _e.Device.Flush();
        H.RefcountTableOffset = (ulong)tableOffset;
        H.RefcountTableClusters = (uint)tableClusters;
        _e.WriteHeaderBytes(Qcow2Header.RefcountTableFieldsOffset, H.EncodeRefcountTableFields());
        _e.Device.Flush();
        _e.Refcounts.Reload(table);
        _e.Refcounts.NoteHighWater(areaEnd);
    }

    private void Uncount(long offset, long size)
    {
        if (size <= 0 || offset < 0) return;
        for (long k = offset >> _g.ClusterBits; k <= (offset + size - 1) >> _g.ClusterBits && k < _clusters; k++)
            if (_counts[k] > 0) _counts[k]--;
    }

    private void MarkCleanAndConsistent()
    {
        ulong bits = Qcow2Header.IncompatibleDirty | Qcow2Header.IncompatibleCorrupt;
        if (H.Version < 3 || (H.IncompatibleFeatures & bits) == 0) return;
        H.IncompatibleFeatures &= ~bits;
        _e.WriteHeaderBytes(Qcow2Header.IncompatibleFeaturesOffset, Qcow2Header.EncodeUInt64(H.IncompatibleFeatures));
        _e.Device.Flush();
    }
}
