namespace Vmsnap.Qcow2;

/// <summary>An L1 table in memory: the active one (growable, written back) or a snapshot's (read-only).</summary>
internal sealed class L1Table
{
    private int _dirtyFirst = int.MaxValue, _dirtyLast = -1;

    internal L1Table(long offset, ulong[] entries, bool isActive)
    {
        Offset = offset;
        Entries = entries;
        IsActive = isActive;
    }

    internal long Offset { get; private set; }
    internal ulong[] Entries { get; private set; }
    internal bool IsActive { get; }
    internal int Size => Entries.Length;
    internal bool IsDirty => _dirtyLast >= 0;

    internal ulong this[long index] => index < Entries.Length ? Entries[index] : 0;

    internal void Set(long index, ulong entry)
    {
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

    internal void Replace(long offset, ulong[] entries)
    {
        Offset = offset;
        Entries = entries;
        _dirtyFirst = int.MaxValue;
        _dirtyLast = -1;
    }
}
