namespace Vmsnap.Qcow2;

/// <summary>
/// Guest writes in three steps: plan under the metadata lock (L2 tables made exclusive, new
/// clusters allocated), write data outside the lock (copy-on-write merges included), then link the
/// new clusters into the L2 tables and drop old references under the lock. Overlapping requests
/// wait for each other; disjoint ones run their data I/O in parallel.
/// </summary>
internal sealed partial class Qcow2Engine
{
    /// <summary>What one guest cluster of a write needs.</summary>
    private sealed class ClusterPlan
    {
        internal long Guest;            // guest offset of the cluster
        internal int WriteStart;        // the caller's bytes cover [WriteStart, WriteEnd) of the cluster
        internal int WriteEnd;
        internal int DataOffset;        // where WriteStart is in the caller's buffer
        internal L2Entry Old;
        internal ClusterKind OldKind;
        internal uint OldAllocated, OldZero;   // per subcluster (one "subcluster" without extended L2)
        internal bool NewCluster;       // data goes to a freshly allocated host cluster
        internal long Host;             // host cluster written
        internal int RegionStart;       // part of the host cluster written
        internal int RegionEnd;
        internal uint NewAllocated, NewZero;
        internal bool Link;             // the L2 entry changes

        internal bool Direct => RegionStart == WriteStart && RegionEnd == WriteEnd;
    }

    /// <summary>
    /// Writes guest bytes at any offset through the active L1 table (past the virtual disk too: the
    /// VM-state area), allocating and copying on write as needed.
    /// </summary>
    internal void WriteGuest(ReadOnlySpan<byte> data, long offset)
    {
        if (data.IsEmpty) return;
        if (offset < 0 || offset > ClusterGeometry.MaxGuestOffset - data.Length)
            throw new ArgumentOutOfRangeException(nameof(offset), offset, "guest offset out of range");
        List<ClusterPlan> plans;
        RequestGate.Request registration;
        lock (SyncRoot)
        {
            ThrowIfDisposed();
            Guard.EnsureWritable();
            registration = Gate.Enter(offset, data.Length, write: true);
            try
            {
                // Everything the write relies on is checked before anything changes.
                Mapping.ValidateForWrite(offset, data.Length);
                Guard.BeforeFirstChange();
                plans = PlanWrite(offset, data.Length);
            }
            catch
            {
                Gate.Leave(registration);
                throw;
            }
        }
        try
        {
            WriteData(plans, data);
        }
        catch
        {
            // No I/O here (the device may be failing): the registration goes, and the clusters
            // allocated for the write are freed by the next flush.
            lock (SyncRoot)
            {
                foreach (ClusterPlan p in plans)
                    if (p.NewCluster) Refcounts.Owe(p.Host, Geometry.ClusterSize);
                Gate.Leave(registration);
            }
            throw;
        }
        lock (SyncRoot)
        {
            try
            {
                LinkClusters(plans);
            }
            finally
            {
                Gate.Leave(registration);
            }
            Caches.Trim();
        }
    }

    private List<ClusterPlan> PlanWrite(long offset, int length)
    {
        var plans = new List<ClusterPlan>();
        int cs = Geometry.ClusterSize, sc = Geometry.SubclusterSize;
        uint all = Geometry.ExtendedL2 ? uint.MaxValue : 1u;
        long pos = offset, end = offset + length;
        while (pos < end)
        {
            long l1Index = Geometry.L1Index(pos);
            MetadataCache.Table table = Mapping.GetWritableL2(l1Index);
            int index = Geometry.L2Index(pos);
            L2Entry e = L2Entry.Read(table.Data, index, Geometry.ExtendedL2);
            ClusterKind kind = e.Kind(Geometry.ExtendedL2);
            Mapping.ValidateEntry(e, kind, table.Offset, index);
            int ws = (int)Geometry.OffsetInCluster(pos);
            int we = (int)Math.Min(cs, ws + (end - pos));
            var p = new ClusterPlan
            {
                Guest = pos - ws, WriteStart = ws, WriteEnd = we, DataOffset = (int)(pos - offset),
                Old = e, OldKind = kind,
            };
            (p.OldAllocated, p.OldZero) = kind switch
            {
                ClusterKind.Normal => Geometry.ExtendedL2 ? (e.AllocatedMask, e.ZeroMask) : (1u, 0u),
                ClusterKind.Compressed => (all, 0u),
                ClusterKind.ZeroPlain or ClusterKind.ZeroAllocated => (0u, 1u),
                _ => (0u, Geometry.ExtendedL2 ? e.ZeroMask : 0u),
            };
            // In place only into a host cluster this L2 entry owns alone (COPIED means refcount 1).
            bool inPlace = kind is ClusterKind.Normal or ClusterKind.ZeroAllocated && e.IsCopied;
            p.NewCluster = !inPlace;
            p.Host = inPlace ? e.HostOffset : 0;

            int s0 = ws / sc, s1 = (we - 1) / sc;
            uint touched = (s1 - s0 + 1 == 32 ? uint.MaxValue : ((1u << (s1 - s0 + 1)) - 1)) << s0;
            uint valid = inPlace ? p.OldAllocated : 0;   // subclusters whose bytes in the target are already right
            p.RegionStart = ws % sc != 0 && (valid & (1u << s0)) == 0 ? s0 * sc : ws;
            p.RegionEnd = we % sc != 0 && (valid & (1u << s1)) == 0 ? Math.Min(cs, (s1 + 1) * sc) : we;
            if (p.NewCluster && (p.OldAllocated & ~touched) != 0)
            {
                // Copy-on-write keeps every other allocated subcluster: write the whole cluster.
                p.RegionStart = 0;
                p.RegionEnd = cs;
            }
            p.NewAllocated = p.OldAllocated | touched;
            p.NewZero = p.OldZero & ~touched;
            if (!Geometry.ExtendedL2)
            {
                p.NewAllocated = 1;
                p.NewZero = 0;
            }
            p.Link = p.NewCluster || kind == ClusterKind.ZeroAllocated
                || (Geometry.ExtendedL2 && (p.NewAllocated != p.OldAllocated || p.NewZero != p.OldZero));
            plans.Add(p);
            pos = p.Guest + we;
        }
        // New host clusters for consecutive clusters come from one contiguous run.
        for (int i = 0; i < plans.Count;)
        {
            if (!plans[i].NewCluster) { i++; continue; }
            int j = i;
            while (j < plans.Count && plans[j].NewCluster) j++;
            long host = Refcounts.Allocate(j - i);
            for (int k = i; k < j; k++) plans[k].Host = host + (long)(k - i) * cs;
            i = j;
        }
        // The data goes outside the lock: its clusters are checked against the metadata now (QEMU checks each data write).
        foreach (ClusterPlan p in plans) State.File.Check(p.Host + p.RegionStart, p.RegionEnd - p.RegionStart, Qcow2Metadata.None);
        return plans;
    }

