namespace Vmsnap.Qcow2;

/// <summary>
/// The references the check counts, one entry per host cluster in the image's own refcount width
/// (as QEMU's in-memory refcount table keeps them, so the check needs as much memory as QEMU's:
/// 2 bytes per cluster with the default 16-bit refcounts). Kept in 64 MiB chunks, so that more
/// entries than one array can hold fit, and a slice of refcount-block size is a refcount block.
/// </summary>
internal sealed class ReferenceCounts
{
    private const int ChunkBytes = 64 << 20;
    private readonly int _order;
    private readonly long _perChunk;
    private readonly List<byte[]> _chunks = [];

    internal ReferenceCounts(int refcountOrder)
    {
        _order = refcountOrder;
        _perChunk = (ChunkBytes * 8L) >> refcountOrder;
    }

    /// <summary>Entries the chunks hold (all zero until set). Every chunk but the last is full.</summary>
    internal long Capacity { get; private set; }

    /// <summary>Bytes <paramref name="entries"/> entries take.</summary>
    internal long BytesFor(long entries) => ((entries << _order) + 7) / 8;

    internal ulong this[long index]
    {
        get => index < Capacity ? RefcountBlock.Get(_chunks[(int)(index / _perChunk)], index % _perChunk, _order) : 0;
        set => RefcountBlock.Set(_chunks[(int)(index / _perChunk)], index % _perChunk, _order, value);
    }

    /// <summary>Makes room for entries [0, <paramref name="entries"/>) at least; false when that much memory cannot be had.</summary>
    internal bool TryReserve(long entries)
    {
        if (entries <= Capacity) return true;
        // Half as much again (at most one chunk more), so that counting references one by one past
        // the end grows rarely; but never more than half of what the process may use.
        long budget = GC.GetGCMemoryInfo().TotalAvailableMemoryBytes / 2;
        long wanted = Math.Max(entries, Capacity + Math.Min(Capacity / 2, _perChunk));
        if (BytesFor(wanted) > budget) wanted = entries;
        if (BytesFor(wanted) > budget) return false;
        try
        {
            while (Capacity < wanted)
            {
                if (_chunks.Count > 0 && _chunks[^1].Length < ChunkBytes)
                {
                    byte[] chunk = _chunks[^1];
                    Array.Resize(ref chunk, ChunkSize(BytesFor(wanted - (_chunks.Count - 1) * _perChunk)));
                    _chunks[^1] = chunk;
                }
                else
                {
                    _chunks.Add(new byte[ChunkSize(BytesFor(wanted - _chunks.Count * _perChunk))]);
                }
                Capacity = (_chunks.Count - 1) * _perChunk + ((_chunks[^1].Length * 8L) >> _order);
            }
        }
        catch (OutOfMemoryException)
        {
            return false;
        }
        return true;
    }

    private static int ChunkSize(long bytes) => (int)Math.Min(ChunkBytes, Math.Max(4096, (bytes + 4095) & ~4095L));

    /// <summary>Sets every entry to 0.</summary>
    internal void Clear()
    {
        foreach (byte[] c in _chunks) Array.Clear(c);
    }
}
