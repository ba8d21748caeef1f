using Vmsnap.Storage;
using Vmsnap.Storage.LowLevel;

namespace Vmsnap.Qcow2;

/// <summary>
/// The refcount table in memory: its entries (refcount block offsets) and which of them changed;
/// where it lies is the header's (refcount_table_offset, refcount_table_clusters).
/// </summary>
internal sealed class RefcountTable : ITopTable
{
    private readonly Qcow2Header _header;
    private long _dirtyFirst = long.MaxValue, _dirtyLast = -1;

    internal RefcountTable(Qcow2Header header, ulong[] entries)
    {
        _header = header;
        Blocks = new ClusterIndex(header.ClusterBits);
        Replace(entries);
    }

    internal ulong[] Entries { get; private set; } = [];

    /// <summary>The host clusters of the refcount blocks the table points to (for the overlap check).</summary>
    internal ClusterIndex Blocks { get; }
    internal long Offset => (long)_header.RefcountTableOffset;
    internal int Clusters => (int)_header.RefcountTableClusters;
    internal int Length => Entries.Length;
    public bool IsDirty => _dirtyLast >= 0;

    /// <summary>Points entry <paramref name="index"/> at the refcount block at <paramref name="blockOffset"/> (in memory).</summary>
    internal void Set(long index, long blockOffset)
    {
        Blocks.Remove(BlockOffset(Entries[index]));
        Blocks.Add(blockOffset);
        Entries[index] = (ulong)blockOffset;
        _dirtyFirst = Math.Min(_dirtyFirst, index);
        _dirtyLast = Math.Max(_dirtyLast, index);
    }

    /// <summary>Takes entries that are on disk already (a table written whole, or read anew).</summary>
    internal void Replace(ulong[] entries)
    {
        Entries = entries;
        Blocks.Clear();
        foreach (ulong e in entries) Blocks.Add(BlockOffset(e));
        _dirtyFirst = long.MaxValue;
        _dirtyLast = -1;
    }

    private static long BlockOffset(ulong entry) => (long)(entry & RefcountTableEntry.OffsetMask);

    public void WriteDirty(Qcow2File file)
    {
        if (_dirtyLast < 0) return;
        // Whole 512-byte sectors of the table, like QEMU.
        long first = _dirtyFirst & ~63L, last = Math.Min(_dirtyLast | 63L, Entries.Length - 1);
        byte[] bytes = new byte[(last - first + 1) * 8];
        L1Entry.Encode(Entries.AsSpan((int)first, (int)(last - first + 1)), bytes);
        file.Write(bytes, Offset + first * 8, Qcow2Metadata.RefcountTable);
        _dirtyFirst = long.MaxValue;
        _dirtyLast = -1;
    }

    /// <summary>Reads the refcount table the header points to.</summary>
    internal static ulong[] Read(IBlockDevice device, Qcow2Header header)
    {
        long bytes = (long)header.RefcountTableClusters * header.ClusterSize;
        byte[] raw = new byte[bytes];
        int n = device.Read(raw, (long)header.RefcountTableOffset);
        if (n < raw.Length) raw.AsSpan(n).Clear();
        return L1Entry.Decode(raw);
    }
}
