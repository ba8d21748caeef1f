namespace Vmsnap.Qcow2;

/// <summary>
/// A VM-state area written outside the engine, then linked in: a live save (the Live layer) streams the
/// VM state into a region of the image FILE while a running QEMU still owns the image, past anything
/// QEMU can allocate before it releases the image; once QEMU has released it, these methods check
/// that the region is still unused and make it the active VM-state area, so that a snapshot created
/// next takes it over (see docs/live.md).
/// </summary>
/// <remarks>
/// Why the region's bytes are safe from the engine itself while it links them: their clusters have
/// refcount 0 until <see cref="LinkVmStateRegion"/> raises them, which it does before anything else
/// that can allocate. The only allocations before that are refcount blocks for the region's own
/// range, and the allocator hands out the lowest free cluster, which lies below the region because
/// <see cref="CheckVmStateRegion"/> required free clusters there; a refcount table that must grow
/// goes past the end of the file, which is past the region.
/// </remarks>
internal sealed partial class Qcow2Engine
{
    /// <summary>One past the highest cluster whose refcount is not 0, in bytes: where the image's metadata says its used space ends.</summary>
    internal long UsedEnd()
    {
        lock (_lock)
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

    /// <summary>
    /// The runs of free clusters (refcount 0) below <paramref name="end"/> that are at least
    /// <paramref name="minLength"/> bytes long, as (file offset, length), lowest first.
    /// </summary>
    internal List<(long Offset, long Length)> FreeRuns(long end, long minLength)
    {
        lock (_lock)
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
    internal string? CheckVmStateRegion(long offset, long length, long reserveBelow)
    {
        lock (_lock)
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
    /// outside the engine, the active VM-state area (guest offsets from <see cref="VmStateOffset"/> on,
    /// one host cluster per guest cluster, in order). Refuses with <see cref="VmsnapException"/> when
    /// <see cref="CheckVmStateRegion"/> finds a problem. Crash-safe order: the region's refcounts are
    /// raised and made durable first, then whatever the active L1 table mapped past the disk is dropped,
    /// then the L2 entries (and the L1 entries for their tables) are written. On failure what was done
    /// is undone as far as the device allows (at worst clusters leak).
    /// </summary>
    internal void LinkVmStateRegion(long offset, long length, long reserveBelow) => RunExclusive(() =>
    {
        ThrowIfSwitchFailed();
        EnsureWritable();
        if (VmStateWriter is not null)
            throw new VmsnapException($"'{Path}' has its VM-state area open for writing");
        if (RegionProblem(offset, length, reserveBelow) is { } problem)
            throw new VmsnapException($"'{Path}': the VM state at file offset 0x{offset:x} cannot be linked: {problem}");
        long first = offset >> Geometry.ClusterBits;
        long count = Geometry.ClustersFor(length);
        long linked = 0;
        bool claimed = false;
        try
        {
            // Claimed first: from here on no allocation can hand out a cluster of the region. The
            // engine's write order puts these refcounts on disk before any L2 entry that points there.
            Refcounts.Update(offset, count << Geometry.ClusterBits, +1);
            claimed = true;
            DropActiveVmState();
            long start = VmStateOffset;
            bool extended = Geometry.ExtendedL2;
            ulong bitmap = extended ? L2Entry.AllAllocated : 0;
            int tables = 0;
            while (linked < count)
            {
                // One L2 table at a time: the entries of a run of clusters it maps.
                long guest = start + (linked << Geometry.ClusterBits);
                MetadataCache.Table table = GetWritableL2(Geometry.L1Index(guest));
                int index = Geometry.L2Index(guest);
                int n = (int)Math.Min(count - linked, Geometry.L2Entries - index);
                for (int k = 0; k < n; k++)
                {
                    if (L2Entry.Read(table.Data, index + k, extended).Word != 0)
                        throw Corrupt("L2 table", table.Offset, $"still maps VM-state guest offset 0x{start + (linked << Geometry.ClusterBits):x} after the old VM-state area was dropped");
                    L2Entry.Write(table.Data, index + k, extended, new L2Entry((ulong)((first + linked) << Geometry.ClusterBits) | L2Entry.Copied, bitmap));
                    L2Cache.MarkDirty(table);
                    linked++;
                }
                if ((++tables & 1023) == 0) TrimCaches();
            }
            FlushAll();
            return true;
        }
        catch (Exception e) when (claimed && e is VmsnapException or IOException)
        {
            UndoLink(first, count, linked);
            throw;
        }
    });

    /// <summary>After a failed link: the clusters linked so far go with the active VM-state mapping, the others are freed.</summary>
    private void UndoLink(long first, long count, long linked)
    {
        try
        {
            if (linked < count) Refcounts.Free((first + linked) << Geometry.ClusterBits, (count - linked) << Geometry.ClusterBits);
            FlushAll();
            DropActiveVmState();
            TrimFreeTail();
            Device.Flush();
        }
        catch (Exception e) when (e is VmsnapException or IOException)
        {
            // The failure that brought us here is the one to report; what could not be undone is at worst a leak.
        }
    }

    /// <summary>Drops what the active L1 table maps past the disk (a linked VM-state area no snapshot took over), then trims the file.</summary>
    internal void DropLinkedVmState() => RunExclusive(() =>
    {
        ThrowIfSwitchFailed();
        EnsureWritable();
        DropActiveVmState();
        FlushAll();
        TrimFreeTail();
        Device.Flush();
        return true;
    });

    /// <summary>Shortens the file to the end of its last used cluster (a region written but never linked is given back).</summary>
    internal void TrimUnusedTail() => RunExclusive(() =>
    {
        ThrowIfSwitchFailed();
        EnsureWritable();
        FlushAll();
        TrimFreeTail();
        Device.Flush();
        return true;
    });
}
