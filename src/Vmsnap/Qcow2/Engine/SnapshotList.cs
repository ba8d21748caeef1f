namespace Vmsnap.Qcow2;

/// <summary>The image's snapshot table as the engine knows it: the entries and the table's size on disk (header's snapshots_offset is where it lies).</summary>
internal sealed class SnapshotList
{
    internal List<SnapshotEntry> Entries { get; private set; } = [];

    /// <summary>Bytes the table takes on disk (QEMU's snapshots_size).</summary>
    internal long TableBytes { get; private set; }

    internal int Count => Entries.Count;

    internal SnapshotEntry this[int index] => Entries[index];

    /// <summary>Changes whenever the entries are replaced (for what is derived from them).</summary>
    internal long Version { get; private set; }

    /// <summary>Replaces the list after the snapshot table was read or rewritten on disk.</summary>
    internal void Set(List<SnapshotEntry> entries, long tableBytes)
    {
        Entries = entries;
        TableBytes = tableBytes;
        Version++;
    }
}
