using Vmsnap.Qcow2.LowLevel;

namespace Vmsnap.Qcow2;

/// <summary>
/// The engine's side of a detached VM-state area (<see cref="DetachedVmStateArea"/>, which has the
/// whole story): what planning it reads, and checking, attaching and discarding it under the engine's lock.
/// </summary>
internal sealed partial class Qcow2Engine
{
    /// <summary>One past the highest cluster whose refcount is not 0, in bytes: where the image's metadata says its used space ends.</summary>
    internal long UsedEnd()
    {
        lock (SyncRoot)
        {
            ThrowIfDisposed();
            ReadOnlySpan<ulong> table = Refcounts.Table;
            for (long index = table.Length - 1; index >= 0; index--)
            {
                long block = (long)(table[(int)index] & RefcountTableEntry.OffsetMask);
                if (block == 0) continue;
                long first = index << Geometry.RefcountBlockBits;
                for (long c = Geometry.RefcountBlockEntries - 1; c >= 0; c--)
                    if (Refcounts.Get(first + c) != 0) return (first + c + 1) << Geometry.ClusterBits;
            }
            return Geometry.ClusterSize;
        }
    }

    /// <summary>Bytes of the file the refcount table can describe without growing.</summary>
    internal long RefcountReach()
    {
        lock (SyncRoot) return (long)Refcounts.Table.Length * Geometry.RefcountBlockEntries << Geometry.ClusterBits;
    }

    /// <summary>
    /// The runs of free clusters (refcount 0) below <paramref name="end"/> that are at least
    /// <paramref name="minLength"/> bytes long, as (file offset, length), lowest first.
    /// </summary>
    internal List<(long Offset, long Length)> FreeRuns(long end, long minLength)
    {
        lock (SyncRoot)
        {
            ThrowIfDisposed();
            var runs = new List<(long, long)>();
            long last = Math.Min(Geometry.ClustersFor(end), Geometry.ClustersFor(Device.Length));
            long runStart = -1;
            for (long c = 1; c <= last; c++)
            {
                bool free = c < last && Refcounts.Get(c) == 0;
                if (free && runStart < 0) runStart = c;
                if (free || runStart < 0) continue;
                long length = (c - runStart) << Geometry.ClusterBits;
                if (length >= minLength) runs.Add((runStart << Geometry.ClusterBits, length));
                runStart = -1;
            }
            return runs;
        }
    }

    /// <summary>
    /// Why the region from <paramref name="offset"/> to the end of the file cannot become the VM-state
    /// area, or null when it can: the file must reach <paramref name="length"/> bytes past the offset,
    /// and every cluster from <paramref name="reserveBelow"/> bytes before the offset on must have
    /// refcount 0 (nothing the image uses lies there or after it, and the engine has room below the
    /// region for the refcount blocks that linking it may need).
    /// </summary>
    internal string? CheckDetachedVmState(long offset, long length, long reserveBelow)
    {
        lock (SyncRoot)
        {
            ThrowIfDisposed();
            return RegionProblem(offset, length, reserveBelow);
        }
    }

    private string? RegionProblem(long offset, long length, long reserveBelow)
    {
        if (offset <= 0 || (offset & (Geometry.ClusterSize - 1)) != 0)
            return $"the region's offset 0x{offset:x} is not a positive multiple of the cluster size ({Geometry.ClusterSize})";
        if (length <= 0) return "the region is empty";
        long fileLength = Device.Length;
        if (fileLength < offset + length)
            return $"the file is {fileLength} bytes long, so the {length} bytes written at offset 0x{offset:x} are no longer all there (was the file truncated?)";
        if (Header.IsCorrupt) return "the image is marked corrupt";
        if (Header.IsDirty) return "the image is marked dirty (its refcounts may be stale)";
        long from = Math.Max(1, (offset - Math.Max(0, reserveBelow)) >> Geometry.ClusterBits);
        long firstRegion = offset >> Geometry.ClusterBits;
        ReadOnlySpan<ulong> table = Refcounts.Table;
        for (long index = from >> Geometry.RefcountBlockBits; index < table.Length; index++)
        {
            long block = (long)(table[(int)index] & RefcountTableEntry.OffsetMask);
            if (block == 0) continue;
            long rangeStart = index << Geometry.RefcountBlockBits;
            for (long c = Math.Max(from, rangeStart); c < rangeStart + Geometry.RefcountBlockEntries; c++)
            {
                ulong refcount = Refcounts.Get(c);
                if (refcount == 0) continue;
                return c >= firstRegion
                    ? $"cluster {c} (file offset 0x{c << Geometry.ClusterBits:x}) of the region has refcount {refcount}: the image uses it"
                    : $"cluster {c} (file offset 0x{c << Geometry.ClusterBits:x}), just below the region, has refcount {refcount}: the image's used space reached the region";
            }
        }
        return null;
    }

    /// <summary>
    /// Makes host bytes [<paramref name="offset"/>, + <paramref name="length"/>) of the file, written
    /// outside the engine, the VM-state area open for writing (area cluster N is host cluster
    /// offset/cluster + N), so that the next snapshot create with VM state takes it over. Refuses with
    /// <see cref="VmsnapException"/> when <see cref="CheckDetachedVmState"/> finds a problem. Nothing on
    /// disk changes here: the region's clusters are reserved in memory (no allocation can hand them
    /// out), and the snapshot create counts them and writes the area's L2 tables (reserved at the free
    /// tail, past the region) in its one header switch, as it does for an area written through
    /// <see cref="OpenVmStateForWriting"/>. A crash before that switch leaves the image as it was.
    /// </summary>
    internal void AttachDetachedVmState(long offset, long length, long reserveBelow) => Gate.RunExclusive(() =>
    {
        RefuseNewVmStateArea($"'{Path}' has its VM-state area open for writing");
        if (RegionProblem(offset, length, reserveBelow) is { } problem)
            throw new OperationRefusedException($"'{Path}': the VM state at file offset 0x{offset:x} cannot be linked: {problem}");
        State.VmState.Writer = VmStateAllocation.ForDetached(State.File, Geometry, Refcounts, VmStateOffset, offset >> Geometry.ClusterBits, length);
        return true;
    });

    /// <summary>Gives up an attached detached VM-state area no snapshot took over (its clusters were never counted), if there is one, then trims the file to its last used cluster.</summary>
    internal void DiscardDetachedVmState() => Gate.RunExclusive(() =>
    {
        State.Health.ThrowIfSwitchFailed();
        Guard.EnsureWritable();
        if (State.VmState.Writer is { CapturedBy: null, IsDetached: true } writer)
        {
            writer.ReleaseReservation();
            State.VmState.Writer = null;
        }
        Caches.FlushAll();
        Refcounts.TrimFreeTail();
        State.File.Flush();
        return true;
    });
}
