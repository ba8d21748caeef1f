using Vmsnap.Storage.LowLevel;

namespace Vmsnap.Qcow2;

/// <summary>
/// A table of cluster offsets that a metadata cache's tables hang off, written entry by entry after
/// that cache's dirty tables are on disk: the active L1 table (after the L2 tables), the refcount
/// table (after the refcount blocks).
/// </summary>
internal interface ITopTable
{
    /// <summary>True when entries changed in memory only.</summary>
    bool IsDirty { get; }

    /// <summary>Writes the changed entries (whole 512-byte sectors of them, like QEMU).</summary>
    void WriteDirty(Qcow2File file);
}

/// <summary>An L1 table in memory: the active one (growable, written back) or a snapshot's (read-only).</summary>
internal sealed class L1Table : ITopTable
{
    private int _dirtyFirst = int.MaxValue, _dirtyLast = -1;

    /// <param name="offset">Where the table lies.</param>
    /// <param name="entries">Its entries.</param>
    /// <param name="isActive">The active table (its L2 tables are indexed for the overlap check), or a snapshot's.</param>
    /// <param name="clusterBits">The image's cluster bits (for the index of an active table).</param>
    internal L1Table(long offset, ulong[] entries, bool isActive, int clusterBits = 0)
    {
        Offset = offset;
        Entries = entries;
        IsActive = isActive;
        if (isActive)
        {
            L2Tables = new ClusterIndex(clusterBits);
            foreach (ulong e in entries) L2Tables.Add(L1Entry.L2Offset(e));
        }
    }

    internal long Offset { get; private set; }
    internal ulong[] Entries { get; private set; }
    internal bool IsActive { get; }

    /// <summary>The host clusters of the L2 tables an active table points to (null for a snapshot's).</summary>
    internal ClusterIndex? L2Tables { get; }
    internal int Size => Entries.Length;
    public bool IsDirty => _dirtyLast >= 0;

    internal ulong this[long index] => index < Entries.Length ? Entries[index] : 0;

    /// <summary>A read-only copy of the first <paramref name="count"/> entries (a snapshot's table cut to the disk's range).</summary>
    internal L1Table Prefix(int count) => new(Offset, Entries[..Math.Min(count, Entries.Length)], isActive: false);

    internal void Set(long index, ulong entry)
    {
        if (L2Tables is not null && L1Entry.L2Offset(entry) != L1Entry.L2Offset(Entries[index]))
        {
            L2Tables.Remove(L1Entry.L2Offset(Entries[index]));
            L2Tables.Add(L1Entry.L2Offset(entry));
        }
        Entries[index] = entry;
        _dirtyFirst = Math.Min(_dirtyFirst, (int)index);
        _dirtyLast = Math.Max(_dirtyLast, (int)index);
    }

    /// <summary>The dirty range in whole 512-byte sectors (64 entries), clipped to the table.</summary>
    internal (int First, int Count) TakeDirtyRange()
    {
        if (_dirtyLast < 0) return (0, 0);
        int first = _dirtyFirst & ~63, last = Math.Min(_dirtyLast | 63, Entries.Length - 1);
        _dirtyFirst = int.MaxValue;
        _dirtyLast = -1;
        return (first, last - first + 1);
    }

    public void WriteDirty(Qcow2File file)
    {
        (int first, int count) = TakeDirtyRange();
        if (count == 0) return;
        byte[] bytes = new byte[count * 8];
        L1Entry.Encode(Entries.AsSpan(first, count), bytes);
        file.Write(bytes, Offset + first * 8L, Qcow2Metadata.ActiveL1);
    }

    internal void Replace(long offset, ulong[] entries)
    {
        Offset = offset;
        Entries = entries;
        if (L2Tables is not null)
        {
            L2Tables.Clear();
            foreach (ulong e in entries) L2Tables.Add(L1Entry.L2Offset(e));
        }
        _dirtyFirst = int.MaxValue;
        _dirtyLast = -1;
    }

    /// <summary>Reads <paramref name="entries"/> L1 entries at <paramref name="offset"/> (bytes past the end of the file read as zeroes).</summary>
    internal static ulong[] Read(IBlockDevice device, long offset, int entries)
    {
        if (entries == 0) return [];
        byte[] raw = new byte[entries * 8L];
        int n = device.Read(raw, offset);
        if (n < raw.Length) raw.AsSpan(n).Clear();
        return L1Entry.Decode(raw);
    }
}
