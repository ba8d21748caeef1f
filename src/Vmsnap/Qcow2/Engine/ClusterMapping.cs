namespace Vmsnap.Qcow2;

/// <summary>
/// Cluster mapping (QEMU's qcow2-cluster.c): L1 → L2 → host cluster lookups, allocation and
/// copy-on-write of L2 tables, L1 growth, dropping the references of replaced entries, and the
/// lazy validation of active L2 tables before a write relies on them. Works on the active L1
/// table, the L2 cache and the validation memos of the engine's state; runs under the engine's lock.
/// </summary>
internal sealed class ClusterMapping
{
    private readonly Qcow2File _file;
    private readonly Qcow2Header _header;
    private readonly ClusterGeometry _g;
    private readonly RefcountManager _refcounts;
    private readonly MetadataCaches _caches;
    private readonly ImageHealth _health;
    private readonly HashSet<long> _validated;
    private readonly Dictionary<long, List<long>> _activeShared;

    /// <param name="file">The image file (L1 growth writes a new table and the header).</param>
    /// <param name="header">The header (L1 fields).</param>
    /// <param name="geometry">The image's geometry.</param>
    /// <param name="activeL1">The active L1 table.</param>
    /// <param name="l2Cache">Cached L2 tables.</param>
    /// <param name="refcounts">Allocation, freeing and refcounts.</param>
    /// <param name="caches">Flushed before the L1 table moves.</param>
    /// <param name="health">Where corruption found is recorded.</param>
    /// <param name="validated">Active L2 tables validated since they were loaded (<see cref="Qcow2State.ValidatedL2"/>).</param>
    /// <param name="activeShared">Host clusters several active L2 entries share (<see cref="Qcow2State.ActiveShared"/>).</param>
    internal ClusterMapping(Qcow2File file, Qcow2Header header, ClusterGeometry geometry, L1Table activeL1, MetadataCache l2Cache,
        RefcountManager refcounts, MetadataCaches caches, ImageHealth health, HashSet<long> validated, Dictionary<long, List<long>> activeShared)
    {
        _file = file;
        _header = header;
        _g = geometry;
        ActiveL1 = activeL1;
        L2Cache = l2Cache;
        _refcounts = refcounts;
        _caches = caches;
        _health = health;
        _validated = validated;
        _activeShared = activeShared;
    }

    /// <summary>The active L1 table.</summary>
    internal L1Table ActiveL1 { get; }

    /// <summary>Cached L2 tables, active and snapshot ones.</summary>
    internal MetadataCache L2Cache { get; }

    private ClusterGeometry Geometry => _g;
    private Qcow2FormatException Corrupt(string structure, long? offset, string problem) => _health.Corrupt(structure, offset, problem);
    private Qcow2FormatException CorruptionFound(string structure, long? offset, string problem) => _health.Found(structure, offset, problem);

    /// <summary>End of what the file holds or vmsnap has allocated: host offsets at or past it are bad references.</summary>
    internal long HostLimit => _refcounts.HighWater << Geometry.ClusterBits;

    /// <summary>The L2 table an L1 entry points to, or null when the entry is empty.</summary>
    internal MetadataCache.Table? GetL2Table(L1Table l1, long l1Index)
    {
        ulong entry = l1[l1Index];
        long l2 = L1Entry.L2Offset(entry);
        if (l2 == 0) return null;
        ValidateL2Offset(l1, l1Index, l2);
        return L2Cache.Get(l2);
    }

    internal void ValidateL2Offset(L1Table l1, long l1Index, long l2)
    {
        string where = l1.IsActive ? $"L1 table entry {l1Index}" : $"snapshot L1 table entry {l1Index}";
        if ((l2 & (Geometry.ClusterSize - 1)) != 0)
            throw CorruptionFound(where, l1.Offset + l1Index * 8, $"points to unaligned L2 table offset 0x{l2:x}");
        if (l2 >= HostLimit)
            throw CorruptionFound(where, l1.Offset + l1Index * 8, $"points to an L2 table at 0x{l2:x}, beyond the end of the file (0x{HostLimit:x})");
    }

