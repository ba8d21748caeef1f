using Vmsnap.Storage;

namespace Vmsnap.Qcow2;

/// <summary>
/// Cluster mapping (QEMU's qcow2-cluster.c): L1 → L2 → host cluster lookups, allocation and
/// copy-on-write of L2 tables, L1 growth. Owns the active L1 table, the L2 table cache and the
/// set of active L2 tables validated since they were loaded; runs under the engine's lock.
/// </summary>
internal sealed class ClusterMapping
{
    private readonly Qcow2Engine _e;

    internal ClusterMapping(Qcow2Engine engine, L1Table activeL1)
    {
        _e = engine;
        ActiveL1 = activeL1;
        int l2Capacity = (int)Math.Clamp((32L << 20) / Geometry.ClusterSize, 16, 65536);
        L2Cache = new MetadataCache(engine.Device, Geometry.ClusterSize, l2Capacity, "L2 table");
    }

    /// <summary>The active L1 table (in memory; dirty entries are written by the engine's flush).</summary>
    internal L1Table ActiveL1 { get; }

    /// <summary>Cached L2 tables, active and snapshot ones.</summary>
    internal MetadataCache L2Cache { get; }

    /// <summary>
    /// Active L2 tables checked since they were loaded. Like QEMU, a clean image is trusted and
    /// checked lazily: each active L2 table is validated the first time a write uses it (entries,
    /// COPIED flags against refcounts, clusters shared inside it; see the engine's ValidateActiveL2).
    /// </summary>
    internal HashSet<long> ValidatedL2 { get; } = [];

    // What the mapping uses of the engine (the coordinator owning device, header, refcounts and lock).
    private IBlockDevice Device => _e.Device;
    private Qcow2Header Header => _e.Header;
    private ClusterGeometry Geometry => _e.Geometry;
    private RefcountManager Refcounts => _e.Refcounts;
    private Qcow2FormatException Corrupt(string structure, long? offset, string problem) => _e.Corrupt(structure, offset, problem);
    private Qcow2FormatException CorruptionFound(string structure, long? offset, string problem) => _e.CorruptionFound(structure, offset, problem);

    /// <summary>End of what the file holds or vmsnap has allocated: host offsets at or past it are bad references.</summary>
    internal long HostLimit => Refcounts.HighWater << Geometry.ClusterBits;

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
            _e.ValidateActiveL2(l1Index, current);   // before it is written or copied
            if (L1Entry.IsCopied(entry)) return current;
        }
        long fresh = Refcounts.Allocate(1);
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
        ValidatedL2.Add(fresh);   // empty, or a copy of a table just validated
        if (old != 0)
        {
            _e.FreeOrOwe(old, Geometry.ClusterSize);   // reference dropped in memory first
            // Another active L1 entry may share the old table (after check repaired such sharing): the last one owns it now.
            if (Refcounts.Get(old >> Geometry.ClusterBits) == 1)
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
        long newOffset = Refcounts.Allocate(Geometry.ClustersFor(bytes));
        _e.FlushAll();
        var entries = new ulong[newSize];
        ActiveL1.Entries.CopyTo(entries, 0);
        byte[] raw = new byte[bytes];
        L1Entry.Encode(entries, raw);
        Device.Write(raw, newOffset);
        Device.Flush();

        long oldOffset = ActiveL1.Offset;
        Header.L1Size = (uint)newSize;
        Header.L1TableOffset = (ulong)newOffset;
        _e.WriteHeaderBytes(Qcow2Header.L1SizeOffset, Header.EncodeL1Fields());
        Device.Flush();
        ActiveL1.Replace(newOffset, entries);
        if (size > 0) _e.FreeOrOwe(oldOffset, size * 8);
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
        return new L1Table(offset, Qcow2Engine.ReadL1(Device, offset, (int)entries), isActive: false);
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
}
