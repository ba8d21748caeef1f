namespace Vmsnap.Qcow2;

/// <summary>
/// Cluster allocation for the VM-state area open for writing. Host clusters come from large
/// contiguous reservations (refcounts raised once per reservation) and are handed to guest
/// clusters in the order writes arrive, so a sequential stream lands sequentially in the file; each
/// new guest cluster is linked into the active L2 table in memory at once, and the metadata reaches
/// the disk in batches (cache write-back, <see cref="Qcow2Engine.FlushAll"/>) in the engine's
/// crash-safe order. Data is written straight to the host clusters, outside the engine's lock.
/// The bytes of mapped clusters that were never written are zeroed when the area is flushed.
/// </summary>
/// <remarks>Mapping methods run under the engine's lock; the in-flight count has its own.</remarks>
internal sealed class VmStateAllocation
{
    private const long FirstReservationBytes = 8L << 20;
    private const long MaxReservationBytes = 512L << 20;
    private const long PreallocateAheadBytes = 64L << 20;

    private readonly Qcow2Engine _e;
    private readonly ClusterGeometry _g;
    private readonly List<Run> _map = [];                      // guest cluster runs (area-relative), sorted
    private readonly SortedList<long, long> _written = [];      // written byte ranges (area-relative): start -> end
    private readonly object _flight = new();
    private long _reservedNext, _reservedEnd;                   // host clusters [next, end) reserved, not yet mapped
    private long _nextReservation;
    private long _preallocatedEnd;                              // file offset up to which reserved clusters past the old end have blocks
    private bool _preallocateUnsupported;
    private int _inFlight;

    /// <summary>A run of guest clusters mapped to contiguous host clusters.</summary>
    private record struct Run(long Guest, long Host, long Count);

    internal VmStateAllocation(Qcow2Engine engine)
    {
        _e = engine;
        _g = engine.Geometry;
        Start = engine.VmStateOffset;
        _nextReservation = Math.Max(1, FirstReservationBytes >> _g.ClusterBits);
    }

    /// <summary>Guest offset of the area's first byte.</summary>
    internal long Start { get; }

    /// <summary>One past the highest byte written (or the length set).</summary>
    internal long Length { get; set; }

    /// <summary>Set once a snapshot took the area over: its clusters are the snapshot's now.</summary>
    internal string? CapturedBy { get; private set; }

    /// <summary>
    /// Maps [offset, offset + length) of the area to host ranges, allocating and linking the
    /// clusters not mapped yet. Call under the engine's lock.
    /// </summary>
    internal List<(long Host, int DataOffset, int Length)> Map(long offset, int length)
    {
        var segments = new List<(long Host, int DataOffset, int Length)>();
        int cs = _g.ClusterSize;
        long pos = offset, end = offset + length;
        while (pos < end)
        {
            long guest = pos >> _g.ClusterBits;
            long host = HostOf(guest);
            if (host < 0) host = MapNew(guest);
            int inCluster = (int)(pos & (cs - 1));
            int n = (int)Math.Min(end - pos, cs - inCluster);
            long hostByte = (host << _g.ClusterBits) + inCluster;
            int dataOffset = (int)(pos - offset);
            if (segments.Count > 0 && segments[^1].Host + segments[^1].Length == hostByte)
                segments[^1] = segments[^1] with { Length = segments[^1].Length + n };
            else
                segments.Add((hostByte, dataOffset, n));
            pos += n;
        }
        AddWritten(offset, end);
        Length = Math.Max(Length, end);
        return segments;
    }

    private int FindRun(long guest)
    {
        int lo = 0, hi = _map.Count - 1;
        while (lo <= hi)
        {
            int mid = (lo + hi) >> 1;
            Run r = _map[mid];
            if (guest < r.Guest) hi = mid - 1;
            else if (guest >= r.Guest + r.Count) lo = mid + 1;
            else return mid;
        }
        return ~lo;
    }

    private long HostOf(long guest)
    {
        int i = FindRun(guest);
        return i >= 0 ? _map[i].Host + (guest - _map[i].Guest) : -1;
    }

    private long MapNew(long guest)
    {
        if (_reservedNext == _reservedEnd)
        {
            // Tables first: L1 growth and the L2 tables this run will need land before it, not after
            // (where they would keep the file from being trimmed when the run's tail is given back).
            PrepareTables(guest, _nextReservation);
            Reserve();
        }
        long host = _reservedNext++;
        if ((host + 1) << _g.ClusterBits > _preallocatedEnd) Preallocate(host);
        int at = ~FindRun(guest);
        if (at > 0 && _map[at - 1].Guest + _map[at - 1].Count == guest && _map[at - 1].Host + _map[at - 1].Count == host)
            _map[at - 1] = _map[at - 1] with { Count = _map[at - 1].Count + 1 };
        else
            _map.Insert(at, new Run(guest, host, 1));
        Link(guest, host);
        return host;
    }

