using Vmsnap.Qcow2.LowLevel;

namespace Vmsnap.Qcow2;

/// <summary>The VM-state area: opening it for writing (kept apart until a snapshot takes it) or reading (a snapshot's L1), mapping, flush, discard.</summary>
internal sealed partial class Qcow2Engine
{
    /// <summary>
    /// Opens the VM-state area for writing. Nothing on disk changes until a snapshot takes it over:
    /// refusals that a snapshot create would make anyway come here, before a stream is written.
    /// </summary>
    internal Qcow2VmStateArea OpenVmStateForWriting() => Gate.RunExclusive(() =>
    {
        RefuseNewVmStateArea($"'{Path}' already has its VM-state area open for writing");
        var writer = new VmStateAllocation(State.File, Geometry, Refcounts, VmStateOffset);
        State.VmState.Writer = writer;
        return Qcow2VmStateArea.ForWriting(this, writer);
    });

    /// <summary>
    /// The refusals before a VM-state area opens for writing (written here or attached from outside):
    /// a failed switch, a read-only image, an area already open (<paramref name="busy"/>), a damaged
    /// snapshot table, or no room for another snapshot. Call under the gate.
    /// </summary>
    private void RefuseNewVmStateArea(string busy)
    {
        State.Health.ThrowIfSwitchFailed();
        Guard.EnsureWritable();
        if (State.VmState.Writer is not null) throw new OperationRefusedException(busy);
        SnapshotOps.ValidateSnapshotTable();
        if (State.Snapshots.Count >= SnapshotTable.MaxSnapshots)
            throw new OperationRefusedException($"'{Path}' already has {State.Snapshots.Count} snapshots, the most qcow2 allows");
    }

    /// <summary>Opens a snapshot's VM state for reading.</summary>
    internal Qcow2VmStateArea OpenVmStateForReading(SnapshotEntry sn, Qcow2Snapshot snapshot, bool wholeArea = false)
    {
        lock (SyncRoot)
        {
            ThrowIfDisposed();
            SnapshotOps.ValidateSnapshotTable();
            L1Table l1 = SnapshotOps.ReadSnapshotL1(sn);
            ulong diskSize = sn.DiskSize ?? (ulong)State.VirtualSize;
            // A larger disk size would overflow the VM-state offset (found by fuzzing).
            if (diskSize > ClusterGeometry.MaxGuestOffset)
                throw Corrupt($"snapshot table entry {State.Snapshots.Entries.IndexOf(sn)}", sn.FileOffset >= 0 ? sn.FileOffset : null,
                    $"{SnapshotOperations.Describe(sn)}: disk size {diskSize} is beyond what an image can map");
            long start = VmStateOffsetFor((long)diskSize);
            if (sn.VmStateSize > ClusterGeometry.MaxGuestOffset - start)
                throw Corrupt($"snapshot table entry {State.Snapshots.Entries.IndexOf(sn)}", sn.FileOffset >= 0 ? sn.FileOffset : null,
                    $"{SnapshotOperations.Describe(sn)}: VM-state size {sn.VmStateSize} is beyond what an image can map");
            State.VmState.RegisterReader(l1.Offset, +1);
            return Qcow2VmStateArea.ForReading(this, l1, start, snapshot, wholeArea ? ClusterGeometry.MaxGuestOffset - start : null);
        }
    }

    internal void CloseVmStateReader(long l1Offset)
    {
        lock (SyncRoot) State.VmState.RegisterReader(l1Offset, -1);
    }

    /// <summary>Maps a write of the area (taking reserved clusters) and checks it against the metadata; under the lock. No I/O but preallocation.</summary>
    internal List<(long Host, int DataOffset, int Length)> MapVmState(VmStateAllocation writer, long offset, int length)
    {
        State.Health.ThrowIfSwitchFailed();
        Guard.EnsureWritable();
        if (!ReferenceEquals(State.VmState.Writer, writer)) throw new OperationRefusedException($"the VM-state area of '{Path}' is closed");
        List<(long Host, int DataOffset, int Length)> segments = writer.Map(offset, length);
        // The data goes outside the lock: its clusters are checked against the metadata now.
        foreach ((long host, _, int n) in segments) State.File.Check(host, n, Qcow2Metadata.None);
        return segments;
    }

    /// <summary>Reads the area being written: what was mapped from its clusters, the rest as zeroes.</summary>
    internal void ReadVmState(VmStateAllocation writer, Span<byte> buffer, long offset)
    {
        List<(long Host, int DataOffset, int Length)> segments;
        lock (SyncRoot)
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
        lock (SyncRoot)
        {
            writer.WaitIdle();
            ThrowIfDisposed();
            if (writer.CapturedBy is not null || !ReferenceEquals(State.VmState.Writer, writer)) return;
            writer.ZeroUnwritten();
            State.File.Flush();
        }
    }

    internal void DiscardVmState(VmStateAllocation writer, long offset, long length)
    {
        lock (SyncRoot)
        {
            writer.WaitIdle();
            ThrowIfDisposed();
            if (!ReferenceEquals(State.VmState.Writer, writer)) throw new OperationRefusedException($"the VM-state area of '{Path}' is closed");
            writer.Discard(offset, length);
            if (writer.Length == 0) GiveBackTail();
        }
    }

    internal void CloseVmStateWriter(VmStateAllocation writer)
    {
        lock (SyncRoot)
        {
            writer.WaitIdle();
            if (!ReferenceEquals(State.VmState.Writer, writer)) return;
            State.VmState.Writer = null;
            if (Gate.Disposed || writer.CapturedBy is not null) return;
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
        Caches.FlushAll();
        Refcounts.TrimFreeTail();
    }
}
