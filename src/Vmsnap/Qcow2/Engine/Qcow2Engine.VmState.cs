namespace Vmsnap.Qcow2;

/// <summary>The VM-state area: opening it for writing (active L1) or reading (a snapshot's L1), mapping, flush, discard.</summary>
internal sealed partial class Qcow2Engine
{
    /// <summary>Opens the VM-state area for writing; whatever the active L1 table mapped there before is dropped first.</summary>
    internal Qcow2VmStateArea OpenVmStateForWriting() => RunExclusive(() =>
    {
        ThrowIfSwitchFailed();
        EnsureWritable();
        if (VmStateWriter is not null)
            throw new VmsnapException($"'{Path}' already has its VM-state area open for writing");
        DropActiveVmState();
        var writer = new VmStateAllocation(this);
        VmStateWriter = writer;
        return Qcow2VmStateArea.ForWriting(this, writer);
    });

    /// <summary>Opens a snapshot's VM state for reading.</summary>
    internal Qcow2VmStateArea OpenVmStateForReading(SnapshotEntry sn, Qcow2Snapshot snapshot)
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
            return Qcow2VmStateArea.ForReading(this, l1, start, snapshot);
        }
    }

    internal void CloseVmStateReader(long l1Offset)
    {
        lock (_lock) RegisterVmStateReader(l1Offset, -1);
    }

    /// <summary>Maps a write of the area (allocating and linking clusters); under the lock.</summary>
    internal List<(long Host, int DataOffset, int Length)> MapVmState(VmStateAllocation writer, long offset, int length)
    {
        ThrowIfSwitchFailed();
        EnsureWritable();
        if (!ReferenceEquals(VmStateWriter, writer)) throw new VmsnapException($"the VM-state area of '{Path}' is closed");
        try
        {
            return writer.Map(offset, length);
        }
        finally
        {
            TrimCaches();
        }
    }

    // The methods below wait for the area's writes in flight under the lock: their completions do
    // not need it, and no new write can be mapped meanwhile.

    internal void FlushVmState(VmStateAllocation writer)
    {
        lock (_lock)
        {
            writer.WaitIdle();
            ThrowIfDisposed();
            if (writer.CapturedBy is not null || !ReferenceEquals(VmStateWriter, writer)) return;
            writer.ZeroUnwritten();
            writer.ReleaseReservation();
            FlushAll();
            TrimFreeTail();
            Device.Flush();
        }
    }

    internal void DiscardVmState(VmStateAllocation writer, long offset, long length)
    {
        lock (_lock)
        {
            writer.WaitIdle();
            ThrowIfDisposed();
            if (!ReferenceEquals(VmStateWriter, writer)) throw new VmsnapException($"the VM-state area of '{Path}' is closed");
            writer.Discard(offset, length);
            FlushAll();
            TrimFreeTail();
            Device.Flush();
            TrimCaches();
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
                FlushAll();
                TrimFreeTail();
            }
            catch (VmsnapException)
            {
                // Closing must not throw: the image's own flush reports a failing device.
            }
        }
    }

    /// <summary>
    /// Shortens the file to the end of the last cluster in use when the clusters after it are free
    /// (a VM-state reservation given back, preallocated but unused). Call under the lock with the
    /// metadata flushed.
    /// </summary>
    internal void TrimFreeTail()
    {
        if (ReadOnly) return;
        long clusters = Geometry.ClustersFor(Device.Length);
        long end = clusters;
        while (end > 1 && Refcounts.Get(end - 1) == 0) end--;
        if (end < clusters) Device.SetLength(end << Geometry.ClusterBits);
    }

    /// <summary>Lowers the refcount of what an active L2 entry referenced before it was replaced.</summary>
    internal void DropStorageOf(L2Entry old, long guest) => DropStorage(old, old.Kind(Geometry.ExtendedL2), guest);

    /// <summary>Drops active L2 tables from L1 index <paramref name="first"/> on whose entries are all empty (the VM-state area after a discard).</summary>
    internal void DropEmptyTablesFrom(long first)
    {
        for (long i = first; i < ActiveL1.Size; i++)
        {
            long l2 = L1Entry.L2Offset(ActiveL1[i]);
            if (l2 == 0) continue;
            MetadataCache.Table table = GetL2Table(ActiveL1, i)!;
            if (table.Data.AsSpan().IndexOfAnyExcept((byte)0) >= 0) continue;
            ActiveL1.Set(i, 0);
            L2Cache.Remove(l2);
            Refcounts.Free(l2, Geometry.ClusterSize);
        }
    }
}