    /// <summary>Checks a data cluster reference read from an L2 table before it is used.</summary>
    internal void ValidateEntry(L2Entry e, ClusterKind kind, long l2Offset, int index)
    {
        long at = l2Offset + (long)index * Geometry.L2EntrySize;
        switch (kind)
        {
            case ClusterKind.Normal or ClusterKind.ZeroAllocated:
                long host = e.HostOffset;
                if ((host & (Geometry.ClusterSize - 1)) != 0)
                    throw CorruptionFound($"L2 table entry {index}", at, $"points to unaligned host offset 0x{host:x}");
                if (host >= HostLimit)
                    throw CorruptionFound($"L2 table entry {index}", at, $"points to host offset 0x{host:x}, beyond the end of the file (0x{HostLimit:x})");
                if (Geometry.ExtendedL2 && (e.AllocatedMask & e.ZeroMask) != 0)
                    throw CorruptionFound($"L2 table entry {index}", at, $"subcluster bitmap 0x{e.Bitmap:x16} marks subclusters both allocated and zero");
                break;
            case ClusterKind.Compressed:
                (long offset, _) = e.CompressedRange(Geometry);
                if (offset >= HostLimit)
                    throw CorruptionFound($"L2 table entry {index}", at, $"compressed data at 0x{offset:x} lies beyond the end of the file (0x{HostLimit:x})");
                if (Geometry.ExtendedL2 && e.Bitmap != 0)
                    throw CorruptionFound($"L2 table entry {index}", at, "compressed cluster with a non-zero subcluster bitmap");
                break;
            case ClusterKind.Unallocated when Geometry.ExtendedL2 && e.AllocatedMask != 0:
                throw CorruptionFound($"L2 table entry {index}", at, "unallocated cluster with allocated subclusters");
        }
    }

    /// <summary>
    /// The active L2 table for <paramref name="l1Index"/>, made exclusively owned: allocated when
    /// missing, copied when shared with a snapshot (refcount above 1). Grows the L1 table if needed.
    /// </summary>
    internal MetadataCache.Table GetWritableL2(long l1Index)
    {
        if (l1Index >= ActiveL1.Size) GrowL1(l1Index + 1, exact: false);
        ulong entry = ActiveL1[l1Index];
        long old = L1Entry.L2Offset(entry);
        if (old != 0)
        {
            ValidateL2Offset(ActiveL1, l1Index, old);
            MetadataCache.Table current = L2Cache.Get(old);
            ValidateActiveL2(l1Index, current);   // before it is written or copied
            if (L1Entry.IsCopied(entry)) return current;
        }
        long fresh = _refcounts.Allocate(1);
        MetadataCache.Table table;
        if (old == 0)
        {
            table = L2Cache.GetEmpty(fresh);
        }
        else
        {
            byte[] source = L2Cache.Get(old).Data;
            table = L2Cache.GetEmpty(fresh);
            source.CopyTo(table.Data, 0);
        }
        ActiveL1.Set(l1Index, L1Entry.Make(fresh, copied: true));
        _validated.Add(fresh);   // empty, or a copy of a table just validated
        if (old != 0)
        {
            _refcounts.FreeOrOwe(old, Geometry.ClusterSize);   // reference dropped in memory first
            // Another active L1 entry may share the old table (after check repaired such sharing): the last one owns it now.
            if (_refcounts.Get(old >> Geometry.ClusterBits) == 1)
            {
                for (long i = 0; i < ActiveL1.Size; i++)
                    if (L1Entry.L2Offset(ActiveL1[i]) == old && !L1Entry.IsCopied(ActiveL1[i])) ActiveL1.Set(i, ActiveL1[i] | L1Entry.Copied);
            }
        }
        return table;
    }

