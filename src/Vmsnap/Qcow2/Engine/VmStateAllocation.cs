using Vmsnap.Storage.LowLevel;
using Vmsnap.Qcow2.LowLevel;

namespace Vmsnap.Qcow2;

/// <summary>
/// The VM-state area open for writing, kept apart from the image's metadata until a snapshot takes
/// it over. Host clusters come from large contiguous runs reserved at the free tail of the image,
/// in memory only (their refcounts stay 0 on disk), and are handed to area clusters in the order
/// writes arrive, so a sequential stream lands sequentially in the file. The map from area clusters
/// to host clusters lives here; the area's L2 tables get clusters of the same runs and are written
/// only when the snapshot is created, which counts them and the data in its one header switch.
/// Until then nothing the image's header reaches changes: a save that fails, is cut or is killed
/// leaves the image as it was, its data past the clusters in use (given back by trimming the file).
/// </summary>
/// <remarks>Mapping methods run under the engine's lock; the in-flight count has its own.</remarks>
internal sealed class VmStateAllocation
{
    private const long FirstReservationBytes = 8L << 20;
    private const long MaxReservationBytes = 512L << 20;

    private readonly Qcow2File _file;
    private readonly ClusterGeometry _g;
    private readonly RefcountManager _refcounts;
    private readonly List<Run> _map = [];                      // area cluster runs (area-relative), sorted
    private readonly SortedList<long, long> _written = [];      // written byte ranges (area-relative): start -> end
    private readonly SortedList<long, long> _tables = [];       // L1 index -> host cluster of the area's L2 table there
    private readonly object _flight = new();
    private long _reservedNext, _reservedEnd;                   // host clusters [next, end) reserved, not handed out yet
    private long _nextReservation;
    private long _preallocatedEnd;                              // file offset up to which reserved clusters past the old end have blocks
    private readonly Preallocation _preallocation = new();
    private int _inFlight;

    /// <summary>A run of area clusters mapped to contiguous host clusters.</summary>
    private record struct Run(long Guest, long Host, long Count);

    /// <param name="file">The image file the area's data and tables are written to.</param>
    /// <param name="geometry">The image's geometry.</param>
    /// <param name="refcounts">Where the area's clusters are reserved (in memory only).</param>
    /// <param name="start">Guest offset of the area (after the virtual disk).</param>
    internal VmStateAllocation(Qcow2File file, ClusterGeometry geometry, RefcountManager refcounts, long start)
    {
        _file = file;
        _g = geometry;
        _refcounts = refcounts;
        Start = start;
        _nextReservation = Math.Max(1, FirstReservationBytes >> _g.ClusterBits);
    }

    /// <summary>
    /// An area whose data was written outside the engine into the host clusters from
    /// <paramref name="firstHost"/> on, <paramref name="length"/> bytes (a <see cref="DetachedVmStateArea"/>): the
    /// clusters are reserved in memory, mapped in order, and counted as written; the L2 tables get
    /// clusters reserved at the free tail, past the region. Call under the engine's lock.
    /// </summary>
    internal static VmStateAllocation ForDetached(Qcow2File file, ClusterGeometry g, RefcountManager refcounts, long start, long firstHost, long length)
    {
        var area = new VmStateAllocation(file, g, refcounts, start) { IsDetached = true };
        long count = g.ClustersFor(length);
        refcounts.ReserveRange(firstHost, count);
        area._map.Add(new Run(0, firstHost, count));
        area.AddWritten(0, length);
        area.Length = length;
        long firstL1 = g.L1Index(area.Start), lastL1 = g.L1Index(area.Start + (count << g.ClusterBits) - 1);
        long tables = refcounts.ReserveTail(lastL1 - firstL1 + 1);
        for (long i = firstL1; i <= lastL1; i++) area._tables.Add(i, tables + (i - firstL1));
        return area;
    }

    /// <summary>Guest offset of the area's first byte.</summary>
    internal long Start { get; }

