namespace Vmsnap.Qcow2.LowLevel;

/// <summary>
/// Where a detached VM-state area goes: an area of the image FILE written while another program (a
/// running QEMU) still owns the image, past anything that program can allocate before it releases the
/// image. <see cref="Base"/> is the larger of its highest write and the image's used end when the
/// writing starts; <see cref="Bound"/> is how much it may allocate until it releases the image;
/// <see cref="Offset"/> is the area's start (aligned to 1 MiB and to a cluster); <see cref="Guard"/> is
/// how close its writes may come to the area before the writing stops.
/// </summary>
/// <remarks>
/// <para>The bound follows QEMU's qcow2 driver (docs/live.md has the long form). It writes only clusters
/// it allocated, and it allocates first-fit: from the lowest cluster that may be free, upwards, the
/// first run of free clusters long enough (block/qcow2-refcount.c, alloc_clusters_noref); the file's
/// length plays no part. The one allocation placed otherwise, a grown refcount table, goes to the first
/// refcount-block boundary above the cluster being allocated. Until it releases the image it allocates
/// at most one new data cluster per guest cluster, the L2 tables that map them, refcount blocks for all
/// of it, a refcount table move with its alignment, and the persistent dirty bitmaps it stores on
/// release.</para>
/// <para>What it allocates fills the free space below <see cref="Base"/> first (gaps left by earlier
/// saves, freed clusters) and only then grows past it. The area therefore starts past <see cref="Base"/>
/// by the bound plus <see cref="Margin"/>, less the free space below Base that QEMU will surely take
/// first: runs of at least <see cref="RunMinimum"/>, each counted without its last <see cref="RunSlack"/>
/// (a request that does not fit in what is left of a run goes on to the next one). Smaller holes are not
/// counted. After the first live save of an image, the gap below its VM state is such a run, so the next
/// save's VM state can follow right after.</para>
/// </remarks>
public sealed record DetachedVmStatePlan(long Base, long Bound, long Offset, long Guard)
{
    /// <summary>Space left between the bound and the area.</summary>
    internal const long Margin = 64L << 20;

    /// <summary>The distance from the area at which the other program's writes stop the writing (<see cref="Guard"/>).</summary>
    internal const long WatchGuard = 32L << 20;

    /// <summary>Free runs shorter than this are not counted as room for QEMU.</summary>
    internal const long RunMinimum = 128L << 20;

    /// <summary>The part of each counted run that may go unused: more than any one QEMU allocation.</summary>
    internal const long RunSlack = 64L << 20;

    /// <summary>Distance kept between QEMU's highest write and the area in any case.</summary>
    internal const long MinimumGap = 2 * WatchGuard;

    /// <summary>Plans the area for the image <paramref name="survey"/> describes, QEMU having written up to <paramref name="highestWrite"/>.</summary>
    /// <param name="survey">The image's geometry and used space (<see cref="DetachedVmStateArea.Survey"/>).</param>
    /// <param name="highestWrite">The highest file offset QEMU has written.</param>
    /// <param name="dirtyBitmaps">QEMU's dirty bitmaps on the drive; the persistent ones are stored into the image when QEMU releases it.</param>
    public static DetachedVmStatePlan For(DetachedVmStateSurvey survey, long highestWrite, IEnumerable<(long Granularity, bool Persistent)> dirtyBitmaps) =>
        For(survey.Image, survey.UsedEnd, survey.RefcountReach, highestWrite, dirtyBitmaps, survey.FreeRuns);

    /// <summary>
    /// Plans the area for <paramref name="image"/> (geometry), whose used space ends at
    /// <paramref name="usedEnd"/> with <paramref name="freeRuns"/> below it, QEMU having written up to
    /// <paramref name="highestWrite"/>; <paramref name="refcountReach"/> is what its refcount table covers.
    /// </summary>
    internal static DetachedVmStatePlan For(Qcow2ImageInfo image, long usedEnd, long refcountReach, long highestWrite,
        IEnumerable<(long Granularity, bool Persistent)> dirtyBitmaps, IReadOnlyList<(long Offset, long Length)> freeRuns)
    {
        long cs = image.ClusterSize;
        long Clusters(long bytes) => (bytes + cs - 1) / cs;
        long l2Entries = cs / (image.ExtendedL2 ? 16 : 8);
        long refblockEntries = cs * 8 / image.RefcountBits;
        long baseBytes = Math.Max(Math.Max(usedEnd, highestWrite), cs);

        long data = Clusters(image.VirtualSize);                     // one new cluster per guest cluster at most
        long l2 = (data + l2Entries - 1) / l2Entries + 1;            // the active L2 tables, each new or copied once
        long bitmapClusters = 0;                                      // stored when QEMU releases the image
        foreach ((long granularity, _) in dirtyBitmaps.Where(b => b.Persistent))
        {
            long bits = (image.VirtualSize + granularity - 1) / granularity;
            long dataClusters = Clusters((bits + 7) / 8);
            bitmapClusters += dataClusters + Clusters(dataClusters * 8) + 1;
        }
        if (bitmapClusters > 0) bitmapClusters += 2;                  // the bitmap directory and its extension
        long total = Clusters(baseBytes) + data + l2 + bitmapClusters;
        long refblocks = (total + refblockEntries - 1) / refblockEntries + 2;
        long tableGrowth = 0;
        if ((total + refblocks) * cs > refcountReach)
        {
            // A new refcount table and its blocks, placed at the next refcount-block boundary above QEMU's end.
            long entries = (total + refblocks + refblockEntries - 1) / refblockEntries * 3 / 2 + 1;
            long tableClusters = Clusters(entries * 8);
            tableGrowth = refblockEntries + tableClusters + (tableClusters + refblockEntries - 1) / refblockEntries + 2;
        }
        long bound = (data + l2 + bitmapClusters + refblocks + tableGrowth) * cs;

        long below = 0;
        foreach ((long offset, long length) in freeRuns)
            if (offset + length <= baseBytes && length >= RunMinimum) below += length - RunSlack;
        long gap = Math.Max(MinimumGap, bound + Margin - below);
        long align = Math.Max(cs, 1L << 20);
        long start = (baseBytes + gap + align - 1) / align * align;
        return new DetachedVmStatePlan(baseBytes, bound, start, WatchGuard);
    }

    /// <summary>Bytes below the area that must be free when it is attached: room for the refcount blocks its clusters need.</summary>
    internal static long ReserveBelow(long vmStateBytes, int clusterSize, int refcountBits)
    {
        long rangeBytes = (long)clusterSize * clusterSize * 8 / refcountBits;
        return ((vmStateBytes + rangeBytes - 1) / rangeBytes + 4) * clusterSize;
    }
}

/// <summary>What planning a detached VM-state area needs to know of the image: its geometry, where its used space ends, the large free runs below that end, and how far its refcount table reaches.</summary>
public sealed record DetachedVmStateSurvey(Qcow2ImageInfo Image, long UsedEnd, long RefcountReach, IReadOnlyList<(long Offset, long Length)> FreeRuns);
