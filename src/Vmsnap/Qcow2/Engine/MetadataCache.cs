using Vmsnap.Storage;

namespace Vmsnap.Qcow2;

/// <summary>
/// A write-back cache of cluster-sized metadata tables (L2 tables or refcount blocks), keyed by host
/// offset. Tables stay in memory while an operation runs; <see cref="Trim"/> between operations
/// evicts the least recently used ones, writing dirty ones back after <see cref="BeforeWriteBack"/>
/// has made whatever they depend on durable.
/// </summary>
internal sealed class MetadataCache
{
    internal sealed class Table(long offset, byte[] data)
    {
        internal long Offset { get; } = offset;
        internal byte[] Data { get; } = data;
        internal bool Dirty { get; set; }
        internal long LastUse { get; set; }
    }

    private readonly Dictionary<long, Table> _tables = [];
    private readonly IBlockDevice _device;
    private readonly int _clusterSize;
    private long _clock;
    private int _dirtyCount;
    private bool _evictedUnflushed;   // Trim wrote dirty tables back since the last WriteDirty

    internal MetadataCache(IBlockDevice device, int clusterSize, int capacity, string what)
    {
        _device = device;
        _clusterSize = clusterSize;
        Capacity = Math.Max(4, capacity);
        What = what;
    }

    internal string What { get; }

    /// <summary>Tables kept after <see cref="Trim"/>.</summary>
    internal int Capacity { get; set; }

    /// <summary>Runs before any dirty table is written, so that what it depends on is on disk first.</summary>
    internal Action? BeforeWriteBack { get; set; }

    internal int Count => _tables.Count;
    internal bool HasDirty => _dirtyCount > 0;

    /// <summary>The table at <paramref name="offset"/>, read from the device if not cached (bytes past the end of the file read as zeroes).</summary>
    internal Table Get(long offset)
    {
        if (_tables.TryGetValue(offset, out Table? t))
        {
            t.LastUse = ++_clock;
            return t;
        }
        byte[] data = new byte[_clusterSize];
        int n = _device.Read(data, offset);
        if (n < data.Length) data.AsSpan(n).Clear();
        t = new Table(offset, data) { LastUse = ++_clock };
        _tables.Add(offset, t);
        return t;
    }

    /// <summary>The cached table at <paramref name="offset"/>, or null; never reads (walks over every table use it).</summary>
    internal Table? Peek(long offset) => _tables.GetValueOrDefault(offset);

    /// <summary>A table for a freshly allocated cluster: zeroed, not read, marked dirty.</summary>
    internal Table GetEmpty(long offset)
    {
        if (_tables.TryGetValue(offset, out Table? t))
        {
            Array.Clear(t.Data);
        }
        else
        {
            t = new Table(offset, new byte[_clusterSize]);
            _tables.Add(offset, t);
        }
        t.LastUse = ++_clock;
        MarkDirty(t);
        return t;
    }

    /// <summary>Puts a table whose on-disk bytes are known (just written) into the cache, clean.</summary>
    internal void PutClean(long offset, byte[] data)
    {
        Remove(offset);
        _tables.Add(offset, new Table(offset, data) { LastUse = ++_clock });
    }

    internal void MarkDirty(Table table)
    {
        if (table.Dirty) return;
        table.Dirty = true;
        _dirtyCount++;
    }

    /// <summary>Forgets a table without writing it (its cluster was freed).</summary>
    internal void Remove(long offset)
    {
        if (_tables.Remove(offset, out Table? t) && t.Dirty) _dirtyCount--;
    }

    /// <summary>Forgets everything, dirty tables included (after the structure was rebuilt on disk).</summary>
    internal void Clear()
    {
        _tables.Clear();
        _dirtyCount = 0;
    }

    /// <summary>
    /// Writes every dirty table (in offset order). True when tables were written since the last call,
    /// by this one or by an eviction (<see cref="Trim"/>): the caller flushes the device before
    /// anything that depends on them.
    /// </summary>
    internal bool WriteDirty()
    {
        bool evicted = _evictedUnflushed;
        _evictedUnflushed = false;
        if (_dirtyCount == 0) return evicted;
        BeforeWriteBack?.Invoke();
        var dirty = new List<Table>(_dirtyCount);
        foreach (Table t in _tables.Values) if (t.Dirty) dirty.Add(t);
        dirty.Sort((a, b) => a.Offset.CompareTo(b.Offset));
        foreach (Table t in dirty) WriteBack(t);
        return true;
    }

    /// <summary>Evicts least recently used tables down to <see cref="Capacity"/>.</summary>
    internal void Trim()
    {
        if (_tables.Count <= Capacity) return;
        var all = new List<Table>(_tables.Values);
        all.Sort((a, b) => a.LastUse.CompareTo(b.LastUse));
        int evict = _tables.Count - Capacity;
        var victims = all.GetRange(0, evict);
        if (victims.Exists(t => t.Dirty))
        {
            BeforeWriteBack?.Invoke();
            victims.Sort((a, b) => a.Offset.CompareTo(b.Offset));
            foreach (Table t in victims) if (t.Dirty) WriteBack(t);
            _evictedUnflushed = true;
        }
        foreach (Table t in victims) _tables.Remove(t.Offset);
    }

    private void WriteBack(Table t)
    {
        if (!t.Dirty) return;   // BeforeWriteBack may have written it already
        _device.Write(t.Data, t.Offset);
        t.Dirty = false;
        _dirtyCount--;
    }
}
