using Vmsnap.Storage;
using Vmsnap.Storage.LowLevel;

namespace Vmsnap.Qcow2.LowLevel;

/// <summary>
/// The VM-state area of a qcow2 image as a block device: offset 0 is the first byte of the VM
/// state, which qcow2 keeps in the image's guest address space right after the virtual disk.
/// Opened for writing (<see cref="Qcow2Image.OpenVmStateAreaForWriting"/>) it is what a save writes the
/// migration stream into before <see cref="Qcow2Image.CreateSnapshot"/> takes it over, kept apart
/// from the image's metadata until then; opened for reading
/// (<see cref="Qcow2Image.OpenVmStateAreaForReading(Qcow2Snapshot)"/>) it maps through a snapshot's L1
/// table and is exactly the snapshot's VM-state size long.
/// </summary>
/// <remarks>
/// Writing: positional, several writes may be in flight on disjoint ranges. Host clusters come from
/// large contiguous runs reserved in memory at the free tail of the image; data goes straight to
/// the image file (with O_DIRECT when the image was opened with <see cref="Qcow2OpenOptions.Direct"/>
/// and the request is aligned). No metadata is written until the snapshot create, which counts and
/// links it all in its one header switch: <see cref="Flush"/> makes the data durable and zeroes what
/// was mapped but never written; <see cref="Discard"/> of the whole area, or closing it without a
/// snapshot, gives everything back and the file ends where it did (a failed or killed save leaves
/// the image as it was, at most with bytes past its last cluster in use).
/// Reading: large aligned reads go to the file as large (direct) reads; unallocated ranges read as zero.
/// </remarks>
public sealed class Qcow2VmStateArea : IBlockDevice
{
    private readonly Qcow2Engine _engine;
    private readonly VmStateAllocation? _allocation;
    private readonly L1Table? _snapshotL1;
    private readonly long _start;
    private readonly long _readLength;
    private bool _disposed;

    private Qcow2VmStateArea(Qcow2Engine engine, VmStateAllocation? allocation, L1Table? snapshotL1, long start, long readLength, Qcow2Snapshot? snapshot)
    {
        _engine = engine;
        _allocation = allocation;
        _snapshotL1 = snapshotL1;
        _start = start;
        _readLength = readLength;
        Snapshot = snapshot;
    }

    internal static Qcow2VmStateArea ForWriting(Qcow2Engine engine, VmStateAllocation allocation) =>
        new(engine, allocation, null, allocation.Start, 0, null);

    internal static Qcow2VmStateArea ForReading(Qcow2Engine engine, L1Table l1, long start, Qcow2Snapshot snapshot, long? readLength = null) =>
        new(engine, null, l1, start, readLength ?? snapshot.VmStateSize, snapshot);

    /// <summary>The snapshot whose VM state this reads, or null for the area open for writing.</summary>
    public Qcow2Snapshot? Snapshot { get; }

    /// <summary>Guest offset of the area's first byte in the image (after the virtual disk).</summary>
    public long GuestOffset => _start;

    /// <summary>Reading: the snapshot's VM-state size (or the whole area, when opened so). Writing: one past the highest byte written so far (or the length set).</summary>
    public long Length
    {
        get
        {
            if (_allocation is null) return _readLength;
            lock (_engine.SyncRoot) return _allocation.Length;
        }
    }

    /// <inheritdoc/>
    public bool IsReadOnly => _allocation is null;

    /// <inheritdoc/>
    public int Alignment => _engine.State.Device.Alignment;

    private void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(_disposed, this);

    private VmStateAllocation Allocation()
    {
        ThrowIfDisposed();
        if (_allocation is null) throw new StorageException($"the VM state of snapshot {Snapshot!.Id} ('{Snapshot.Name}') in '{_engine.State.Path}' is open for reading only");
        if (_allocation.CapturedBy is { } snapshot)
            throw new OperationRefusedException($"the VM-state area of '{_engine.State.Path}' was taken over by snapshot '{snapshot}'; open a new one to write more");
        return _allocation;
    }

    /// <inheritdoc/>
    public int Read(Span<byte> buffer, long offset)
    {
        ThrowIfDisposed();
        ArgumentOutOfRangeException.ThrowIfNegative(offset);
        long length = Length;
        if (offset >= length) return 0;
        int n = (int)Math.Min(buffer.Length, length - offset);
        try
        {
            if (_allocation is not null) _engine.ReadVmState(_allocation, buffer[..n], offset);
            else _engine.ReadGuest(buffer[..n], _start + offset, _snapshotL1);
        }
        catch (Exception e) when (_engine.NoteFailure(e))
        {
            throw;
        }
        return n;
    }

    /// <inheritdoc/>
    public ValueTask<int> ReadAsync(Memory<byte> buffer, long offset, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        return BlockingIo.Run(() => Read(buffer.Span, offset));
    }

