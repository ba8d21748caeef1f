using Vmsnap.Storage;

namespace Vmsnap.Qcow2;

/// <summary>
/// Guest writes in three steps: plan under the metadata lock (L2 tables made exclusive, new
/// clusters allocated), write data outside the lock (copy-on-write merges included), then link the
/// new clusters into the L2 tables and drop old references under the lock. Overlapping requests
/// wait for each other; disjoint ones run their data I/O in parallel.
/// </summary>
internal sealed partial class Qcow2Engine
{
    /// <summary>A guest cluster range some request is working on.</summary>
    private sealed class InFlight(long first, long last, bool write)
    {
        internal long First { get; } = first;
        internal long Last { get; } = last;
        internal bool Write { get; } = write;
    }

    private readonly List<InFlight> _inFlight = [];
    // Refcount decrements owed for references already dropped in memory (the clusters of a failed
    // data write, or an old reference whose decrement failed on the device): done at the next flush.
    private readonly List<(long Offset, long Length)> _owed = [];

    // The first corruption found (by that validation, a read, a walk or a check): writes are refused from then on.
    private string? _corruption;

    private bool _autoclearDone;

    // Host clusters that several entries of the active L2 tables share (legal only with a matching
    // refcount, e.g. after check repaired such sharing), with the guest offsets that map to them:
    // when a copy-on-write leaves one reference, that entry gets its COPIED flag back.
    private Dictionary<long, List<long>> _activeShared = [];

    private InFlight Enter(long offset, long length, bool write)
    {
        long first = offset >> Geometry.ClusterBits, last = (offset + length - 1) >> Geometry.ClusterBits;
        while (_inFlight.Exists(o => o.First <= last && first <= o.Last && (write || o.Write)))
        {
            Monitor.Wait(_lock);
            ThrowIfDisposed();
        }
        var r = new InFlight(first, last, write);
        _inFlight.Add(r);
        return r;
    }

    private void Leave(InFlight r)
    {
        _inFlight.Remove(r);
        Monitor.PulseAll(_lock);
    }

