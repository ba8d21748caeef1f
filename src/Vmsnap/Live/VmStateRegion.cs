using Vmsnap.Qcow2;
using Vmsnap.Storage;
using Vmsnap.VmState;

namespace Vmsnap.Live;

/// <summary>
/// Where a live save writes the VM state while QEMU still owns the image: a region of the image FILE
/// that starts far past anything QEMU can allocate before it releases the image, written through an
/// unlocked descriptor (QEMU's locks stay as they are) and linked into the image as its VM-state
/// area once QEMU has released it.
/// </summary>
/// <remarks>
/// <para>Why QEMU cannot touch these bytes (docs/live.md has the long form). QEMU's qcow2 driver
/// writes only clusters it allocated, and it allocates first-fit: it scans its refcounts upwards from
/// the lowest cluster that may be free for the first run of free clusters long enough
/// (block/qcow2-refcount.c, alloc_clusters_noref); the file's length plays no part. The one
/// allocation placed otherwise, a grown refcount table, goes to the first refcount-block boundary
/// above the cluster being allocated. And until it releases the image QEMU allocates at most: one
/// new data cluster per guest cluster (a write to an unallocated or shared cluster allocates once;
/// then the cluster is written in place), the L2 tables that map them, refcount blocks for all of
/// it, a refcount table move with its alignment, and the persistent dirty bitmaps it stores on
/// release. So its highest cluster can pass its current end only by that bound less the free runs
/// below the end that it fills first; the region starts past that, plus a margin
/// (<see cref="RegionPlan.For"/>).</para>
/// <para>What is checked at run time, because the bound assumes what QEMU does: during the save,
/// QEMU's own count of the highest offset it wrote to the file (query-blockstats
/// wr_highest_offset) is polled, and the save stops when it comes within <see cref="RegionPlan.Guard"/>
/// of the region; after QEMU released the image, that count must still be below the region, every
/// cluster from a little below the region to the end of the file must have refcount 0, the file must
/// still hold every byte written, and the image's size and snapshot table must be as they were.
/// Anything else refuses the save (no snapshot) with the reason.</para>
/// </remarks>
internal sealed class VmStateRegion : VmStateBackend
{
    /// <summary>Space left between the bound and the region, and the distance at which the watch stops the save.</summary>
    internal const long Margin = 64L << 20;
    internal const long WatchGuard = 32L << 20;
    private const long PreallocateAhead = 64L << 20;

    /// <summary>Every this many bytes a background fdatasync starts, so that the sync the link needs while the guest is stopped has little left to do.</summary>
    private const long SyncBehind = 128L << 20;

    private readonly FileBlockDevice _file;
    private readonly object _lock = new();
    private long _preallocatedEnd;
    private bool _preallocateUnsupported;
    private long _highest;
    private long _nextSync = SyncBehind;
    private Task? _sync;

    private VmStateRegion(FileBlockDevice file, RegionPlan plan)
    {
        _file = file;
        Plan = plan;
        _preallocatedEnd = plan.Offset;
    }

    /// <summary>Where the region is and why.</summary>
    internal RegionPlan Plan { get; }

    /// <summary>File offset of the VM state's first byte.</summary>
    internal long Offset => Plan.Offset;

    /// <summary>One past the highest stream byte written so far.</summary>
    internal long Written
    {
        get
        {
            lock (_lock) return _highest;
        }
    }

    /// <summary>
    /// Opens the image file for writing the region, without taking or checking locks (QEMU holds the
    /// image; vmsnap writes only bytes past everything QEMU can reach). O_DIRECT where the file system
    /// allows it.
    /// </summary>
    internal static VmStateRegion Open(string imagePath, RegionPlan plan, bool direct)
    {
        var options = new FileBlockDeviceOptions { Writable = true, Direct = direct, Lock = ImageLockMode.None };
        FileBlockDevice file;
        try
        {
            file = FileBlockDevice.Open(imagePath, options);
        }
        catch (StorageException e) when (direct && e.ErrorCode == NativeFile.EINVAL)
        {
            file = FileBlockDevice.Open(imagePath, options with { Direct = false });   // tmpfs: no O_DIRECT
        }
        return new VmStateRegion(file, plan);
    }

    /// <summary>The image file's current length.</summary>
    internal long FileLength => _file.Length;

    public override bool PrefersBufferedMode => true;

    public override int Alignment => Math.Max(4096, _file.Alignment);

    public override bool IsPositional => true;

    public override void WriteVectored(ReadOnlySpan<ReadOnlyMemory<byte>> segments, long position)
    {
        foreach (ReadOnlyMemory<byte> s in segments)
        {
            Prepare(position, s.Length);
            _file.Write(s.Span, Offset + position);
            position += s.Length;
        }
    }