    /// <summary>
    /// Replaces the active L1 table by a bigger one in new clusters: everything it references is made
    /// durable first, the header's l1_size and l1_table_offset switch in one write, the old table is
    /// freed last. Without <paramref name="exact"/> the size grows by half again until it suffices.
    /// </summary>
    internal void GrowL1(long minEntries, bool exact)
    {
        long size = ActiveL1.Size;
        if (minEntries <= size) return;
        long newSize = minEntries;
        if (!exact)
        {
            newSize = Math.Max(size, 1);
            while (newSize < minEntries) newSize = (newSize * 3 + 1) / 2;
        }
        long maxEntries = ClusterGeometry.MaxL1Bytes / 8;
        if (newSize > maxEntries) newSize = Math.Max(minEntries, maxEntries);
        if (newSize > maxEntries)
            throw Corrupt("L1 table", ActiveL1.Offset, $"would need {minEntries} entries, more than the {maxEntries} qcow2 allows (guest offset too large)");

        long bytes = newSize * 8;
        long newOffset = _refcounts.Allocate(Geometry.ClustersFor(bytes));
        _caches.FlushAll();
        var entries = new ulong[newSize];
        ActiveL1.Entries.CopyTo(entries, 0);
        byte[] raw = new byte[bytes];
        L1Entry.Encode(entries, raw);
        _file.Write(raw, newOffset, Qcow2Metadata.None);
        _file.Flush();

        long oldOffset = ActiveL1.Offset;
        _header.L1Size = (uint)newSize;
        _header.L1TableOffset = (ulong)newOffset;
        _file.WriteHeader(_header.EncodeL1Fields(), Qcow2Header.L1SizeOffset);
        _file.Flush();
        ActiveL1.Replace(newOffset, entries);
        if (size > 0) _refcounts.FreeOrOwe(oldOffset, size * 8);
    }

    /// <summary>Reads an L1 table (a snapshot's) into memory, validated against the file.</summary>
    internal L1Table ReadL1Table(long offset, uint entries, string what)
    {
        if ((long)entries * 8 > ClusterGeometry.MaxL1Bytes)
            throw Corrupt(what, offset, $"{entries} entries is more than the {ClusterGeometry.MaxL1Bytes / 8} qcow2 allows");
        if (entries > 0)
        {
            if ((offset & (Geometry.ClusterSize - 1)) != 0)
                throw Corrupt(what, offset, "offset is not aligned to a cluster");
            if (offset < Geometry.ClusterSize || offset >= HostLimit)
                throw Corrupt(what, offset, $"lies outside the file (0x{HostLimit:x} bytes) or in the header cluster");
        }
        return new L1Table(offset, L1Table.Read(_file.Device, offset, (int)entries), isActive: false);
    }

    /// <summary>Describes [offset, offset + length) through <paramref name="l1"/> as extents (adjacent ones merged).</summary>
    internal void MapRange(L1Table l1, long offset, long length, List<Qcow2Engine.Extent> extents)
    {
        long pos = offset, end = offset + length;
        while (pos < end)
        {
            long l1Index = Geometry.L1Index(pos);
            long tableEnd = Math.Min(end, (l1Index + 1) * Geometry.BytesPerL2);
            MetadataCache.Table? table = GetL2Table(l1, l1Index);
            if (table is null)
            {
                AddExtent(extents, new Qcow2Engine.Extent(Qcow2Engine.ExtentKind.Backing, pos, tableEnd - pos, 0, 0));
                pos = tableEnd;
                continue;
            }
            while (pos < tableEnd)
            {
                int inCluster = (int)Geometry.OffsetInCluster(pos);
                int n = (int)Math.Min(tableEnd - pos, Geometry.ClusterSize - inCluster);
                int index = Geometry.L2Index(pos);
                L2Entry e = L2Entry.Read(table.Data, index, Geometry.ExtendedL2);
                ClusterKind kind = e.Kind(Geometry.ExtendedL2);
                ValidateEntry(e, kind, table.Offset, index);
                MapCluster(e, kind, pos, inCluster, n, extents);
                pos += n;
            }
        }
    }

