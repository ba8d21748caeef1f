using Vmsnap.Storage;
using Vmsnap.Storage.LowLevel;

namespace Vmsnap.Qcow2.LowLevel;

/// <summary>
/// A VM-state area written into the image FILE while another program (a running QEMU, for a live save)
/// still owns the image, and attached to the image as a snapshot's VM state once that program released
/// it. This type owns the whole life of such an area: surveying the image to plan it
/// (<see cref="Survey"/>, <see cref="DetachedVmStatePlan"/>), writing it through an unlocked descriptor
/// (the owner's locks stay as they are; only bytes past everything it can reach are written),
/// checking that it is still unused (<see cref="Check(Qcow2Image, long, long)"/>), attaching it as the
/// VM-state area the next snapshot takes over (<see cref="Attach(Qcow2Image, long, long)"/>), and
/// discarding it (<see cref="Discard"/>, <see cref="GiveBack"/>). docs/live.md has the long form.
/// </summary>
/// <remarks>
/// Why the engine itself leaves the area's bytes alone while attaching them: attaching reserves their
/// clusters in memory, and the allocator skips reserved clusters; the refcount blocks the snapshot
/// create may need for the area's range come from free clusters below it (which the check required)
/// or past the end of the file, and the area's own L2 tables from a reservation past the area.
/// </remarks>
public sealed class DetachedVmStateArea : IDisposable
{
    /// <summary>Every this many bytes a background fdatasync starts, so that the sync that attaching needs (while the guest is stopped) has little left to do.</summary>
    private const long SyncBehind = 128L << 20;

    private readonly FileBlockDevice _file;
    private readonly object _lock = new();
    private readonly Preallocation _preallocation = new();
    private long _preallocatedEnd;
    private long _highest;
    private long _nextSync = SyncBehind;
    private Task? _sync;

    private DetachedVmStateArea(FileBlockDevice file, DetachedVmStatePlan plan)
    {
        _file = file;
        Plan = plan;
        _preallocatedEnd = plan.Offset;
    }

    // ---- planning ------------------------------------------------------------------------------

    /// <summary>What planning an area in <paramref name="image"/> needs: its geometry, used end, large free runs below that end, and its refcount table's reach.</summary>
    public static DetachedVmStateSurvey Survey(Qcow2Image image)
    {
        Qcow2ImageInfo info = image.Info;
        long usedEnd = image.Engine.UsedEnd();
        long reach = image.Engine.RefcountReach();
        return new DetachedVmStateSurvey(info, usedEnd, reach, image.Engine.FreeRuns(usedEnd, DetachedVmStatePlan.RunMinimum));
    }

    // ---- writing -------------------------------------------------------------------------------

    /// <summary>Where the area is and why.</summary>
    public DetachedVmStatePlan Plan { get; }

    /// <summary>File offset of the VM state's first byte.</summary>
    public long Offset => Plan.Offset;

    /// <summary>One past the highest VM-state byte written so far.</summary>
    public long Written
    {
        get
        {
            lock (_lock) return _highest;
        }
    }

    /// <summary>The image file's current length.</summary>
    public long FileLength => _file.Length;

    /// <summary>The alignment the area's buffers, positions and lengths keep for O_DIRECT.</summary>
    public int Alignment => Math.Max(4096, _file.Alignment);

    /// <summary>
    /// Opens the image file for writing the area, without taking or checking locks (the other program
    /// holds the image; only bytes past everything it can reach are written). O_DIRECT where the file
    /// system allows it.
    /// </summary>
    public static DetachedVmStateArea Open(string imagePath, DetachedVmStatePlan plan, bool direct)
    {
        var options = new FileBlockDeviceOptions { Writable = true, Direct = direct, Lock = ImageLockMode.None };
        FileBlockDevice file;
        try
        {
            file = FileBlockDevice.Open(imagePath, options);
        }
        catch (StorageException e) when (direct && e.IsInvalidArgument)
        {
            file = FileBlockDevice.Open(imagePath, options with { Direct = false });   // tmpfs: no O_DIRECT
        }
        return new DetachedVmStateArea(file, plan);
    }

    /// <summary>Writes VM-state bytes at <paramref name="position"/> of the VM state.</summary>
    public void Write(ReadOnlySpan<byte> buffer, long position)
    {
        Prepare(position, buffer.Length);
        _file.Write(buffer, Offset + position);
    }