    private void WriteData(List<ClusterPlan> plans, ReadOnlySpan<byte> data)
    {
        long runHost = -1, runLength = 0;
        int runData = 0;
        foreach (ClusterPlan p in plans)
        {
            if (p.Direct)
            {
                long host = p.Host + p.WriteStart;
                if (runLength > 0 && runHost + runLength == host && runData + runLength == p.DataOffset)
                {
                    runLength += p.WriteEnd - p.WriteStart;
                    continue;
                }
                if (runLength > 0) Device.Write(data.Slice(runData, (int)runLength), runHost);
                runHost = host;
                runData = p.DataOffset;
                runLength = p.WriteEnd - p.WriteStart;
                continue;
            }
            byte[] buffer = new byte[p.RegionEnd - p.RegionStart];
            FillOld(p, buffer, p.RegionStart);
            data.Slice(p.DataOffset, p.WriteEnd - p.WriteStart).CopyTo(buffer.AsSpan(p.WriteStart - p.RegionStart));
            Device.Write(buffer, p.Host + p.RegionStart);
        }
        if (runLength > 0) Device.Write(data.Slice(runData, (int)runLength), runHost);
    }

    /// <summary>Fills <paramref name="buffer"/> (cluster bytes from <paramref name="from"/>) with what the guest reads there now.</summary>
    private void FillOld(ClusterPlan p, Span<byte> buffer, int from)
    {
        if (p.OldKind == ClusterKind.Compressed)
        {
            Decompress(p.Old.Word).AsSpan(from, buffer.Length).CopyTo(buffer);
            return;
        }
        int sc = Geometry.SubclusterSize;
        int pos = from, end = from + buffer.Length;
        while (pos < end)
        {
            int s = pos / sc;
            uint bit = 1u << s;
            // Extend over following subclusters of the same kind to read in one go.
            int runEnd = Math.Min(end, (s + 1) * sc);
            while (runEnd < end && SameSource(p, bit, 1u << (runEnd / sc))) runEnd = Math.Min(end, runEnd + sc);
            Span<byte> part = buffer.Slice(pos - from, runEnd - pos);
            if ((p.OldAllocated & bit) != 0)
            {
                int n = Device.Read(part, p.Old.HostOffset + pos);
                if (n < part.Length) part[n..].Clear();
            }
            else if ((p.OldZero & bit) != 0 || State.Backing is null)
            {
                part.Clear();
            }
            else
            {
                State.Backing.ReadAt(part, p.Guest + pos);
            }
            pos = runEnd;
        }
    }

    private static bool SameSource(ClusterPlan p, uint a, uint b) =>
        ((p.OldAllocated & a) != 0) == ((p.OldAllocated & b) != 0) && ((p.OldZero & a) != 0) == ((p.OldZero & b) != 0);