    private void MapCluster(L2Entry e, ClusterKind kind, long guest, int inCluster, int length, List<Qcow2Engine.Extent> extents)
    {
        switch (kind)
        {
            case ClusterKind.Compressed:
                extents.Add(new Qcow2Engine.Extent(Qcow2Engine.ExtentKind.Compressed, guest, length, inCluster, e.Word));
                return;
            case ClusterKind.ZeroPlain or ClusterKind.ZeroAllocated:
                AddExtent(extents, new Qcow2Engine.Extent(Qcow2Engine.ExtentKind.Zero, guest, length, 0, 0));
                return;
            case ClusterKind.Unallocated when !Geometry.ExtendedL2:
                AddExtent(extents, new Qcow2Engine.Extent(Qcow2Engine.ExtentKind.Backing, guest, length, 0, 0));
                return;
            case ClusterKind.Normal when !Geometry.ExtendedL2:
                AddExtent(extents, new Qcow2Engine.Extent(Qcow2Engine.ExtentKind.Data, guest, length, e.HostOffset + inCluster, 0));
                return;
        }
        // Extended L2: each subcluster is allocated (data), zero, or unallocated (backing).
        int sc = Geometry.SubclusterSize;
        int pos = inCluster, end = inCluster + length;
        while (pos < end)
        {
            int s = pos / sc;
            int n = Math.Min(end, (s + 1) * sc) - pos;
            uint bit = 1u << s;
            long g = guest + (pos - inCluster);
            if ((e.AllocatedMask & bit) != 0) AddExtent(extents, new Qcow2Engine.Extent(Qcow2Engine.ExtentKind.Data, g, n, e.HostOffset + pos, 0));
            else if ((e.ZeroMask & bit) != 0) AddExtent(extents, new Qcow2Engine.Extent(Qcow2Engine.ExtentKind.Zero, g, n, 0, 0));
            else AddExtent(extents, new Qcow2Engine.Extent(Qcow2Engine.ExtentKind.Backing, g, n, 0, 0));
            pos += n;
        }
    }

    private static void AddExtent(List<Qcow2Engine.Extent> extents, Qcow2Engine.Extent x)
    {
        if (extents.Count > 0)
        {
            Qcow2Engine.Extent last = extents[^1];
            if (last.Kind == x.Kind && x.Kind != Qcow2Engine.ExtentKind.Compressed && last.Guest + last.Length == x.Guest
                && (x.Kind != Qcow2Engine.ExtentKind.Data || last.Host + last.Length == x.Host))
            {
                extents[^1] = last with { Length = last.Length + x.Length };
                return;
            }
        }
        extents.Add(x);
    }

    // ---- validation of active L2 tables before a write relies on them ------------------------------

    /// <summary>Validates the active L2 tables a write of guest range [offset, offset + length) will use (each once per open).</summary>
    internal void ValidateForWrite(long offset, long length)
    {
        long firstIndex = Geometry.L1Index(offset), lastIndex = Geometry.L1Index(offset + length - 1);
        for (long i = firstIndex; i <= Math.Min(lastIndex, ActiveL1.Size - 1); i++)
        {
            long l2 = L1Entry.L2Offset(ActiveL1[i]);
            if (l2 == 0 || _validated.Contains(l2)) continue;
            ValidateL2Offset(ActiveL1, i, l2);
            ValidateActiveL2(i, L2Cache.Get(l2));
        }
    }

