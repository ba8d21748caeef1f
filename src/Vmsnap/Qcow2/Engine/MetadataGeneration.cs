namespace Vmsnap.Qcow2;

/// <summary>
/// A new generation of an image's metadata, built beside the current one and made current by one
/// header write. Snapshot create, delete and apply change refcounts, COPIED flags and tables that
/// live in different clusters; no order of in-place writes keeps all of them consistent at every
/// instant (a refcount going from 1 to 2 and the COPIED flag of the entry that references the
/// cluster cannot change together). So nothing the current header reaches is overwritten: changed
/// refcount blocks, the refcount table, a new active L1 table, copied L2 tables and the snapshot
/// table go to clusters that are free in the current generation, and one write of header bytes
/// 36..71 (l1_size, l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots,
/// snapshots_offset: one sector) switches to all of them at once. A crash before that write leaves
/// the old generation whole (the new clusters are free in it); after it, the new one.
/// </summary>
/// <remarks>
/// Refcounts count references per path, as QEMU does: a data cluster is counted once for every L1
/// entry (of the active and of each snapshot L1 table) that reaches an L2 table referencing it.
/// Writes here may also go to clusters the current generation uses only in ways the image check
/// ignores (COPIED flags of snapshot L2 tables that are not active), queued with
/// <see cref="RewriteInactiveL2"/>. The engine's lock is held and its caches are clean (flushed) throughout.
/// </remarks>
internal sealed class MetadataGeneration
{
    /// <summary>Offset of the header bytes switched in one write.</summary>
    internal const int SwitchOffset = Qcow2Header.L1SizeOffset;

    /// <summary>Length of the header bytes switched in one write (36..71).</summary>
    internal const int SwitchLength = Qcow2Header.SnapshotFieldsOffset + 12 - Qcow2Header.L1SizeOffset;

    private readonly Qcow2File _file;
    private readonly List<(long Offset, byte[] Data, Qcow2Metadata Own)> _writes = [];

    /// <summary>A new generation of the engine's current metadata.</summary>
    /// <param name="file">The image file the generation is written to.</param>
    /// <param name="refcounts">The live refcounts (the engine's lock held, its caches clean).</param>
    /// <param name="excluded">Clusters this generation must not allocate (another generation's, built alongside).</param>
    internal MetadataGeneration(Qcow2File file, RefcountManager refcounts, Func<long, bool>? excluded = null)
    {
        _file = file;
        Refcounts = refcounts.BeginGeneration(excluded);
    }

    /// <summary>The new generation's refcounts, kept by the refcount owner (<see cref="RefcountManager"/>).</summary>
    internal RefcountManager.Generation Refcounts { get; }

    /// <summary>True when this generation allocated the cluster (for a generation built alongside, which must avoid it).</summary>
    internal bool AllocatedHere(long cluster) => Refcounts.AllocatedHere(cluster);

    /// <summary>The refcount of a cluster in the new generation.</summary>
    internal ulong Get(long cluster) => Refcounts.Get(cluster);

    /// <summary>Adds <paramref name="delta"/> to the refcount of every cluster touched by [offset, offset + length).</summary>
    internal void AddRange(long offset, long length, long delta) => Refcounts.AddRange(offset, length, delta);

    /// <summary>Adds <paramref name="delta"/> to one cluster's refcount in the new generation.</summary>
    internal void Add(long cluster, long delta) => Refcounts.Add(cluster, delta);

    /// <summary>
    /// Allocates <paramref name="count"/> contiguous clusters that are free in both generations
    /// (refcount 1 in the new one); returns the first cluster's offset.
    /// </summary>
    internal long Allocate(long count) => Refcounts.Allocate(count);

    /// <summary>Queues a write done before the switch: a new table in clusters allocated here.</summary>
    internal void Write(long offset, byte[] data) => _writes.Add((offset, data, Qcow2Metadata.None));

    /// <summary>Queues a rewrite of a snapshot's L2 table that the current generation does not use as active (its COPIED flags).</summary>
    internal void RewriteInactiveL2(long offset, byte[] data) => _writes.Add((offset, data, Qcow2Metadata.InactiveL2));

    /// <summary>
    /// Moves every changed refcount block to a fresh cluster and places the new refcount table:
    /// after this nothing more is allocated or counted, and nothing of the live state is consulted
    /// again (a generation built alongside may be switched to first). Sets the refcount table fields
    /// of <paramref name="header"/> (a copy of the header that the caller switches to).
    /// </summary>
    internal void Prepare(Qcow2Header header) => Refcounts.Prepare(header);

    /// <summary>
    /// Writes the refcount blocks, the refcount table and the queued tables, then flushes:
    /// everything the header switch will point to is durable. Nothing the live generation uses is
    /// changed. Call after <see cref="Prepare"/>.
    /// </summary>
    internal void WriteOut()
    {
        Refcounts.WriteOut();
        foreach ((long offset, byte[] data, Qcow2Metadata own) in _writes) _file.Write(data, offset, own);
        _file.Flush();
    }

    /// <summary>The 36 header bytes at <see cref="SwitchOffset"/> for <paramref name="h"/>'s L1, refcount table and snapshot table fields.</summary>
    internal static byte[] SwitchBytes(Qcow2Header h)
    {
        byte[] b = new byte[SwitchLength];
        h.EncodeL1Fields().CopyTo(b, 0);
        h.EncodeRefcountTableFields().CopyTo(b, Qcow2Header.RefcountTableFieldsOffset - SwitchOffset);
        h.EncodeSnapshotFields().CopyTo(b, Qcow2Header.SnapshotFieldsOffset - SwitchOffset);
        return b;
    }
}