    private void PrepareTables(long guest, long count)
    {
        long first = Start + (guest << _g.ClusterBits), last = Start + ((guest + count) << _g.ClusterBits) - 1;
        for (long index = _g.L1Index(first); index <= _g.L1Index(last); index++) _e.GetWritableL2(index);
    }

    /// <summary>Reserves the next contiguous run of host clusters (each run twice the last, up to a limit).</summary>
    private void Reserve()
    {
        long count = _nextReservation;
        long first = _e.Refcounts.Allocate(count) >> _g.ClusterBits;
        _reservedNext = first;
        _reservedEnd = first + count;
        _preallocatedEnd = first << _g.ClusterBits;
        _nextReservation = Math.Min(count * 2, Math.Max(1, MaxReservationBytes >> _g.ClusterBits));
    }

    /// <summary>
    /// Gives the reserved clusters from <paramref name="host"/> on (up to a limit) disk blocks when
    /// they lie past the end of the file: O_DIRECT writes that extend a file are serialized by ext4,
    /// writes into allocated blocks run in parallel (as fio's preallocated file does).
    /// </summary>
    private void Preallocate(long host)
    {
        long start = host << _g.ClusterBits;
        long to = Math.Min(_reservedEnd << _g.ClusterBits, Math.Max(start + PreallocateAheadBytes, (host + 1) << _g.ClusterBits));
        _preallocatedEnd = to;
        if (_preallocateUnsupported || _e.Device is not Storage.FileBlockDevice file) return;
        long length = file.Length;
        if (to <= length) return;
        long from = Math.Max(length, start);
        if (!file.Preallocate(from, to - from)) _preallocateUnsupported = true;
    }

    /// <summary>Points the active L2 entry of an area cluster at its host cluster (in memory; written back in batches).</summary>
    private void Link(long guest, long host)
    {
        long guestOffset = Start + (guest << _g.ClusterBits);
        MetadataCache.Table table = _e.GetWritableL2(_g.L1Index(guestOffset));
        int index = _g.L2Index(guestOffset);
        L2Entry old = L2Entry.Read(table.Data, index, _g.ExtendedL2);
        ulong bitmap = _g.ExtendedL2 ? L2Entry.AllAllocated : 0;
        L2Entry.Write(table.Data, index, _g.ExtendedL2, new L2Entry((ulong)(host << _g.ClusterBits) | L2Entry.Copied, bitmap));
        _e.L2Cache.MarkDirty(table);
        if (old.Word != 0) _e.DropStorageOf(old, guestOffset);
    }

    /// <summary>Returns the reserved clusters not mapped yet (their refcounts drop back to 0). Call under the engine's lock.</summary>
    internal void ReleaseReservation()
    {
        if (_reservedNext == _reservedEnd) return;
        _e.Refcounts.Free(_reservedNext << _g.ClusterBits, (_reservedEnd - _reservedNext) << _g.ClusterBits);
        _reservedNext = _reservedEnd = 0;
    }

    private void AddWritten(long start, long end)
    {
        // Merge with every range that overlaps or touches [start, end).
        int i = LowerBound(start);
        if (i > 0 && _written.Values[i - 1] >= start) i--;
        while (i < _written.Count && _written.Keys[i] <= end)
        {
            start = Math.Min(start, _written.Keys[i]);
            end = Math.Max(end, _written.Values[i]);
            _written.RemoveAt(i);
        }
        _written.Add(start, end);
    }

    private int LowerBound(long key)
    {
        int lo = 0, hi = _written.Count;
        while (lo < hi)
        {
            int mid = (lo + hi) >> 1;
            if (_written.Keys[mid] < key) lo = mid + 1;
            else hi = mid;
        }
        return lo;
    }