    /// <summary>
    /// What QEMU's check would find wrong in one active L2 table and would make a write damage data:
    /// bad entries, a COPIED flag (on the table or an entry) whose refcount is not 1, a referenced
    /// cluster whose refcount is 0, two entries sharing a cluster one of them claims alone. Clusters
    /// the table's entries share legally (refcount high enough) are noted, to give the last one left
    /// its COPIED flag back.
    /// </summary>
    private void ValidateActiveL2(long l1Index, MetadataCache.Table table)
    {
        if (_validated.Contains(table.Offset)) return;
        long at = ActiveL1.Offset + l1Index * 8;
        ulong l1Entry = ActiveL1[l1Index];
        ulong tableRefcount = _refcounts.Get(table.Offset >> Geometry.ClusterBits);
        if (tableRefcount == 0)
            throw _health.WriteRefused($"L1 table entry {l1Index}", at, $"points to the L2 table at 0x{table.Offset:x}, whose refcount is 0");
        if (L1Entry.IsCopied(l1Entry) && tableRefcount != 1)
            throw _health.WriteRefused($"L1 table entry {l1Index}", at, $"marks the L2 table at 0x{table.Offset:x} COPIED (not shared), but its refcount is {tableRefcount}");
        bool extended = Geometry.ExtendedL2;
        int entries = Geometry.L2Entries;
        long[] hosts = new long[entries];
        int count = 0;
        var reader = new RefcountManager.Reader(_refcounts);
        for (int j = 0; j < entries; j++)
        {
            L2Entry e = L2Entry.Read(table.Data, j, extended);
            ClusterKind kind = e.Kind(extended);
            ValidateEntry(e, kind, table.Offset, j);
            long entryAt = table.Offset + (long)j * Geometry.L2EntrySize;
            switch (kind)
            {
                case ClusterKind.Normal or ClusterKind.ZeroAllocated:
                    long cluster = e.HostOffset >> Geometry.ClusterBits;
                    ulong refcount = reader.Get(cluster);
                    if (refcount == 0)
                        throw _health.WriteRefused($"L2 table entry {j}", entryAt, $"points to host cluster 0x{e.HostOffset:x}, whose refcount is 0");
                    if (e.IsCopied && refcount != 1)
                        throw _health.WriteRefused($"L2 table entry {j}", entryAt, $"marks host cluster 0x{e.HostOffset:x} COPIED (not shared), but its refcount is {refcount}");
                    hosts[count++] = (cluster << 1) | (e.IsCopied ? 1L : 0L);
                    break;
                case ClusterKind.Compressed:
                    (long offset, int length) = e.CompressedRange(Geometry);
                    for (long c = offset >> Geometry.ClusterBits; c <= (offset + length - 1) >> Geometry.ClusterBits; c++)
                        if (reader.Get(c) == 0)
                            throw _health.WriteRefused($"L2 table entry {j}", entryAt, $"holds compressed data in host cluster 0x{c << Geometry.ClusterBits:x}, whose refcount is 0");
                    break;
            }
        }
        Array.Sort(hosts, 0, count);
        for (int k = 1; k < count; k++)
        {
            if (hosts[k] >> 1 != hosts[k - 1] >> 1) continue;
            long cluster = hosts[k] >> 1;
            if (((hosts[k] | hosts[k - 1]) & 1) != 0)
                throw _health.WriteRefused($"L2 table at 0x{table.Offset:x}", table.Offset,
                    $"two entries point to host cluster 0x{cluster << Geometry.ClusterBits:x}, and one of them marks it COPIED (refcount {_refcounts.Get(cluster)})");
            NoteSharedInTable(l1Index, table, cluster);
            while (k + 1 < count && hosts[k + 1] >> 1 == cluster) k++;
        }
        _validated.Add(table.Offset);
    }

    /// <summary>Records the guest offsets whose entries in one active L2 table share a host cluster.</summary>
    private void NoteSharedInTable(long l1Index, MetadataCache.Table table, long cluster)
    {
        if (_activeShared.ContainsKey(cluster)) return;
        var guests = new List<long>();
        for (int j = 0; j < Geometry.L2Entries; j++)
        {
            L2Entry e = L2Entry.Read(table.Data, j, Geometry.ExtendedL2);
            if (e.Kind(Geometry.ExtendedL2) is ClusterKind.Normal or ClusterKind.ZeroAllocated && e.HostOffset >> Geometry.ClusterBits == cluster)
                guests.Add((l1Index * Geometry.L2Entries + j) * Geometry.ClusterSize);
        }
        _activeShared[cluster] = guests;
    }

    /// <summary>Forgets which L2 tables were validated, after the tables were replaced (a header switch).</summary>
    internal void ForgetValidatedTables() => _validated.Clear();

    /// <summary>Forgets what was validated and which clusters active entries share, after a repair may have rewritten tables and flags.</summary>
    internal void ForgetValidation()
    {
        _validated.Clear();
        _activeShared.Clear();
    }

