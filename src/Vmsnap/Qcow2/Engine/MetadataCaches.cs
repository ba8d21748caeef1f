namespace Vmsnap.Qcow2;

/// <summary>
/// The two metadata caches together: everything cached made durable in crash-safe order, evictions
/// between operations, and, once a write was refused for overwriting metadata, everything cached
/// dropped unwritten (QEMU makes such an image unusable; what is on disk is then as after a crash).
/// </summary>
internal sealed class MetadataCaches(Qcow2File file, Qcow2Header header, L1Table activeL1, MetadataCache l2Tables, RefcountManager refcounts)
{
    private bool _dropped;

    /// <summary>Makes every completed change durable: owed decrements made, then refcounts, then L2 tables and the L1 table, with device flushes between (each cache writes what it depends on first).</summary>
    internal void FlushAll()
    {
        if (DropIfStopped()) return;
        refcounts.FreeOwed();
        refcounts.Blocks.Flush();
        l2Tables.Flush();
    }

    /// <summary>Evicts cached tables beyond their capacity (between operations, under the lock).</summary>
    internal void Trim()
    {
        if (DropIfStopped()) return;
        l2Tables.Trim();
        refcounts.Blocks.Trim();
    }

    /// <summary>After writing stopped: the tables in memory go back to what is on disk, once.</summary>
    private bool DropIfStopped()
    {
        if (!file.Stopped) return false;
        if (_dropped) return true;
        _dropped = true;
        l2Tables.Clear();
        refcounts.Reload(RefcountTable.Read(file.Device, header));
        activeL1.Replace((long)header.L1TableOffset, L1Table.Read(file.Device, (long)header.L1TableOffset, (int)header.L1Size));
        return true;
    }
}