    /// <summary>
    /// Zeroes the bytes of mapped clusters that no write covered (a reused cluster may hold old
    /// data), so the area reads as written-or-zero. Call under the engine's lock with no write in flight.
    /// </summary>
    internal void ZeroUnwritten()
    {
        byte[]? zeros = null;
        foreach (Run r in _map)
        {
            long start = r.Guest << _g.ClusterBits, end = (r.Guest + r.Count) << _g.ClusterBits;
            long pos = start;
            int i = LowerBound(start);
            if (i > 0 && _written.Values[i - 1] > start) i--;
            for (; pos < end; i++)
            {
                long gapEnd = i < _written.Count ? Math.Min(end, _written.Keys[i]) : end;
                if (gapEnd > pos)
                {
                    zeros ??= new byte[Math.Min(1 << 20, _g.ClusterSize)];
                    for (long p = pos; p < gapEnd; p += zeros.Length)
                    {
                        int n = (int)Math.Min(zeros.Length, gapEnd - p);
                        _e.Device.Write(zeros.AsSpan(0, n), (r.Host << _g.ClusterBits) + (p - start));
                    }
                }
                if (i >= _written.Count) break;
                pos = Math.Max(pos, _written.Values[i]);
            }
        }
        foreach (Run r in _map) AddWritten(r.Guest << _g.ClusterBits, (r.Guest + r.Count) << _g.ClusterBits);
    }

    /// <summary>
    /// Unlinks and frees the mapped clusters that lie wholly inside [offset, offset + length) (a
    /// range reaching the end of the area takes its last cluster too); when nothing stays mapped,
    /// the area's L2 tables go as well. Call under the engine's lock with no write in flight.
    /// </summary>
    internal void Discard(long offset, long length)
    {
        int cs = _g.ClusterSize;
        long end = length >= Length - offset ? long.MaxValue : offset + length;
        long first = (offset + cs - 1) >> _g.ClusterBits;
        long last = end == long.MaxValue ? long.MaxValue : (end >> _g.ClusterBits);   // exclusive
        var kept = new List<Run>();
        foreach (Run r in _map)
        {
            long a = Math.Max(r.Guest, first), b = Math.Min(r.Guest + r.Count, last);
            if (a >= b)
            {
                kept.Add(r);
                continue;
            }
            if (a > r.Guest) kept.Add(r with { Count = a - r.Guest });
            if (b < r.Guest + r.Count) kept.Add(new Run(b, r.Host + (b - r.Guest), r.Guest + r.Count - b));
            for (long g = a; g < b; g++) Unlink(g, r.Host + (g - r.Guest));
        }
        _map.Clear();
        _map.AddRange(kept);
        long from = first << _g.ClusterBits, to = last == long.MaxValue ? long.MaxValue : last << _g.ClusterBits;
        RemoveWritten(from, to);
        if (end == long.MaxValue) Length = Math.Min(Length, offset);
        if (_map.Count == 0)
        {
            ReleaseReservation();
            _e.DropEmptyTablesFrom(_g.L1Index(Start));
        }
    }

    private void Unlink(long guest, long host)
    {
        long guestOffset = Start + (guest << _g.ClusterBits);
        MetadataCache.Table table = _e.GetWritableL2(_g.L1Index(guestOffset));
        L2Entry.Write(table.Data, _g.L2Index(guestOffset), _g.ExtendedL2, new L2Entry(0, 0));
        _e.L2Cache.MarkDirty(table);
        _e.Refcounts.Free(host << _g.ClusterBits, _g.ClusterSize);
    }

    private void RemoveWritten(long from, long to)
    {
        var keep = new List<(long, long)>();
        foreach (KeyValuePair<long, long> w in _written)
        {
            if (w.Value <= from || w.Key >= to) { keep.Add((w.Key, w.Value)); continue; }
            if (w.Key < from) keep.Add((w.Key, from));
            if (w.Value > to) keep.Add((to, w.Value));
        }
        _written.Clear();
        foreach ((long s, long e) in keep) _written.Add(s, e);
    }

    /// <summary>Before a snapshot takes the area over: writes in flight done, what was never written zeroed, the reservation given back.</summary>
    internal void Quiesce()
    {
        WaitIdle();
        ZeroUnwritten();
        ReleaseReservation();
    }

    /// <summary>A snapshot took the area over: further writes are refused.</summary>
    internal void MarkCaptured(string snapshot) => CapturedBy = snapshot;

    // ---- writes in flight ---------------------------------------------------------------------

    internal void BeginWrite()
    {
        lock (_flight) _inFlight++;
    }

    internal void EndWrite()
    {
        lock (_flight)
        {
            if (--_inFlight == 0) Monitor.PulseAll(_flight);
        }
    }

    /// <summary>Waits until no data write of the area is in flight.</summary>
    internal void WaitIdle()
    {
        lock (_flight)
        {
            while (_inFlight > 0) Monitor.Wait(_flight);
        }
    }
}
