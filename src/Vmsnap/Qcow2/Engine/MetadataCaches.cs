namespace Vmsnap.Qcow2;

/// <summary>The two metadata caches together: everything cached made durable in crash-safe order, and evictions between operations.</summary>
internal sealed class MetadataCaches(RefcountManager refcounts, MetadataCache l2Tables)
{
    /// <summary>Makes every completed change durable: owed decrements made, then refcounts, then L2 tables and the L1 table, with device flushes between (each cache writes what it depends on first).</summary>
    internal void FlushAll()
    {
        refcounts.FreeOwed();
        refcounts.Blocks.Flush();
        l2Tables.Flush();
    }

    /// <summary>Evicts cached tables beyond their capacity (between operations, under the lock).</summary>
    internal void Trim()
    {
        l2Tables.Trim();
        refcounts.Blocks.Trim();
    }
}
