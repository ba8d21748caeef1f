using Vmsnap.Storage;
using Vmsnap.Storage.LowLevel;

namespace Vmsnap.Qcow2;

/// <summary>
/// QEMU's metadata overlap check (qcow2_check_metadata_overlap): which metadata structure, if any, a
/// write of a host range would hit, judged from the metadata's own pointers (the header, the active
/// L1 table, the refcount table, the snapshot table), never from the refcounts. Ranges are compared
/// as whole clusters, structures in QEMU's order, and only the kinds <see cref="Checks"/> selects
/// (QEMU's overlap-check option; "cached" by default). The active L2 tables and the refcount blocks
/// are looked up in indexes kept as their tables change, the snapshots' L1 tables in a sorted list
/// rebuilt when the snapshot list changes, so a check costs a few lookups whatever the image's size.
/// </summary>
internal sealed class MetadataOverlap
{
    /// <summary>QEMU's "constant" checks: the structures whose place the header gives.</summary>
    internal const Qcow2Metadata Constant = Qcow2Metadata.MainHeader | Qcow2Metadata.ActiveL1 | Qcow2Metadata.RefcountTable
        | Qcow2Metadata.SnapshotTable | Qcow2Metadata.BitmapDirectory;

    /// <summary>QEMU's default, "cached": also what the tables in memory point to.</summary>
    internal const Qcow2Metadata Cached = Constant | Qcow2Metadata.ActiveL2 | Qcow2Metadata.RefcountBlock | Qcow2Metadata.InactiveL1;

    /// <summary>QEMU's "all": also the snapshots' L2 tables (read from their L1 tables on disk).</summary>
    internal const Qcow2Metadata All = Cached | Qcow2Metadata.InactiveL2;

    private readonly Qcow2Header _header;
    private readonly int _clusterBits;
    private readonly L1Table _activeL1;
    private readonly RefcountTable _refcountTable;
    private readonly SnapshotList _snapshots;
    private readonly IBlockDevice _device;
    private readonly string _path;
    private long _inactiveVersion = -1;
    private (long Start, long End)[] _inactiveL1 = [];   // merged, sorted host byte ranges of the snapshots' L1 tables
    private ClusterIndex? _inactiveL2;
    private HeaderExtension? _bitmapExtension;
    private (long Offset, long Size) _bitmapDirectory;

    /// <param name="header">The header (its table pointers and the bitmaps extension).</param>
    /// <param name="activeL1">The active L1 table, with the index of its L2 tables.</param>
    /// <param name="refcountTable">The refcount table, with the index of its blocks.</param>
    /// <param name="snapshots">The snapshot list (its L1 tables).</param>
    /// <param name="device">Read for the snapshots' L2 tables ("all" only).</param>
    /// <param name="path">The image's path, for messages.</param>
    /// <param name="checks">The structures checked.</param>
    internal MetadataOverlap(Qcow2Header header, L1Table activeL1, RefcountTable refcountTable, SnapshotList snapshots, IBlockDevice device, string path,
        Qcow2Metadata checks)
    {
        _path = path;
        _header = header;
        _clusterBits = header.ClusterBits;
        _activeL1 = activeL1;
        _refcountTable = refcountTable;
        _snapshots = snapshots;
        _device = device;
        Checks = checks;
    }

    /// <summary>The structures checked.</summary>
    internal Qcow2Metadata Checks { get; }

    /// <summary>The checks QEMU's overlap-check option names.</summary>
    internal static Qcow2Metadata ChecksFor(Qcow2OverlapCheck option) => option switch
    {
        Qcow2OverlapCheck.None => Qcow2Metadata.None,
        Qcow2OverlapCheck.Constant => Constant,
        Qcow2OverlapCheck.All => All,
        _ => Cached,
    };