    /// <summary>True for an area written outside the engine and attached (<see cref="ForDetached"/>).</summary>
    internal bool IsDetached { get; private init; }

    /// <summary>One past the highest byte written (or the length set).</summary>
    internal long Length { get; set; }

    /// <summary>Set once a snapshot took the area over: its clusters are the snapshot's now.</summary>
    internal string? CapturedBy { get; private set; }

    /// <summary>One past the highest L1 index the area's tables need (0 when nothing is mapped).</summary>
    internal long L1End => _tables.Count == 0 ? 0 : _tables.Keys[^1] + 1;

    /// <summary>
    /// Maps [offset, offset + length) of the area to host ranges, taking host clusters for the area
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

    /// <summary>Describes [offset, offset + length) of the area for a read: host byte ranges, or -1 where nothing is mapped (zeroes). Under the engine's lock.</summary>
    internal List<(long Host, int DataOffset, int Length)> MapForRead(long offset, int length)
    {
        var segments = new List<(long Host, int DataOffset, int Length)>();
        int cs = _g.ClusterSize;
        long pos = offset, end = offset + length;
        while (pos < end)
        {
            long host = HostOf(pos >> _g.ClusterBits);
            int inCluster = (int)(pos & (cs - 1));
            int n = (int)Math.Min(end - pos, cs - inCluster);
            long hostByte = host < 0 ? -1 : (host << _g.ClusterBits) + inCluster;
            int dataOffset = (int)(pos - offset);
            (long Host, int DataOffset, int Length) last = segments.Count > 0 ? segments[^1] : default;
            if (segments.Count > 0 && (hostByte < 0 ? last.Host < 0 : last.Host >= 0 && last.Host + last.Length == hostByte))
                segments[^1] = last with { Length = last.Length + n };
            else
                segments.Add((hostByte, dataOffset, n));
            pos += n;
        }
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
        // The L2 table that will map this cluster gets a cluster of the run first (just before its data).
        long l1Index = _g.L1Index(Start + (guest << _g.ClusterBits));
        if (!_tables.ContainsKey(l1Index)) _tables.Add(l1Index, TakeCluster());
        long host = TakeCluster();
        int at = ~FindRun(guest);
        if (at > 0 && _map[at - 1].Guest + _map[at - 1].Count == guest && _map[at - 1].Host + _map[at - 1].Count == host)
            _map[at - 1] = _map[at - 1] with { Count = _map[at - 1].Count + 1 };
        else
            _map.Insert(at, new Run(guest, host, 1));
        return host;
    }

    private long TakeCluster()
    {
        if (_reservedNext == _reservedEnd) Reserve();
        long host = _reservedNext++;
        if ((host + 1) << _g.ClusterBits > _preallocatedEnd) Preallocate(host);
        return host;
    }

    /// <summary>Reserves the next contiguous run of host clusters at the free tail (each run twice the last, up to a limit); memory only.</summary>
    private void Reserve()
    {
        long count = _nextReservation;
        long first = _refcounts.ReserveTail(count);
        _reservedNext = first;
        _reservedEnd = first + count;
        _preallocatedEnd = first << _g.ClusterBits;
        _nextReservation = Math.Min(count * 2, Math.Max(1, MaxReservationBytes >> _g.ClusterBits));
    }

    /// <summary>Gives the reserved clusters from <paramref name="host"/> on (up to a limit) disk blocks when they lie past the end of the file (<see cref="Preallocation"/>).</summary>
    private void Preallocate(long host)
    {
        long start = host << _g.ClusterBits;
        long to = Math.Min(_reservedEnd << _g.ClusterBits, Math.Max(start + Preallocation.AheadBytes, (host + 1) << _g.ClusterBits));
        _preallocatedEnd = to;
        if (_preallocation.Unsupported || _file.Device is not FileBlockDevice file) return;
        long length = file.Length;
        if (to <= length) return;
        _preallocation.Allocate(file, Math.Max(length, start), to);
    }

