namespace Vmsnap.Qcow2;

/// <summary>
/// A write-back cache of cluster-sized metadata tables (L2 tables or refcount blocks), keyed by host
/// offset. Tables stay in memory while an operation runs; <see cref="Trim"/> between operations
/// evicts the least recently used ones.
/// </summary>
/// <remarks>
/// Write order is declared as data, as QEMU's qcow2 cache declares it: a cache may depend on another
/// cache (<see cref="DependsOn"/>: that one's tables and top table reach the disk first) or on the
/// data written so far (<see cref="DependsOnFlush"/>: a device flush first). Whatever writes a
/// table back, a <see cref="Flush"/>, <see cref="Trim"/> or a flush of a cache depending on this
/// one, honours those first. Two caches never depend on each other: declaring a dependency first
/// flushes the side that would close the cycle.
/// </remarks>
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
    private readonly Qcow2File _file;
    private readonly int _clusterSize;
    private readonly Qcow2Metadata _kind;
    private readonly List<MetadataCache> _dependents = [];
    private long _clock;
    private int _dirtyCount;
    private bool _evictedUnflushed;   // Trim wrote dirty tables back since the last WriteDirty
    private long _dataWrittenBefore = -1;   // device flushes counted when the data dependency was declared

    internal MetadataCache(Qcow2File file, int clusterSize, int capacity, string what, Qcow2Metadata kind, ITopTable? top)
    {
        _file = file;
        _clusterSize = clusterSize;
        Capacity = Math.Max(4, capacity);
        What = what;
        _kind = kind;
        Top = top;
    }

    internal string What { get; }

    /// <summary>Tables kept after <see cref="Trim"/>.</summary>
    internal int Capacity { get; set; }

    /// <summary>The table whose entries point to this cache's tables; its changed entries are written after them (<see cref="Flush"/>).</summary>
    internal ITopTable? Top { get; }

    /// <summary>The cache whose changes must reach the disk before any table of this one (QEMU's Qcow2Cache.depends).</summary>
    internal MetadataCache? DependsOn { get; private set; }

    /// <summary>
    /// True while tables in memory point to data written by a request that is not durable yet (a
    /// copy-on-write merge, a zero or backing fill): a device flush must come before any table is
    /// written back (QEMU's depends_on_flush). Any device flush since the declaration satisfies it.
    /// </summary>
    internal bool DependsOnFlush => _dataWrittenBefore >= 0 && _file.Flushes <= _dataWrittenBefore;

    /// <summary>Completed <see cref="Flush"/>es: whatever this cache's tables stopped referencing before flush N is unreferenced on disk once this is above N.</summary>
    internal long Flushes { get; private set; }

    internal int Count => _tables.Count;
    internal bool HasDirty => _dirtyCount > 0;

    /// <summary>Declares that this cache's tables now rely on <paramref name="dependency"/>'s changes (QEMU's qcow2_cache_set_dependency).</summary>
    internal void SetDependency(MetadataCache dependency)
    {
        // No cycle: what the dependency itself waits for (this cache) is written first.
        if (dependency.DependsOn is { } first) first.Flush();
        if (DependsOn is { } other && other != dependency) other.Flush();
        DependsOn = dependency;
        if (!dependency._dependents.Contains(this)) dependency._dependents.Add(this);
    }

    /// <summary>Drops the declared dependency without flushing (a repair's changes, which nothing in memory relies on).</summary>
    internal void ForgetDependency() => DependsOn = null;

    /// <summary>Declares that this cache's tables now point to data written so far, which a device flush must make durable first.</summary>
    internal void DependOnData() => _dataWrittenBefore = _file.Flushes;

    /// <summary>The table at <paramref name="offset"/>, read from the device if not cached (bytes past the end of the file read as zeroes).</summary>
    internal Table Get(long offset)
    {
        if (_tables.TryGetValue(offset, out Table? t))
        {
            t.LastUse = ++_clock;
            return t;
        }
        byte[] data = new byte[_clusterSize];
        int n = _file.Device.Read(data, offset);
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

    /// <summary>Marks a table changed in memory. It is checked against the other metadata now, so that an overlap refuses the change before anything of it reaches the disk (and again when it is written back).</summary>
    internal void MarkDirty(Table table)
    {
        if (table.Dirty) return;
        _file.Check(table.Offset, _clusterSize, _kind);
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
    /// Writes this cache's changes, each step durable before the next: what it depends on, its dirty
    /// tables, then its top table's changed entries. Afterwards no cache depends on it any more.
    /// True when anything was written (evictions since the last flush included).
    /// </summary>
    internal bool Flush()
    {
        if (DependsOn is { } first) first.Flush();
        bool wrote = WriteDirty();
        if (Top is { IsDirty: true })
        {
            if (wrote) _file.Flush();
            Top.WriteDirty(_file);
            wrote = true;
        }
        if (wrote) _file.Flush();
        foreach (MetadataCache dependent in _dependents)
            if (dependent.DependsOn == this) dependent.DependsOn = null;
        Flushes++;
        return wrote;
    }

    /// <summary>
    /// Writes every dirty table (in offset order). True when tables were written since the last call,
    /// by this one or by an eviction (<see cref="Trim"/>): the caller flushes the device before
    /// anything that depends on them.
    /// </summary>
    private bool WriteDirty()
    {
        bool evicted = _evictedUnflushed;
        _evictedUnflushed = false;
        if (_dirtyCount == 0) return evicted;
        BeforeWriteBack();
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
            BeforeWriteBack();
            victims.Sort((a, b) => a.Offset.CompareTo(b.Offset));
            foreach (Table t in victims) if (t.Dirty) WriteBack(t);
            _evictedUnflushed = true;
        }
        foreach (Table t in victims) _tables.Remove(t.Offset);
    }

    /// <summary>What this cache's tables depend on reaches the disk first.</summary>
    private void BeforeWriteBack()
    {
        if (DependsOn is { } first) first.Flush();
        if (DependsOnFlush) _file.Flush();
    }

    private void WriteBack(Table t)
    {
        if (!t.Dirty) return;   // a dependency's flush may have written it already
        _file.Write(t.Data, t.Offset, _kind);
        t.Dirty = false;
        _dirtyCount--;
    }
}