    /// <summary>Runs <paramref name="action"/> under the lock once no request is in flight (snapshot operations).</summary>
    internal T RunExclusive<T>(Func<T> action)
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            while (_inFlight.Count > 0) Monitor.Wait(_lock);
            T result = action();
            TrimCaches();
            return result;
        }
    }

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
        InFlight registration;
        lock (_lock)
        {
            ThrowIfDisposed();
            EnsureWritable();
            registration = Enter(offset, data.Length, write: true);
            try
            {
                // Everything the write relies on is checked before anything changes.
                ValidateForWrite(offset, data.Length);
                BeforeFirstChange();
                plans = PlanWrite(offset, data.Length);
            }
            catch
            {
                Leave(registration);
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
            lock (_lock)
            {
                foreach (ClusterPlan p in plans)
                    if (p.NewCluster) _owed.Add((p.Host, Geometry.ClusterSize));
                Leave(registration);
            }
            throw;
        }
        lock (_lock)
        {
            try
            {
                LinkClusters(plans);
            }
            finally
            {
                Leave(registration);
            }
            TrimCaches();
        }
    }

    /// <summary>Makes the owed refcount decrements (see <see cref="_owed"/>); one that fails stays owed.</summary>
    private void FreeOwed()
    {
        while (_owed.Count > 0)
        {
            (long offset, long length) = _owed[^1];
            Refcounts.Free(offset, length);
            _owed.RemoveAt(_owed.Count - 1);
        }
    }

    /// <summary>Lowers a refcount for a reference dropped in memory; if the device fails meanwhile, the decrement is owed (not lost) and the error goes on.</summary>
    internal void FreeOrOwe(long offset, long length)
    {
        try
        {
            Refcounts.Free(offset, length);
        }
        catch (Exception e) when (e is Storage.StorageException or IOException)
        {
            _owed.Add((offset, length));
            throw;
        }
    }

    /// <summary>The decrement <see cref="DropStorage"/> would make, owed instead (after an earlier one failed).</summary>
    private void OweStorage(L2Entry old, ClusterKind kind)
    {
        switch (kind)
        {
            case ClusterKind.Normal or ClusterKind.ZeroAllocated:
                _owed.Add((old.HostOffset, Geometry.ClusterSize));
                break;
            case ClusterKind.Compressed:
                (long offset, int length) = old.CompressedRange(Geometry);
                _owed.Add((offset, length));
                break;
        }
    }

    /// <summary>Drops the storage of several replaced entries; if one fails on the device, the rest are owed.</summary>
    private void DropAll(List<(L2Entry Old, ClusterKind Kind, long Guest)> dropped)
    {
        for (int k = 0; k < dropped.Count; k++)
        {
            try
            {
                DropStorage(dropped[k].Old, dropped[k].Kind, dropped[k].Guest);
            }
            catch (Exception e) when (e is Storage.StorageException or IOException)
            {
                for (int m = k + 1; m < dropped.Count; m++) OweStorage(dropped[m].Old, dropped[m].Kind);
                throw;
            }
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
            MetadataCache.Table table = GetWritableL2(l1Index);
            int index = Geometry.L2Index(pos);
            L2Entry e = L2Entry.Read(table.Data, index, Geometry.ExtendedL2);
            ClusterKind kind = e.Kind(Geometry.ExtendedL2);
            ValidateEntry(e, kind, table.Offset, index);
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
            else if ((p.OldZero & bit) != 0 || Backing is null)
            {
                part.Clear();
            }
            else
            {
                Backing.ReadAt(part, p.Guest + pos);
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
            if (!p.Direct) Order.MappingDependsOnData = true;
            MetadataCache.Table table = ExclusiveL2(p.Guest);
            ulong word = (ulong)p.Host | L2Entry.Copied;
            ulong bitmap = Geometry.ExtendedL2 ? ((ulong)p.NewZero << 32) | p.NewAllocated : 0;
            L2Entry.Write(table.Data, Geometry.L2Index(p.Guest), Geometry.ExtendedL2, new L2Entry(word, bitmap));
            L2Cache.MarkDirty(table);
        }
        // Old references are gone (in memory); their refcounts drop after that reaches the disk.
        DropAll(plans.Where(p => p.NewCluster).Select(p => (p.Old, p.OldKind, p.Guest)).ToList());
    }

    /// <summary>The active L2 table for a guest offset, which planning already made exclusive.</summary>
    private MetadataCache.Table ExclusiveL2(long guest)
    {
        long l1Index = Geometry.L1Index(guest);
        ulong entry = ActiveL1[l1Index];
        if (!L1Entry.IsCopied(entry)) return GetWritableL2(l1Index);
        return L2Cache.Get(L1Entry.L2Offset(entry));
    }

    /// <summary>Lowers the refcount of the host storage an old L2 entry (of guest cluster <paramref name="guest"/>) referenced.</summary>
    private void DropStorage(L2Entry old, ClusterKind kind, long guest)
    {
        switch (kind)
        {
            case ClusterKind.Normal or ClusterKind.ZeroAllocated:
                FreeOrOwe(old.HostOffset, Geometry.ClusterSize);
                long cluster = old.HostOffset >> Geometry.ClusterBits;
                if (_activeShared.TryGetValue(cluster, out List<long>? guests))
                {
                    guests.Remove(guest);
                    if (guests.Count == 1 && Refcounts.Get(cluster) == 1) RestoreCopied(guests[0], old.HostOffset);
                    if (guests.Count <= 1) _activeShared.Remove(cluster);
                }
                break;
            case ClusterKind.Compressed:
                (long offset, int length) = old.CompressedRange(Geometry);
                FreeOrOwe(offset, length);
                break;
        }
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
        bool v2WithBacking = Header.Version < 3 && Backing is not null;
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
        lock (_lock)
        {
            ThrowIfDisposed();
            EnsureWritable();
            InFlight registration = Enter(first, last - first, write: true);
            try
            {
                ValidateForWrite(first, last - first);
                BeforeFirstChange();
                var dropped = new List<(L2Entry Old, ClusterKind Kind, long Guest)>();
                // With a backing file, "zero" must hide its data: zero flags (or zero subclusters).
                bool zero = !discard || Backing is not null;
                for (long pos = first; pos < last; pos += cs)
                {
                    long l1Index = Geometry.L1Index(pos);
                    if (Backing is null && L1Entry.L2Offset(ActiveL1[l1Index]) == 0) continue;   // reads as zeroes already
                    MetadataCache.Table table = GetWritableL2(l1Index);
                    int index = Geometry.L2Index(pos);
                    L2Entry e = L2Entry.Read(table.Data, index, Geometry.ExtendedL2);
                    ClusterKind kind = e.Kind(Geometry.ExtendedL2);
                    ValidateEntry(e, kind, table.Offset, index);
                    L2Entry replacement = !zero ? new L2Entry(0, 0)
                        : Geometry.ExtendedL2 ? new L2Entry(0, L2Entry.AllZeroes)
                        : Header.Version >= 3 ? new L2Entry(L2Entry.ZeroFlag, 0)
                        : new L2Entry(0, 0);
                    if (e == replacement) continue;
                    bool nothingStored = kind is ClusterKind.ZeroPlain || (kind == ClusterKind.Unallocated && e.AllocatedMask == 0);
                    if (Backing is null && nothingStored) continue;   // reads as zeroes already
                    L2Entry.Write(table.Data, index, Geometry.ExtendedL2, replacement);
                    L2Cache.MarkDirty(table);
                    dropped.Add((e, kind, pos));
                }
                DropAll(dropped);
            }
            finally
            {
                Leave(registration);
            }
            TrimCaches();
        }
    }

    private void WriteZeroBytes(long offset, long length)
    {
        byte[] zeros = new byte[(int)Math.Min(length, 1 << 20)];
        for (long pos = offset; pos < offset + length; pos += zeros.Length)
            WriteGuest(zeros.AsSpan(0, (int)Math.Min(zeros.Length, offset + length - pos)), pos);
    }

    /// <summary>
    /// What every change needs: a writable image that is not marked corrupt (in the header, or by a
    /// corruption found since it was opened), whose backing file is open and which has no persistent
    /// bitmaps vmsnap would leave stale. Nothing is written here.
    /// </summary>
    internal void EnsureWritable()
    {
        if (ReadOnly) throw new OperationRefusedException($"'{Path}' is open read-only");
        ThrowIfSwitchFailed();
        if (Header.IsCorrupt)
            throw Corrupt("header", Qcow2Header.IncompatibleFeaturesOffset,
                "the image is marked corrupt (incompatible feature 'corrupt bit'), so vmsnap only reads it; run 'vmsnap check --repair all' to repair it");
        if (Header.BackingFile is not null && Backing is null)
            throw new OperationRefusedException($"'{Path}' has a backing file that was not opened; writes are refused");
        if (Header.FindExtension(HeaderExtension.Bitmaps) is not null && (Header.AutoclearFeatures & Qcow2Header.AutoclearBitmaps) != 0)
            throw Corrupt("bitmaps extension", null,
                "the image has persistent dirty bitmaps, which vmsnap does not keep up to date; writing would make them wrong (remove them with 'qemu-img bitmap --remove')");
        if (_corruption is not null)
            throw Corrupt("image", null, $"{_corruption}; a write could damage data, so vmsnap refuses it: {RepairHint}");
    }

    private const string RepairHint = "run 'vmsnap check --repair all' first";

    /// <summary>Call once an operation has checked what it needs and is about to change the image: clears the autoclear bits vmsnap does not maintain (as QEMU does before its first write).</summary>
    internal void BeforeFirstChange()
    {
        if (_autoclearDone) return;
        ulong autoclear = Header.AutoclearFeatures & Qcow2Header.AutoclearBitmaps;
        if (autoclear != Header.AutoclearFeatures && Header.Version >= 3)
        {
            Header.AutoclearFeatures = autoclear;
            WriteHeaderBytes(Qcow2Header.AutoclearFeaturesOffset, Qcow2Header.EncodeUInt64(autoclear));
            Device.Flush();
        }
        _autoclearDone = true;
    }

    /// <summary>Records a corruption found (writes are refused from now on) and returns its exception.</summary>
    internal Qcow2FormatException CorruptionFound(string structure, long? offset, string problem)
    {
        Qcow2FormatException e = Corrupt(structure, offset, problem);
        _corruption ??= e.Message;
        return e;
    }

    /// <summary>A corruption a write would make worse: recorded, with what to do about it.</summary>
    internal Qcow2FormatException WriteRefused(string structure, long? offset, string problem) =>
        CorruptionFound(structure, offset, $"{problem}; a write could damage data, so vmsnap refuses it: {RepairHint}");

    /// <summary>Validates the active L2 tables a write of guest range [offset, offset + length) will use (each once per open).</summary>
    private void ValidateForWrite(long offset, long length)
    {
        long firstIndex = Geometry.L1Index(offset), lastIndex = Geometry.L1Index(offset + length - 1);
        for (long i = firstIndex; i <= Math.Min(lastIndex, ActiveL1.Size - 1); i++)
        {
            long l2 = L1Entry.L2Offset(ActiveL1[i]);
            if (l2 == 0 || Mapping.ValidatedL2.Contains(l2)) continue;
            ValidateL2Offset(ActiveL1, i, l2);
            ValidateActiveL2(i, L2Cache.Get(l2));
        }
    }

    /// <summary>
    /// What QEMU's check would find wrong in one active L2 table and would make a write damage data:
    /// bad entries, a COPIED flag (on the table or an entry) whose refcount is not 1, a referenced
    /// cluster whose refcount is 0, two entries sharing a cluster one of them claims alone. Clusters
    /// the table's entries share legally (refcount high enough) are noted, to give the last one left
    /// its COPIED flag back.
    /// </summary>
    internal void ValidateActiveL2(long l1Index, MetadataCache.Table table)
    {
        if (Mapping.ValidatedL2.Contains(table.Offset)) return;
        long at = ActiveL1.Offset + l1Index * 8;
        ulong l1Entry = ActiveL1[l1Index];
        ulong tableRefcount = Refcounts.Get(table.Offset >> Geometry.ClusterBits);
        if (tableRefcount == 0)
            throw WriteRefused($"L1 table entry {l1Index}", at, $"points to the L2 table at 0x{table.Offset:x}, whose refcount is 0");
        if (L1Entry.IsCopied(l1Entry) && tableRefcount != 1)
            throw WriteRefused($"L1 table entry {l1Index}", at, $"marks the L2 table at 0x{table.Offset:x} COPIED (not shared), but its refcount is {tableRefcount}");
        bool extended = Geometry.ExtendedL2;
        int entries = Geometry.L2Entries;
        long[] hosts = new long[entries];
        int count = 0;
        var reader = new RefcountManager.Reader(Refcounts);
        for (int j = 0; j < entries; j++)
        {
            L2Entry e = L2Entry.Read(table.Data, j, extended);
            ClusterKind kind = e.Kind(extended);
            ValidateEntry(e, kind, table.Offset, j);
            long entryAt = table.Offset + (long)j * Geometry.L2EntrySize;
            switch (kind)
            {
                case ClusterKind.Normal or ClusterKind.ZeroAllocated:
                    long cluster = e.HostOffset >> Geometry.ClusterBits;
                    ulong refcount = reader.Get(cluster);
                    if (refcount == 0)
                        throw WriteRefused($"L2 table entry {j}", entryAt, $"points to host cluster 0x{e.HostOffset:x}, whose refcount is 0");
                    if (e.IsCopied && refcount != 1)
                        throw WriteRefused($"L2 table entry {j}", entryAt, $"marks host cluster 0x{e.HostOffset:x} COPIED (not shared), but its refcount is {refcount}");
                    hosts[count++] = (cluster << 1) | (e.IsCopied ? 1L : 0L);
                    break;
                case ClusterKind.Compressed:
                    (long offset, int length) = e.CompressedRange(Geometry);
                    for (long c = offset >> Geometry.ClusterBits; c <= (offset + length - 1) >> Geometry.ClusterBits; c++)
                        if (reader.Get(c) == 0)
                            throw WriteRefused($"L2 table entry {j}", entryAt, $"holds compressed data in host cluster 0x{c << Geometry.ClusterBits:x}, whose refcount is 0");
                    break;
            }
        }
        Array.Sort(hosts, 0, count);
        for (int k = 1; k < count; k++)
        {
            if (hosts[k] >> 1 != hosts[k - 1] >> 1) continue;
            long cluster = hosts[k] >> 1;
            if (((hosts[k] | hosts[k - 1]) & 1) != 0)
                throw WriteRefused($"L2 table at 0x{table.Offset:x}", table.Offset,
                    $"two entries point to host cluster 0x{cluster << Geometry.ClusterBits:x}, and one of them marks it COPIED (refcount {Refcounts.Get(cluster)})");
            NoteSharedInTable(l1Index, table, cluster);
            while (k + 1 < count && hosts[k + 1] >> 1 == cluster) k++;
        }
        Mapping.ValidatedL2.Add(table.Offset);
    }

    /// <summary>Records the guest offsets whose entries in one active L2 table share a host cluster.</summary>
    private void NoteSharedInTable(long l1Index, MetadataCache.Table table, long cluster)
    {
        if (_activeShared.ContainsKey(cluster)) return;
        var guests = new List<long>();
        for (int j = 0; j < Geometry.L2Entries; j++)
        {
            L2Entry e = L2Entry.Read(table.Data, j, Geometry.ExtendedL2);
            if (e.Kind(Geometry.ExtendedL2) is ClusterKind.Normal or ClusterKind.ZeroAllocated && e.HostOffset >> Geometry.ClusterBits == cluster)
                guests.Add((l1Index * Geometry.L2Entries + j) * Geometry.ClusterSize);
        }
        _activeShared[cluster] = guests;
    }

    /// <summary>Recomputes which active L2 entries share host clusters, after the active tables changed (a snapshot apply).</summary>
    internal void RefreshActiveSharing(IReadOnlySet<long> clusters) => _activeShared = FindActiveSharing(clusters);

    /// <summary>Forgets which L2 tables were validated, after the tables were replaced (a header switch).</summary>
    internal void ForgetValidatedL2() => Mapping.ValidatedL2.Clear();

    /// <summary>The guest offsets that map to each of the given host clusters through the active tables.</summary>
    private Dictionary<long, List<long>> FindActiveSharing(IReadOnlySet<long> clusters)
    {
        var map = new Dictionary<long, List<long>>();
        if (clusters.Count == 0) return map;
        for (long i = 0; i < ActiveL1.Size; i++)
        {
            MetadataCache.Table? table = GetL2Table(ActiveL1, i);
            if (table is null) continue;
            for (int j = 0; j < Geometry.L2Entries; j++)
            {
                L2Entry e = L2Entry.Read(table.Data, j, Geometry.ExtendedL2);
                if (e.Kind(Geometry.ExtendedL2) is not (ClusterKind.Normal or ClusterKind.ZeroAllocated)) continue;
                long cluster = e.HostOffset >> Geometry.ClusterBits;
                if (!clusters.Contains(cluster)) continue;
                if (!map.TryGetValue(cluster, out List<long>? guests)) map[cluster] = guests = [];
                guests.Add((i * Geometry.L2Entries + j) * Geometry.ClusterSize);
            }
        }
        return map;
    }

    /// <summary>Sets COPIED on the active L2 entry of <paramref name="guest"/> if it still maps to <paramref name="host"/>.</summary>
    private void RestoreCopied(long guest, long host)
    {
        MetadataCache.Table table = GetWritableL2(Geometry.L1Index(guest));
        int index = Geometry.L2Index(guest);
        L2Entry e = L2Entry.Read(table.Data, index, Geometry.ExtendedL2);
        if (e.HostOffset != host || e.IsCopied || e.Kind(Geometry.ExtendedL2) is not (ClusterKind.Normal or ClusterKind.ZeroAllocated)) return;
        L2Entry.Write(table.Data, index, Geometry.ExtendedL2, e with { Word = e.Word | L2Entry.Copied });
        L2Cache.MarkDirty(table);
    }

    /// <summary>Repairs refcounts of an image left dirty (lazy refcounts) before anything is written, as QEMU does on open.</summary>
    private void RepairDirty()
    {
        lock (_lock)
        {
            Qcow2Checker.Run(this, Qcow2RepairMode.All);
        }
    }

    /// <summary>Checks (and optionally repairs) the image; waits for requests in flight. What it finds decides whether writes are refused.</summary>
    internal Qcow2CheckResult Check(Qcow2RepairMode mode)
    {
        if (mode != Qcow2RepairMode.None && ReadOnly)
            throw new OperationRefusedException($"'{Path}' is open read-only; open it writable to repair it");
        return RunExclusive(() =>
        {
            // A repair may rebuild refcounts in free clusters, and the area's reservation is free on disk.
            if (mode != Qcow2RepairMode.None && VmStateWriter is not null)
                throw new OperationRefusedException($"'{Path}': close the VM-state area open for writing before repairing the image");
            Qcow2CheckResult result = Qcow2Checker.Run(this, mode);
            // A repair may have rewritten tables and flags: validate again as they are used.
            Mapping.ValidatedL2.Clear();
            _activeShared.Clear();
            if (result.Corruptions > 0 || result.CheckErrors > 0)
            {
                string first = result.Messages.FirstOrDefault(m => m.StartsWith("ERROR", StringComparison.Ordinal)) ?? result.Messages.FirstOrDefault() ?? "";
                _corruption = $"'{Path}': check finds {result.Corruptions} corruption(s) and {result.CheckErrors} error(s) (first: {first})";
            }
            else
            {
                _corruption = null;
            }
            return result;
        });
    }
}
