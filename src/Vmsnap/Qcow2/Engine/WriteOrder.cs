namespace Vmsnap.Qcow2;

/// <summary>
/// Keeps metadata writes in crash-safe order. Two sides: refcounts (refcount blocks and table) and
/// mapping (L2 tables, L1 table, header). A new reference needs its refcount increment on disk
/// first; a dropped reference must be on disk before the refcount decrement. Dirty refcount blocks
/// therefore hold either pending increments or pending decrements, never both: before switching
/// direction the other side is flushed. A crash can then leak clusters but never leave a referenced
/// cluster counted free.
/// </summary>
internal sealed class WriteOrder
{
    /// <summary>Pending refcount increments that L2/L1 entries in memory rely on.</summary>
    internal bool MappingDependsOnRefcounts { get; set; }

    /// <summary>Pending refcount decrements whose references were dropped only in memory.</summary>
    internal bool RefcountsDependOnMapping { get; set; }

    /// <summary>
    /// L2 entries in memory point to clusters whose data holds bytes the guest did not write in that
    /// request (a copy-on-write merge, a zero or backing fill): the data must be flushed before any
    /// L2 table is written back (QEMU's L2 cache depends on a flush after a COW the same way).
    /// </summary>
    internal bool MappingDependsOnData { get; set; }

    /// <summary>Writes dirty refcount blocks and table entries and flushes the device.</summary>
    internal Action FlushRefcountSide { get; set; } = () => { };

    /// <summary>Writes dirty L2 tables, the L1 table and flushes the device.</summary>
    internal Action FlushMappingSide { get; set; } = () => { };

    /// <summary>Call before raising a refcount that a new reference will rely on.</summary>
    internal void BeforeIncrement()
    {
        if (RefcountsDependOnMapping) FlushMappingSide();
        MappingDependsOnRefcounts = true;
    }

    /// <summary>Call before lowering a refcount after dropping a reference in memory.</summary>
    internal void BeforeDecrement()
    {
        if (MappingDependsOnRefcounts) FlushRefcountSide();
        RefcountsDependOnMapping = true;
    }
}