    /// <summary>QEMU's name of a structure, as its messages give it.</summary>
    internal static string Name(Qcow2Metadata kind) => kind switch
    {
        Qcow2Metadata.MainHeader => "qcow2_header",
        Qcow2Metadata.ActiveL1 => "active L1 table",
        Qcow2Metadata.ActiveL2 => "active L2 table",
        Qcow2Metadata.RefcountTable => "refcount table",
        Qcow2Metadata.RefcountBlock => "refcount block",
        Qcow2Metadata.SnapshotTable => "snapshot table",
        Qcow2Metadata.InactiveL1 => "inactive L1 table",
        Qcow2Metadata.InactiveL2 => "inactive L2 table",
        Qcow2Metadata.BitmapDirectory => "bitmap directory",
        _ => kind.ToString(),
    };

    /// <summary>
    /// The first structure (in QEMU's order) that a write of [<paramref name="offset"/>, + <paramref name="size"/>)
    /// would overwrite, leaving out the kinds in <paramref name="ignore"/> (what the write itself is);
    /// <see cref="Qcow2Metadata.None"/> when it overwrites none.
    /// </summary>
    internal Qcow2Metadata Find(long offset, long size, Qcow2Metadata ignore)
    {
        Qcow2Metadata checks = Checks & ~ignore;
        if (size <= 0 || checks == Qcow2Metadata.None) return Qcow2Metadata.None;
        int cs = 1 << _clusterBits;
        if ((checks & Qcow2Metadata.MainHeader) != 0 && offset < cs) return Qcow2Metadata.MainHeader;
        // Whole clusters, as QEMU compares them.
        long first = offset >> _clusterBits;
        long last = (offset + size - 1) >> _clusterBits;
        long start = first << _clusterBits, end = (last + 1) << _clusterBits;

        if ((checks & Qcow2Metadata.ActiveL1) != 0 && _activeL1.Size > 0 && Hits(start, end, _activeL1.Offset, _activeL1.Size * 8L))
            return Qcow2Metadata.ActiveL1;
        if ((checks & Qcow2Metadata.RefcountTable) != 0 && _refcountTable.Clusters > 0
            && Hits(start, end, _refcountTable.Offset, (long)_refcountTable.Clusters << _clusterBits))
            return Qcow2Metadata.RefcountTable;
        if ((checks & Qcow2Metadata.SnapshotTable) != 0 && _snapshots.TableBytes > 0
            && Hits(start, end, (long)_header.SnapshotsOffset, _snapshots.TableBytes))
            return Qcow2Metadata.SnapshotTable;
        if ((checks & Qcow2Metadata.InactiveL1) != 0 && HitsInactiveL1(start, end)) return Qcow2Metadata.InactiveL1;
        if ((checks & Qcow2Metadata.ActiveL2) != 0 && _activeL1.L2Tables!.Any(first, last)) return Qcow2Metadata.ActiveL2;
        if ((checks & Qcow2Metadata.RefcountBlock) != 0 && _refcountTable.Blocks.Any(first, last)) return Qcow2Metadata.RefcountBlock;
        if ((checks & Qcow2Metadata.InactiveL2) != 0 && InactiveL2().Any(first, last)) return Qcow2Metadata.InactiveL2;
        if ((checks & Qcow2Metadata.BitmapDirectory) != 0 && (_header.AutoclearFeatures & Qcow2Header.AutoclearBitmaps) != 0)
        {
            (long dirOffset, long dirSize) = BitmapDirectoryRange();
            if (Hits(start, end, dirOffset, dirSize)) return Qcow2Metadata.BitmapDirectory;
        }
        return Qcow2Metadata.None;
    }

    /// <summary>True when [start, end) and the structure at [at, at + bytes) share a byte (QEMU's ranges_overlap, unsigned).</summary>
    private static bool Hits(long start, long end, long at, long bytes)
    {
        if (bytes <= 0) return false;
        ulong a = (ulong)at, aLast = a + (ulong)bytes - 1;
        return !(aLast < (ulong)start || (ulong)end - 1 < a);
    }