    private void LinkClusters(List<ClusterPlan> plans)
    {
        foreach (ClusterPlan p in plans)
        {
            if (!p.Link) continue;
            // Bytes the guest did not write in this request (old data, zeroes, backing data) must be
            // durable before the L2 entry that makes them visible.
            if (!p.Direct) State.L2Cache.DependOnData();
            MetadataCache.Table table = ExclusiveL2(p.Guest);
            ulong word = (ulong)p.Host | L2Entry.Copied;
            ulong bitmap = Geometry.ExtendedL2 ? ((ulong)p.NewZero << 32) | p.NewAllocated : 0;
            L2Entry.Write(table.Data, Geometry.L2Index(p.Guest), Geometry.ExtendedL2, new L2Entry(word, bitmap));
            State.L2Cache.MarkDirty(table);
        }
        // Old references are gone (in memory); their refcounts drop after that reaches the disk.
        Mapping.DropAll(plans.Where(p => p.NewCluster).Select(p => (p.Old, p.OldKind, p.Guest)).ToList());
    }

    /// <summary>The active L2 table for a guest offset, which planning already made exclusive.</summary>
    private MetadataCache.Table ExclusiveL2(long guest)
    {
        long l1Index = Geometry.L1Index(guest);
        ulong entry = State.ActiveL1[l1Index];
        if (!L1Entry.IsCopied(entry)) return Mapping.GetWritableL2(l1Index);
        return State.L2Cache.Get(L1Entry.L2Offset(entry));
    }

    /// <summary>
    /// Makes whole guest clusters read as zeroes (<paramref name="discard"/> false) or drops their data
    /// (<paramref name="discard"/> true: they read from the backing file, or zero without one).
    /// Partial clusters: zeroes are written as data; discard leaves them alone.
    /// </summary>
    internal void ZeroOrDiscard(long offset, long length, bool discard)
    {
        if (length <= 0) return;
        int cs = Geometry.ClusterSize;
        long first = (offset + cs - 1) & ~(long)(cs - 1);
        long end = offset + length;
        long last = end & ~(long)(cs - 1);
        BackingStore? backing = State.Backing;
        bool v2WithBacking = Header.Version < 3 && backing is not null;
        if (!discard)
        {
            // Zeroes go in several writes: everything the whole range relies on is checked before the first.
            lock (SyncRoot)
            {
                ThrowIfDisposed();
                Guard.EnsureWritable();
                Mapping.ValidateForWrite(offset, length);
            }
        }
        if (!discard && (first >= last || v2WithBacking))
        {
            WriteZeroBytes(offset, length);
            return;
        }
        if (!discard)
        {
            if (offset < first) WriteZeroBytes(offset, first - offset);
            if (last < end) WriteZeroBytes(last, end - last);
        }
        if (first >= last || (discard && v2WithBacking)) return;   // v2 cannot mark clusters zero over a backing file
        lock (SyncRoot)
        {
            ThrowIfDisposed();
            Guard.EnsureWritable();
            RequestGate.Request registration = Gate.Enter(first, last - first, write: true);
            try
            {
                Mapping.ValidateForWrite(first, last - first);
                Guard.BeforeFirstChange();
                var dropped = new List<(L2Entry Old, ClusterKind Kind, long Guest)>();
                // With a backing file, "zero" must hide its data: zero flags (or zero subclusters).
                bool zero = !discard || backing is not null;
                for (long pos = first; pos < last; pos += cs)
                {
                    long l1Index = Geometry.L1Index(pos);
                    if (backing is null && L1Entry.L2Offset(State.ActiveL1[l1Index]) == 0) continue;   // reads as zeroes already
                    MetadataCache.Table table = Mapping.GetWritableL2(l1Index);
                    int index = Geometry.L2Index(pos);
                    L2Entry e = L2Entry.Read(table.Data, index, Geometry.ExtendedL2);
                    ClusterKind kind = e.Kind(Geometry.ExtendedL2);
                    Mapping.ValidateEntry(e, kind, table.Offset, index);
                    L2Entry replacement = !zero ? new L2Entry(0, 0)
                        : Geometry.ExtendedL2 ? new L2Entry(0, L2Entry.AllZeroes)
                        : Header.Version >= 3 ? new L2Entry(L2Entry.ZeroFlag, 0)
                        : new L2Entry(0, 0);
                    if (e == replacement) continue;
                    bool nothingStored = kind is ClusterKind.ZeroPlain || (kind == ClusterKind.Unallocated && e.AllocatedMask == 0);
                    if (backing is null && nothingStored) continue;   // reads as zeroes already
                    L2Entry.Write(table.Data, index, Geometry.ExtendedL2, replacement);
                    State.L2Cache.MarkDirty(table);
                    dropped.Add((e, kind, pos));
                }
                Mapping.DropAll(dropped);
            }
            finally
            {
                Gate.Leave(registration);
            }
            Caches.Trim();
        }
    }

    private void WriteZeroBytes(long offset, long length)
    {
        byte[] zeros = new byte[(int)Math.Min(length, 1 << 20)];
        for (long pos = offset; pos < offset + length; pos += zeros.Length)
            WriteGuest(zeros.AsSpan(0, (int)Math.Min(zeros.Length, offset + length - pos)), pos);
    }
}