    /// <summary>Gives every reserved cluster back, the ones mapped included (nothing was counted on disk). Call under the engine's lock.</summary>
    internal void ReleaseReservation()
    {
        _refcounts.ReleaseReserved();
        _reservedNext = _reservedEnd = 0;
        _preallocatedEnd = 0;
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
    /// Zeroes the bytes of mapped clusters that no write covered (the free tail may hold old bytes),
    /// so the area reads as written-or-zero. Call under the engine's lock with no write in flight.
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
                        _file.Write(zeros.AsSpan(0, n), (r.Host << _g.ClusterBits) + (p - start), Qcow2Metadata.None);
                    }
                }
                if (i >= _written.Count) break;
                pos = Math.Max(pos, _written.Values[i]);
            }
        }
        foreach (Run r in _map) AddWritten(r.Guest << _g.ClusterBits, (r.Guest + r.Count) << _g.ClusterBits);
    }

    /// <summary>
    /// Unmaps the area clusters that lie wholly inside [offset, offset + length) (a range reaching
    /// the end of the area takes its last cluster too); when nothing stays mapped, every reserved
    /// cluster goes back. Call under the engine's lock with no write in flight.
    /// </summary>
    internal void Discard(long offset, long length)
    {
        long end = length >= Length - offset ? long.MaxValue : offset + length;
        long first = (offset + _g.ClusterSize - 1) >> _g.ClusterBits;
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
        }
        _map.Clear();
        _map.AddRange(kept);
        long from = first << _g.ClusterBits, to = last == long.MaxValue ? long.MaxValue : last << _g.ClusterBits;
        RemoveWritten(from, to);
        if (end == long.MaxValue) Length = Math.Min(Length, offset);
        if (_map.Count == 0)
        {
            _tables.Clear();
            ReleaseReservation();
        }
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

    /// <summary>Before a snapshot takes the area over: writes in flight done, what was never written zeroed.</summary>
    internal void Quiesce()
    {
        WaitIdle();
        ZeroUnwritten();
    }

    /// <summary>
    /// Counts, in the snapshot's generation, one reference to each of the area's L2 tables and to
    /// each data cluster they map, and points the snapshot's L1 entries at the tables.
    /// </summary>
    internal void CountInto(MetadataGeneration gen, ulong[] snapshotL1)
    {
        foreach (KeyValuePair<long, long> t in _tables)
        {
            gen.Add(t.Value, +1);
            snapshotL1[t.Key] = (ulong)(t.Value << _g.ClusterBits);
        }
        foreach (Run r in _map) gen.AddRange(r.Host << _g.ClusterBits, r.Count << _g.ClusterBits, +1);
    }

    /// <summary>Writes the area's L2 tables into their (still uncounted) clusters, one at a time. Call under the engine's lock.</summary>
    internal void WriteTables()
    {
        byte[] table = new byte[_g.ClusterSize];
        long perTable = _g.L2Entries;
        int run = 0;
        foreach (KeyValuePair<long, long> t in _tables)
        {
            Array.Clear(table);
            // Area clusters this table maps: guest offsets [first, first + perTable clusters) of the image.
            long tableStart = t.Key * _g.BytesPerL2;
            long firstArea = (tableStart - Start) >> _g.ClusterBits, endArea = firstArea + perTable;
            while (run < _map.Count && _map[run].Guest + _map[run].Count <= firstArea) run++;
            for (int k = run; k < _map.Count && _map[k].Guest < endArea; k++)
            {
                Run r = _map[k];
                for (long g = Math.Max(r.Guest, firstArea); g < Math.Min(r.Guest + r.Count, endArea); g++)
                {
                    ulong word = (ulong)((r.Host + (g - r.Guest)) << _g.ClusterBits);
                    ulong bitmap = _g.ExtendedL2 ? L2Entry.AllAllocated : 0;
                    L2Entry.Write(table, (int)(g - firstArea), _g.ExtendedL2, new L2Entry(word, bitmap));
                }
            }
            _file.Write(table, t.Value << _g.ClusterBits, Qcow2Metadata.None);
        }
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