    private bool HitsInactiveL1(long start, long end)
    {
        if (_snapshots.Count == 0) return false;
        if (_inactiveVersion != _snapshots.Version) RebuildInactive();
        // The first range ending after start; it hits when it begins before end.
        int lo = 0, hi = _inactiveL1.Length;
        while (lo < hi)
        {
            int mid = (lo + hi) >> 1;
            if ((ulong)_inactiveL1[mid].End <= (ulong)start) lo = mid + 1;
            else hi = mid;
        }
        return lo < _inactiveL1.Length && (ulong)_inactiveL1[lo].Start < (ulong)end;
    }

    private void RebuildInactive()
    {
        var ranges = new List<(long Start, long End)>();
        foreach (SnapshotEntry s in _snapshots.Entries)
        {
            if (s.L1Size == 0) continue;
            long bytes = s.L1Size * 8L;
            ulong endU = (ulong)s.L1TableOffset + (ulong)bytes;
            long e = endU < (ulong)s.L1TableOffset || endU > long.MaxValue ? long.MaxValue : (long)endU;
            if (s.L1TableOffset < 0) continue;   // beyond any file: no write reaches it
            ranges.Add((s.L1TableOffset, e));
        }
        ranges.Sort((a, b) => a.Start.CompareTo(b.Start));
        var merged = new List<(long Start, long End)>(ranges.Count);
        foreach ((long s, long e) in ranges)
        {
            if (merged.Count > 0 && s <= merged[^1].End) merged[^1] = (merged[^1].Start, Math.Max(merged[^1].End, e));
            else merged.Add((s, e));
        }
        _inactiveL1 = merged.ToArray();
        _inactiveL2 = null;
        _inactiveVersion = _snapshots.Version;
    }

    /// <summary>The snapshots' L2 tables, read from their L1 tables on disk (QEMU reads them on every check; they change only with the snapshot list).</summary>
    private ClusterIndex InactiveL2()
    {
        if (_inactiveVersion != _snapshots.Version) RebuildInactive();
        if (_inactiveL2 is not null) return _inactiveL2;
        var index = new ClusterIndex(_clusterBits);
        long fileLength = _device.Length;
        for (int i = 0; i < _snapshots.Count; i++)
        {
            SnapshotEntry s = _snapshots[i];
            if (s.L1Size == 0) continue;
            // QEMU validates each table first (qcow2_validate_table); one it cannot read fails the write.
            string? problem = (long)s.L1Size * 8 > ClusterGeometry.MaxL1Bytes ? $"an L1 table of {s.L1Size} entries is too large"
                : s.L1TableOffset <= 0 || (s.L1TableOffset & ((1L << _clusterBits) - 1)) != 0 ? $"L1 table offset 0x{(ulong)s.L1TableOffset:x} is invalid"
                : s.L1TableOffset + s.L1Size * 8L > fileLength ? $"the L1 table at 0x{s.L1TableOffset:x} lies beyond the end of the file"
                : null;
            if (problem is not null)
                throw new Qcow2FormatException($"snapshot table entry {i}", s.FileOffset >= 0 ? s.FileOffset : null,
                    $"snapshot {s.Id} ('{s.Name}'): {problem}, so a write cannot be checked against its L2 tables (overlap check 'all')", _path);
            foreach (ulong e in L1Table.Read(_device, s.L1TableOffset, (int)s.L1Size)) index.Add(L1Entry.L2Offset(e));
        }
        return _inactiveL2 = index;
    }

    private (long Offset, long Size) BitmapDirectoryRange()
    {
        HeaderExtension? ext = _header.FindExtension(HeaderExtension.Bitmaps);
        if (ext is null) return (0, 0);
        if (!ReferenceEquals(ext, _bitmapExtension))
        {
            _bitmapExtension = ext;
            if (ext.Data.Length < 24)
            {
                _bitmapDirectory = (0, 0);
            }
            else
            {
                (_, long dirOffset, long dirSize) = BitmapDirectory.ParseExtension(ext.Data);
                _bitmapDirectory = (dirOffset, dirSize);
            }
        }
        return _bitmapDirectory;
    }
}