    public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, long position, CancellationToken cancellationToken = default)
    {
        Prepare(position, buffer.Length);
        return _file.WriteAsync(buffer, Offset + position, cancellationToken);
    }

    public override int Read(Span<byte> buffer, long position) => _file.Read(buffer, Offset + position);

    public override void Flush() => _file.Flush();

    /// <summary>
    /// Gives the next stretch of the region disk blocks before it is written: O_DIRECT writes that
    /// extend a file or fill holes are serialized by ext4, writes into allocated blocks run in
    /// parallel. A full disk shows up here, before any byte of the stretch is written.
    /// </summary>
    private void Prepare(long position, int length)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(position);
        long end = Offset + position + length;
        lock (_lock)
        {
            _highest = Math.Max(_highest, position + length);
            if (_highest >= _nextSync && (_sync is null || _sync.IsCompleted))
            {
                // Writes before this point have been handed out; most are done. A failed background
                // sync is reported by the next one, or by the flush of the link.
                _nextSync = _highest + SyncBehind;
                _sync = Task.Run(() => { try { _file.Flush(); } catch (StorageException) { } });
            }
            if (_preallocateUnsupported || end <= _preallocatedEnd) return;
            long from = _preallocatedEnd;
            long to = Math.Max(end, from + PreallocateAhead);
            if (!_file.Preallocate(from, to - from)) _preallocateUnsupported = true;
            _preallocatedEnd = to;
        }
    }

    /// <summary>
    /// Sets the file's length to cover the whole last cluster of the VM state (preallocated space past
    /// it is given back). Not synced here: linking the region flushes the file (refcounts first) before
    /// any table points at it.
    /// </summary>
    internal void Finish(long vmStateBytes, int clusterSize)
    {
        WaitForSync();
        long end = Offset + (vmStateBytes + clusterSize - 1) / clusterSize * clusterSize;
        _file.SetLength(end);
    }

    private void WaitForSync()
    {
        Task? sync;
        lock (_lock) sync = _sync;
        sync?.Wait();
    }

    /// <summary>Cuts the file back to <paramref name="length"/> bytes (the region was never linked and QEMU's writes are known to be far below that).</summary>
    internal void GiveBack(long length)
    {
        if (_file.Length > length) _file.SetLength(length);
    }

    protected override void Dispose(bool disposing)
    {
        if (!disposing) return;
        WaitForSync();
        _file.Dispose();
    }
}

/// <summary>
/// Where the region goes. <see cref="Base"/> is the larger of QEMU's highest write and the image's used
/// end when the save starts; <see cref="Bound"/> is how much QEMU may allocate until it releases the
/// image; <see cref="Offset"/> is the region's start (aligned to 1 MiB and to a cluster); <see cref="Guard"/>
/// is how close QEMU's writes may come to it before the save stops.
/// </summary>
/// <remarks>
/// QEMU allocates first-fit: from the lowest cluster that may be free, upwards, the first run of free
/// clusters long enough for the request. So what it allocates during the save fills the free space
/// below <see cref="Base"/> first (gaps left by earlier saves, freed clusters) and only then grows past
/// it. The region therefore starts past <see cref="Base"/> by the bound, less the free space below
/// Base that QEMU will surely take first: runs of at least <see cref="RunMinimum"/>, each counted
/// without its last <see cref="RunSlack"/> (a request that does not fit in what is left of a run goes
/// on to the next one). Smaller holes are not counted. After the first live save of an image, the gap
/// below its VM state is such a run, so the next save's VM state can follow right after.
/// </remarks>
internal sealed record RegionPlan(long Base, long Bound, long Offset, long Guard)
{
    /// <summary>Free runs shorter than this are not counted as room for QEMU.</summary>
    internal const long RunMinimum = 128L << 20;

    /// <summary>The part of each counted run that may go unused: more than any one QEMU allocation.</summary>
    internal const long RunSlack = 64L << 20;

    /// <summary>Distance kept between QEMU's highest write and the region in any case.</summary>
    internal const long MinimumGap = 2 * VmStateRegion.WatchGuard;

    /// <summary>
    /// Plans the region for <paramref name="image"/> (geometry), whose used space ends at
    /// <paramref name="usedEnd"/> with <paramref name="freeRuns"/> below it, QEMU having written up to
    /// <paramref name="highestWrite"/>; <paramref name="refcountReach"/> is what its refcount table covers.
    /// </summary>
    internal static RegionPlan For(Qcow2ImageInfo image, long usedEnd, long refcountReach, long highestWrite,
        IReadOnlyList<LiveDirtyBitmap> bitmaps, IReadOnlyList<(long Offset, long Length)> freeRuns)
    {
        long cs = image.ClusterSize;
        long Clusters(long bytes) => (bytes + cs - 1) / cs;
        long l2Entries = cs / (image.ExtendedL2 ? 16 : 8);
        long refblockEntries = cs * 8 / image.RefcountBits;
        long baseBytes = Math.Max(Math.Max(usedEnd, highestWrite), cs);

        long data = Clusters(image.VirtualSize);                     // one new cluster per guest cluster at most
        long l2 = (data + l2Entries - 1) / l2Entries + 1;            // the active L2 tables, each new or copied once
        long bitmapClusters = 0;                                      // stored when QEMU releases the image
        foreach (LiveDirtyBitmap b in bitmaps.Where(b => b.Persistent))
        {
            long bits = (image.VirtualSize + b.Granularity - 1) / b.Granularity;
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
        long gap = Math.Max(MinimumGap, bound + VmStateRegion.Margin - below);
        long align = Math.Max(cs, 1L << 20);
        long start = (baseBytes + gap + align - 1) / align * align;
        return new RegionPlan(baseBytes, bound, start, VmStateRegion.WatchGuard);
    }
    /// <summary>Bytes below the region that must be free when it is linked: room for the refcount blocks its clusters need.</summary>
    internal static long ReserveBelow(long vmStateBytes, int clusterSize, int refcountBits)
    {
        long rangeBytes = (long)clusterSize * clusterSize * 8 / refcountBits;
        return ((vmStateBytes + rangeBytes - 1) / rangeBytes + 4) * clusterSize;
    }
}