    /// <summary>Recomputes which active L2 entries share host clusters among <paramref name="clusters"/>, after the active tables changed (a snapshot apply).</summary>
    internal void RefreshActiveSharing(IReadOnlySet<long> clusters)
    {
        _activeShared.Clear();
        if (clusters.Count == 0) return;
        for (long i = 0; i < ActiveL1.Size; i++)
        {
            MetadataCache.Table? table = GetL2Table(ActiveL1, i);
            if (table is null) continue;
            for (int j = 0; j < Geometry.L2Entries; j++)
            {
                L2Entry e = L2Entry.Read(table.Data, j, Geometry.ExtendedL2);
                if (e.Kind(Geometry.ExtendedL2) is not (ClusterKind.Normal or ClusterKind.ZeroAllocated)) continue;
                long cluster = e.HostOffset >> Geometry.ClusterBits;
                if (!clusters.Contains(cluster)) continue;
                if (!_activeShared.TryGetValue(cluster, out List<long>? guests)) _activeShared[cluster] = guests = [];
                guests.Add((i * Geometry.L2Entries + j) * Geometry.ClusterSize);
            }
        }
    }

    // ---- dropping the references of replaced entries ------------------------------------------------

    /// <summary>Drops the storage of several replaced entries; if one fails on the device, the rest are owed.</summary>
    internal void DropAll(List<(L2Entry Old, ClusterKind Kind, long Guest)> dropped)
    {
        for (int k = 0; k < dropped.Count; k++)
        {
            try
            {
                DropStorage(dropped[k].Old, dropped[k].Kind, dropped[k].Guest);
            }
            catch (Exception e) when (e is Storage.StorageException or IOException)
            {
                for (int m = k + 1; m < dropped.Count; m++) OweStorage(dropped[m].Old, dropped[m].Kind);
                throw;
            }
        }
    }

    /// <summary>Lowers the refcount of the host storage an old L2 entry (of guest cluster <paramref name="guest"/>) referenced.</summary>
    private void DropStorage(L2Entry old, ClusterKind kind, long guest)
    {
        switch (kind)
        {
            case ClusterKind.Normal or ClusterKind.ZeroAllocated:
                _refcounts.FreeOrOwe(old.HostOffset, Geometry.ClusterSize);
                long cluster = old.HostOffset >> Geometry.ClusterBits;
                if (_activeShared.TryGetValue(cluster, out List<long>? guests))
                {
                    guests.Remove(guest);
                    if (guests.Count == 1 && _refcounts.Get(cluster) == 1) RestoreCopied(guests[0], old.HostOffset);
                    if (guests.Count <= 1) _activeShared.Remove(cluster);
                }
                break;
            case ClusterKind.Compressed:
                (long offset, int length) = old.CompressedRange(Geometry);
                _refcounts.FreeOrOwe(offset, length);
                break;
        }
    }

    /// <summary>The decrement <see cref="DropStorage"/> would make, owed instead (after an earlier one failed).</summary>
    private void OweStorage(L2Entry old, ClusterKind kind)
    {
        switch (kind)
        {
            case ClusterKind.Normal or ClusterKind.ZeroAllocated:
                _refcounts.Owe(old.HostOffset, Geometry.ClusterSize);
                break;
            case ClusterKind.Compressed:
                (long offset, int length) = old.CompressedRange(Geometry);
                _refcounts.Owe(offset, length);
                break;
        }
    }

    /// <summary>Sets COPIED on the active L2 entry of <paramref name="guest"/> if it still maps to <paramref name="host"/>.</summary>
    private void RestoreCopied(long guest, long host)
    {
        MetadataCache.Table table = GetWritableL2(Geometry.L1Index(guest));
        int index = Geometry.L2Index(guest);
        L2Entry e = L2Entry.Read(table.Data, index, Geometry.ExtendedL2);
        if (e.HostOffset != host || e.IsCopied || e.Kind(Geometry.ExtendedL2) is not (ClusterKind.Normal or ClusterKind.ZeroAllocated)) return;
        L2Entry.Write(table.Data, index, Geometry.ExtendedL2, e with { Word = e.Word | L2Entry.Copied });
        L2Cache.MarkDirty(table);
    }
}