    /// <inheritdoc/>
    public void Write(ReadOnlySpan<byte> buffer, long offset)
    {
        if (buffer.IsEmpty) return;
        VmStateAllocation allocation = Allocation();
        List<(long Host, int DataOffset, int Length)> segments = Map(allocation, offset, buffer.Length);
        try
        {
            foreach ((long host, int at, int n) in segments) _engine.State.Device.Write(buffer.Slice(at, n), host);
        }
        catch (Exception e) when (_engine.NoteFailure(e))
        {
            throw;
        }
        finally
        {
            allocation.EndWrite();
        }
    }

    /// <inheritdoc/>
    public async ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, long offset, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        if (buffer.IsEmpty) return;
        VmStateAllocation allocation = Allocation();
        List<(long Host, int DataOffset, int Length)> segments = Map(allocation, offset, buffer.Length);
        // The write ends (for Flush, Discard and snapshot operations waiting on it) only when every
        // segment issued has completed, also when issuing a later one throws.
        var issued = new List<Task>(segments.Count);
        try
        {
            foreach ((long host, int at, int n) in segments)
                issued.Add(_engine.State.Device.WriteAsync(buffer.Slice(at, n), host, cancellationToken).AsTask());
        }
        catch (Exception e)
        {
            _engine.NoteFailure(e);
            await WhenAllQuietly(issued).ConfigureAwait(false);
            allocation.EndWrite();
            throw;
        }
        try
        {
            await (issued.Count == 1 ? issued[0] : Task.WhenAll(issued)).ConfigureAwait(false);
        }
        catch (Exception e) when (_engine.NoteFailure(e))
        {
            throw;
        }
        finally
        {
            allocation.EndWrite();
        }
    }

    private static async Task WhenAllQuietly(List<Task> tasks)
    {
        foreach (Task t in tasks)
        {
            try
            {
                await t.ConfigureAwait(false);
            }
            catch (Exception)
            {
                // The error that stopped the issuing is the one reported.
            }
        }
    }

    private List<(long Host, int DataOffset, int Length)> Map(VmStateAllocation allocation, long offset, int length)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(offset);
        if (offset > ClusterGeometry.MaxGuestOffset - _start - length)
            throw new ArgumentOutOfRangeException(nameof(offset), offset, "VM-state offset out of range");
        lock (_engine.SyncRoot)
        {
            _engine.ThrowIfDisposed();
            if (allocation.CapturedBy is not null) Allocation();   // throws
            List<(long Host, int DataOffset, int Length)> segments;
            try
            {
                segments = _engine.MapVmState(allocation, offset, length);
            }
            catch (Exception e) when (_engine.NoteFailure(e))
            {
                throw;
            }
            allocation.BeginWrite();   // under the lock: a snapshot operation waits for it
            return segments;
        }
    }

    /// <summary>Makes every completed write durable: zeroes never-written parts of mapped clusters, returns unused reserved clusters, writes metadata in crash-safe order, flushes the file. A no-op for reading.</summary>
    public void Flush()
    {
        ThrowIfDisposed();
        if (_allocation is null || _allocation.CapturedBy is not null) return;
        try
        {
            _engine.FlushVmState(_allocation);
        }
        catch (Exception e) when (_engine.NoteFailure(e))
        {
            throw;
        }
    }

    /// <summary>
    /// Writing only: a length below the current one discards what lies past it (whole clusters);
    /// a larger one extends the area (the new part reads as zero).
    /// </summary>
    public void SetLength(long length)
    {
        VmStateAllocation allocation = Allocation();
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        long current = Length;
        if (length < current) Discard(length, current - length);
        lock (_engine.SyncRoot) allocation.Length = length;
    }

    /// <summary>
    /// Writing only: frees the clusters wholly inside the range (a range reaching the end of what was
    /// written frees the last cluster too) and makes that durable. <c>Discard(0, Length)</c> frees
    /// everything the area allocated: the failure path of a save. Waits for writes in flight.
    /// </summary>
    public void Discard(long offset, long length)
    {
        VmStateAllocation allocation = Allocation();
        ArgumentOutOfRangeException.ThrowIfNegative(offset);
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        if (length == 0) return;
        try
        {
            _engine.DiscardVmState(allocation, offset, length);
        }
        catch (Exception e) when (_engine.NoteFailure(e))
        {
            throw;
        }
    }

    /// <summary>
    /// Closes the area. Writing: unless a snapshot took it over, everything written is given back
    /// (nothing refers to it) and the file is trimmed to its last cluster in use.
    /// </summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        if (_allocation is not null) _engine.CloseVmStateWriter(_allocation);
        else _engine.CloseVmStateReader(_snapshotL1!.Offset);
    }
}