    /// <summary>Writes VM-state bytes at <paramref name="position"/> of the VM state.</summary>
    public ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, long position, CancellationToken cancellationToken = default)
    {
        Prepare(position, buffer.Length);
        return _file.WriteAsync(buffer, Offset + position, cancellationToken);
    }

    /// <summary>Reads VM-state bytes from <paramref name="position"/> of the VM state.</summary>
    public int Read(Span<byte> buffer, long position) => _file.Read(buffer, Offset + position);

    /// <summary>Syncs the file.</summary>
    public void Flush() => _file.Flush();

    /// <summary>
    /// Gives the next stretch of the area disk blocks before it is written (<see cref="Preallocation"/>).
    /// A full disk shows up here, before any byte of the stretch is written.
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
                // sync is reported by the next one, or by the flush of the attach.
                _nextSync = _highest + SyncBehind;
                _sync = Task.Run(() => { try { _file.Flush(); } catch (StorageException) { } });
            }
            if (_preallocation.Unsupported || end <= _preallocatedEnd) return;
            long from = _preallocatedEnd;
            long to = Math.Max(end, from + Preallocation.AheadBytes);
            _preallocation.Allocate(_file, from, to);
            _preallocatedEnd = to;
        }
    }

    /// <summary>
    /// Sets the file's length to cover the whole last cluster of the VM state (preallocated space past
    /// it is given back). Not synced here: attaching the area flushes the file (refcounts first) before
    /// any table points at it.
    /// </summary>
    public void Finish(long vmStateBytes, int clusterSize)
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

    /// <summary>Cuts the file back to <paramref name="length"/> bytes (the area was never attached and the other program's writes are known to be far below that).</summary>
    public void GiveBack(long length)
    {
        if (_file.Length > length) _file.SetLength(length);
    }

    /// <summary>Waits for the background sync and closes the file.</summary>
    public void Dispose()
    {
        WaitForSync();
        _file.Dispose();
    }

    // ---- checking, attaching, discarding (the image open for writing, its other owner gone) -----

    /// <summary>
    /// Why the file area from <paramref name="offset"/> (<paramref name="length"/> bytes written there)
    /// cannot become <paramref name="image"/>'s VM-state area, or null: it must still be in the file, and
    /// nothing the image uses may lie there, after it, or in the bytes below it that attaching needs
    /// for refcount blocks (<see cref="DetachedVmStatePlan.ReserveBelow"/>).
    /// </summary>
    public static string? Check(Qcow2Image image, long offset, long length) => Check(image, offset, length, ReserveBelow(image, length));

    /// <summary>As <see cref="Check(Qcow2Image, long, long)"/>, with <paramref name="reserveBelow"/> bytes below the area required free.</summary>
    internal static string? Check(Qcow2Image image, long offset, long length, long reserveBelow) => image.Engine.CheckDetachedVmState(offset, length, reserveBelow);

    /// <summary>
    /// Makes the file area [<paramref name="offset"/>, + <paramref name="length"/>) <paramref name="image"/>'s
    /// VM-state area open for writing, so that <see cref="Qcow2Image.CreateSnapshot"/> with that VM-state
    /// size takes it over. Refuses (nothing changed) when <see cref="Check(Qcow2Image, long, long)"/> finds a problem.
    /// </summary>
    public static void Attach(Qcow2Image image, long offset, long length) => Attach(image, offset, length, ReserveBelow(image, length));

    /// <summary>As <see cref="Attach(Qcow2Image, long, long)"/>, with <paramref name="reserveBelow"/> bytes below the area required free.</summary>
    internal static void Attach(Qcow2Image image, long offset, long length, long reserveBelow) => image.Engine.AttachDetachedVmState(offset, length, reserveBelow);

    /// <summary>
    /// Gives back the space of a detached area no snapshot took over: drops it if it was attached, then
    /// shortens the file to its last used cluster.
    /// </summary>
    public static void Discard(Qcow2Image image) => image.Engine.DiscardDetachedVmState();

    private static long ReserveBelow(Qcow2Image image, long length)
    {
        ClusterGeometry g = image.Engine.State.Geometry;
        return DetachedVmStatePlan.ReserveBelow(length, g.ClusterSize, g.RefcountBits);
    }
}
