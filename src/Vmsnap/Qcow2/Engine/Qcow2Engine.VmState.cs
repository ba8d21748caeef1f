namespace Vmsnap.Qcow2;

/// <summary>The VM-state area: opening it for writing (kept apart until a snapshot takes it) or reading (a snapshot's L1), mapping, flush, discard.</summary>
internal sealed partial class Qcow2Engine
{
    /// <summary>
    /// Opens the VM-state area for writing. Nothing on disk changes until a snapshot takes it over:
    /// refusals that a snapshot create would make anyway come here, before a stream is written.
    /// </summary>
    internal Qcow2VmStateArea OpenVmStateForWriting() => RunExclusive(() =>
    {
        ThrowIfSwitchFailed();
        EnsureWritable();
        if (VmStateWriter is not null)
            throw new OperationRefusedException($"'{Path}' already has its VM-state area open for writing");
        ValidateSnapshotTable();
        if (Snapshots.Count >= SnapshotTable.MaxSnapshots)
            throw new OperationRefusedException($"'{Path}' already has {Snapshots.Count} snapshots, the most qcow2 allows");
        var writer = new VmStateAllocation(this);
        VmStateWriter = writer;
        return Qcow2VmStateArea.ForWriting(this, writer);
    });

    /// <summary>Opens a snapshot's VM state for reading.</summary>
    internal Qcow2VmStateArea OpenVmStateForReading(SnapshotEntry sn, Qcow2Snapshot snapshot, bool wholeArea = false)
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            ValidateSnapshotTable();
            L1Table l1 = ReadSnapshotL1(sn);
            ulong diskSize = sn.DiskSize ?? (ulong)VirtualSize;
            // A larger disk size would overflow the VM-state offset (found by fuzzing).
            if (diskSize > ClusterGeometry.MaxGuestOffset)
                throw Corrupt($"snapshot table entry {Snapshots.IndexOf(sn)}", sn.FileOffset >= 0 ? sn.FileOffset : null,
                    $"{Describe(sn)}: disk size {diskSize} is beyond what an image can map");
            long start = VmStateOffsetFor((long)diskSize);
            if (sn.VmStateSize > ClusterGeometry.MaxGuestOffset - start)
                throw Corrupt($"snapshot table entry {Snapshots.IndexOf(sn)}", sn.FileOffset >= 0 ? sn.FileOffset : null,
                    $"{Describe(sn)}: VM-state size {sn.VmStateSize} is beyond what an image can map");
            RegisterVmStateReader(l1.Offset, +1);
            return Qcow2VmStateArea.ForReading(this, l1, start, snapshot, wholeArea ? ClusterGeometry.MaxGuestOffset - start : null);
        }
    }

    internal void CloseVmStateReader(long l1Offset)
    {
        lock (_lock) RegisterVmStateReader(l1Offset, -1);
    }

    /// <summary>Maps a write of the area (taking reserved clusters); under the lock. No I/O but preallocation.</summary>
    internal List<(long Host, int DataOffset, int Length)> MapVmState(VmStateAllocation writer, long offset, int length)
    {
        ThrowIfSwitchFailed();
        EnsureWritable();
        if (!ReferenceEquals(VmStateWriter, writer)) throw new OperationRefusedException($"the VM-state area of '{Path}' is closed");
        return writer.Map(offset, length);
    }

    /// <summary>Reads the area being written: what was mapped from its clusters, the rest as zeroes.</summary>
    internal void ReadVmState(VmStateAllocation writer, Span<byte> buffer, long offset)
    {
        List<(long Host, int DataOffset, int Length)> segments;
        lock (_lock)
        {
            ThrowIfDisposed();
            segments = writer.MapForRead(offset, buffer.Length);
        }
        foreach ((long host, int at, int n) in segments)
        {
            Span<byte> part = buffer.Slice(at, n);
            if (host < 0)
            {
                part.Clear();
                continue;
            }
            int got = Device.Read(part, host);
            if (got < n) part[got..].Clear();
        }
    }

    // The methods below wait for the area's writes in flight under the lock: their completions do
    // not need it, and no new write can be mapped meanwhile.

    /// <summary>Makes the area's data durable (what was mapped but never written reads as zero). No metadata is written: none refers to the area yet.</summary>
    internal void FlushVmState(VmStateAllocation writer)
    {
        lock (_lock)
        {
            writer.WaitIdle();
            ThrowIfDisposed();
            if (writer.CapturedBy is not null || !ReferenceEquals(VmStateWriter, writer)) return;
            writer.ZeroUnwritten();
            Device.Flush();
        }
    }

    internal void DiscardVmState(VmStateAllocation writer, long offset, long length)
    {
        lock (_lock)
        {
            writer.WaitIdle();
            ThrowIfDisposed();
            if (!ReferenceEquals(VmStateWriter, writer)) throw new OperationRefusedException($"the VM-state area of '{Path}' is closed");
            writer.Discard(offset, length);
            if (writer.Length == 0) GiveBackTail();
        }
    }

    internal void CloseVmStateWriter(VmStateAllocation writer)
    {
        lock (_lock)
        {
            writer.WaitIdle();
            if (!ReferenceEquals(VmStateWriter, writer)) return;
            VmStateWriter = null;
            if (_disposed || writer.CapturedBy is not null) return;
            writer.ReleaseReservation();
            try
            {
                GiveBackTail();
            }
            catch (VmsnapException)
            {
                // Closing must not throw: the image's own flush reports a failing device.
            }
        }
    }

    /// <summary>After the area's reservation went back: the file ends again after the last cluster in use.</summary>
    private void GiveBackTail()
    {
        FlushAll();
        TrimFreeTail();
    }

    /// <summary>
    /// Shortens the file to the end of the last cluster in use when the clusters after it are free
    /// (a VM-state area given up or taken over, preallocated but unused). Call under the lock with
    /// the metadata flushed.
    /// </summary>
    internal void TrimFreeTail()
    {
        if (ReadOnly) return;
        long clusters = Geometry.ClustersFor(Device.Length);
        long end = Math.Max(Refcounts.EndOfUsed(clusters), Refcounts.ReservedEnd);
        if (end < clusters) Device.SetLength(end << Geometry.ClusterBits);
    }
}
