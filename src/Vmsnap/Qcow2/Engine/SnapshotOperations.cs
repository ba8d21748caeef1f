using System.Text;
using Vmsnap.Storage;
using Vmsnap.Storage.LowLevel;

namespace Vmsnap.Qcow2;

/// <summary>
/// Internal snapshots (QEMU's qcow2-snapshot.c): create, delete, apply, the snapshot table's
/// lookups and checks, and the header switch. Each operation builds a <see cref="MetadataGeneration"/>
/// (refcounts counted per path as QEMU counts them, COPIED flags of the active tables exact for the
/// new counts) and switches to it with one header write. Each operation runs exclusively (no
/// request in flight) under the engine's lock.
/// </summary>
internal sealed class SnapshotOperations
{
    internal const int MaxSnapshotNameBytes = 255;   // what QEMU keeps of a name (QEMUSnapshotInfo.name)

    private readonly Qcow2File _file;
    private readonly Qcow2Header _header;
    private readonly ClusterGeometry _g;
    private readonly ClusterMapping _mapping;
    private readonly RefcountManager _refcounts;
    private readonly MetadataCaches _caches;
    private readonly SnapshotList _snapshots;
    private readonly VmStateSlots _vmState;
    private readonly RequestGate _gate;
    private readonly WriteGuard _guard;
    private readonly ImageHealth _health;

    /// <param name="file">The image file.</param>
    /// <param name="header">The header (switched in one write).</param>
    /// <param name="geometry">The image's geometry.</param>
    /// <param name="mapping">The active L1 table, the L2 cache, lookups and validation.</param>
    /// <param name="refcounts">Refcounts; each operation counts a new generation of them.</param>
    /// <param name="caches">Flushed before a generation is built.</param>
    /// <param name="snapshots">The snapshot list, replaced by each switch.</param>
    /// <param name="vmState">The VM-state area a create takes over, and the areas open for reading.</param>
    /// <param name="gate">Runs each operation with no request in flight.</param>
    /// <param name="guard">Whether the image may change, and what the first change does.</param>
    /// <param name="health">Corruption found, and a switch that failed.</param>
    internal SnapshotOperations(Qcow2File file, Qcow2Header header, ClusterGeometry geometry, ClusterMapping mapping, RefcountManager refcounts,
        MetadataCaches caches, SnapshotList snapshots, VmStateSlots vmState, RequestGate gate, WriteGuard guard, ImageHealth health)
    {
        _file = file;
        _header = header;
        _g = geometry;
        _mapping = mapping;
        _refcounts = refcounts;
        _caches = caches;
        _snapshots = snapshots;
        _vmState = vmState;
        _gate = gate;
        _guard = guard;
        _health = health;
    }

    private string Path => _health.Path;
    private IBlockDevice Device => _file.Device;
    private Qcow2Header Header => _header;
    private ClusterGeometry Geometry => _g;
    private L1Table ActiveL1 => _mapping.ActiveL1;
    private RefcountManager Refcounts => _refcounts;
    private MetadataCache L2Cache => _mapping.L2Cache;
    private List<SnapshotEntry> Snapshots => _snapshots.Entries;
    private long VirtualSize => (long)_header.Size;
    private Qcow2FormatException Corrupt(string structure, long? offset, string problem) => _health.Corrupt(structure, offset, problem);

    // ---- lookup and validation ----------------------------------------------------------------

    /// <summary>Index of the snapshot with this ID, else the first with this name (QEMU's order), else -1.</summary>
    internal int FindSnapshotIndex(string idOrName)
    {
        int byId = Snapshots.FindIndex(s => s.Id == idOrName);
        return byId >= 0 ? byId : Snapshots.FindIndex(s => s.Name == idOrName);
    }

    internal static string Describe(SnapshotEntry s) => $"snapshot {s.Id} ('{s.Name}')";

    private string SnapshotEntryName(int index) => $"snapshot table entry {index}";

    /// <summary>
    /// Refuses a snapshot table vmsnap must not change or look things up in: duplicate IDs, L1
    /// tables that are unaligned, too large or outside the file.
    /// </summary>
    internal void ValidateSnapshotTable()
    {
        var ids = new Dictionary<string, int>(StringComparer.Ordinal);
        long fileLength = Device.Length;
        for (int i = 0; i < Snapshots.Count; i++)
        {
            SnapshotEntry s = Snapshots[i];
            long? at = s.FileOffset >= 0 ? s.FileOffset : null;
            if (!ids.TryAdd(s.Id, i))
                throw Corrupt(SnapshotEntryName(i), at, $"has ID '{s.Id}', the same as entry {ids[s.Id]}; snapshot IDs must be unique");
            CheckSnapshotL1(s, i, fileLength);
        }
    }

    private void CheckSnapshotL1(SnapshotEntry s, int index, long fileLength)
    {
        long? at = s.FileOffset >= 0 ? s.FileOffset : null;
        if ((long)s.L1Size * 8 > ClusterGeometry.MaxL1Bytes)
            throw Corrupt(SnapshotEntryName(index), at, $"{Describe(s)}: L1 table of {s.L1Size} entries is larger than the {ClusterGeometry.MaxL1Bytes / 8} qcow2 allows");
        if (s.L1Size == 0) return;
        long o = s.L1TableOffset;
        if (o < 0 || (o & (Geometry.ClusterSize - 1)) != 0)
            throw Corrupt(SnapshotEntryName(index), at, $"{Describe(s)}: L1 table offset 0x{(ulong)o:x} is not aligned to a cluster");
        if (o < Geometry.ClusterSize)
            throw Corrupt(SnapshotEntryName(index), at, $"{Describe(s)}: L1 table offset 0x{o:x} lies in the header cluster");
        long bytes = s.L1Size * 8L;
        if (o >= fileLength || o + bytes - fileLength >= Geometry.ClusterSize)
            throw Corrupt(SnapshotEntryName(index), at, $"{Describe(s)}: L1 table at 0x{o:x} ({bytes} bytes) extends beyond the end of the file ({fileLength} bytes)");
    }

    /// <summary>A snapshot's L1 table, checked: within the file, every L2 table offset aligned and inside the file.</summary>
    internal L1Table ReadSnapshotL1(SnapshotEntry s)
    {
        int index = Snapshots.IndexOf(s);
        CheckSnapshotL1(s, index, Device.Length);
        L1Table l1 = _mapping.ReadL1Table(s.L1TableOffset, s.L1Size, $"{Describe(s)} L1 table");
        for (long i = 0; i < l1.Size; i++)
        {
            ulong entry = l1[i];
            if (entry == 0) continue;
            if ((entry & L1Entry.ReservedMask) != 0)
                throw Corrupt($"{Describe(s)} L1 table entry {i}", l1.Offset + i * 8, $"has reserved bits set (0x{entry:x16})");
            _mapping.ValidateL2Offset(l1, i, L1Entry.L2Offset(entry));
        }
        return l1;
    }

    private SnapshotEntry Lookup(string idOrName)
    {
        ArgumentNullException.ThrowIfNull(idOrName);
        ValidateSnapshotTable();
        int index = FindSnapshotIndex(idOrName);
        if (index < 0) throw new SnapshotNotFoundException(idOrName, Path);
        return Snapshots[index];
    }

    /// <summary>The new snapshot ID as QEMU picks it: the highest ID read as a number (like strtoul) plus one.</summary>
    internal string NewSnapshotId()
    {
        ulong max = 0;
        foreach (SnapshotEntry s in Snapshots) max = Math.Max(max, ParseIdLikeStrtoul(s.Id));
        return unchecked(max + 1).ToString(System.Globalization.CultureInfo.InvariantCulture);
    }

    /// <summary>C's strtoul(text, NULL, 10): leading blanks, an optional sign, digits; saturates; a minus negates.</summary>
    internal static ulong ParseIdLikeStrtoul(string text)
    {
        int i = 0;
        while (i < text.Length && text[i] is ' ' or '\t' or '\n' or '\v' or '\f' or '\r') i++;
        bool negative = false;
        if (i < text.Length && text[i] is '+' or '-') negative = text[i++] == '-';
        ulong value = 0;
        bool overflow = false;
        for (; i < text.Length && text[i] is >= '0' and <= '9'; i++)
        {
            ulong digit = (ulong)(text[i] - '0');
            if (value > (ulong.MaxValue - digit) / 10) overflow = true;
            else value = value * 10 + digit;
        }
        if (overflow) return ulong.MaxValue;
        return negative ? unchecked(0 - value) : value;
    }

    /// <summary>Refuses a snapshot name QEMU cannot keep (empty, longer than 255 bytes, a NUL).</summary>
    internal static void CheckSnapshotName(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        if (name.Length == 0) throw new ArgumentException("a snapshot needs a name");
        int bytes = Encoding.UTF8.GetByteCount(name);
        if (bytes > MaxSnapshotNameBytes)
            throw new ArgumentException($"snapshot name of {bytes} bytes is too long: QEMU keeps at most {MaxSnapshotNameBytes}");
        if (name.Contains('\0')) throw new ArgumentException("a snapshot name cannot contain a NUL character");
    }

    // ---- walking tables -----------------------------------------------------------------------

    /// <summary>An L2 table's bytes for a walk: the cached copy when there is one, else read without caching. Never modify.</summary>
    private byte[] ReadL2ForWalk(L1Table l1, long l1Index, long l2)
    {
        _mapping.ValidateL2Offset(l1, l1Index, l2);
        MetadataCache.Table? cached = L2Cache.Peek(l2);
        if (cached is not null) return cached.Data;
        byte[] data = new byte[Geometry.ClusterSize];
        int n = Device.Read(data, l2);
        if (n < data.Length) data.AsSpan(n).Clear();
        return data;
    }

    /// <summary>Adds <paramref name="delta"/> to every host cluster an L2 table references (one path through it).</summary>
    private void CountL2Path(MetadataGeneration gen, byte[] table, long l2Offset, long delta)
    {
        bool extended = Geometry.ExtendedL2;
        for (int j = 0; j < Geometry.L2Entries; j++)
        {
            L2Entry e = L2Entry.Read(table, j, extended);
            ClusterKind kind = e.Kind(extended);
            _mapping.ValidateEntry(e, kind, l2Offset, j);
            switch (kind)
            {
                case ClusterKind.Normal or ClusterKind.ZeroAllocated:
                    gen.Add(e.HostOffset >> Geometry.ClusterBits, delta);
                    break;
                case ClusterKind.Compressed:
                    (long offset, int length) = e.CompressedRange(Geometry);
                    gen.AddRange(offset, length, delta);
                    break;
            }
        }
    }

    /// <summary>Adds <paramref name="delta"/> for every path of <paramref name="l1"/>'s entries [first, end): the L2 tables and what they reference.</summary>
    private void CountL1Paths(MetadataGeneration gen, L1Table l1, long first, long end, long delta)
    {
        for (long i = first; i < Math.Min(end, l1.Size); i++)
        {
            long l2 = L1Entry.L2Offset(l1[i]);
            if (l2 == 0) continue;
            byte[] table = ReadL2ForWalk(l1, i, l2);
            CountL2Path(gen, table, l2, delta);
            gen.Add(l2 >> Geometry.ClusterBits, delta);
        }
    }

    /// <summary>
    /// Makes the COPIED flags of the new active tables exact for the new generation's refcounts:
    /// an L2 table whose data entries' flags are wrong is copied to a fresh cluster with the right
    /// flags (the active tables of the current generation are never rewritten), or rewritten in
    /// place when <paramref name="mayRewriteInPlace"/> says the current generation does not use it
    /// as active; then every L1 entry's flag is set from its table's refcount.
    /// </summary>
    private void FixActiveFlags(MetadataGeneration gen, L1Table source, ulong[] active, Func<long, bool>? mayRewriteInPlace = null)
    {
        bool extended = Geometry.ExtendedL2;
        var copies = new List<(long Index, long Old, byte[] Data)>();
        var rewritten = new HashSet<long>();
        for (long i = 0; i < active.Length; i++)
        {
            long l2 = L1Entry.L2Offset(active[i]);
            if (l2 == 0 || rewritten.Contains(l2)) continue;
            byte[] table = ReadL2ForWalk(source, i, l2);
            byte[]? corrected = null;
            for (int j = 0; j < Geometry.L2Entries; j++)
            {
                L2Entry e = L2Entry.Read(table, j, extended);
                if (e.Kind(extended) is not (ClusterKind.Normal or ClusterKind.ZeroAllocated)) continue;
                bool want = gen.Get(e.HostOffset >> Geometry.ClusterBits) == 1;
                if (want == e.IsCopied) continue;
                corrected ??= (byte[])table.Clone();
                L2Entry.Write(corrected, j, extended, e with { Word = want ? e.Word | L2Entry.Copied : e.Word & ~L2Entry.Copied });
            }
            if (corrected is null) continue;
            if (mayRewriteInPlace?.Invoke(l2) == true)
            {
                gen.RewriteInactiveL2(l2, corrected);
                rewritten.Add(l2);
            }
            else
            {
                copies.Add((i, l2, corrected));
            }
        }
        foreach ((long index, long old, byte[] data) in copies)
        {
            long fresh = gen.Allocate(1);
            gen.Write(fresh, data);
            gen.Add(old >> Geometry.ClusterBits, -1);
            active[index] = (ulong)fresh;
        }
        for (long i = 0; i < active.Length; i++)
        {
            long l2 = L1Entry.L2Offset(active[i]);
            if (l2 != 0) active[i] = L1Entry.Make(l2, copied: gen.Get(l2 >> Geometry.ClusterBits) == 1);
        }
    }

    private byte[] EncodeL1Padded(ulong[] entries)
    {
        byte[] bytes = new byte[Geometry.ClustersFor(entries.Length * 8L) << Geometry.ClusterBits];
        L1Entry.Encode(entries, bytes);
        return bytes;
    }

    private long WriteNewL1(MetadataGeneration gen, ulong[] entries)
    {
        if (entries.Length == 0) return (long)Header.L1TableOffset;
        long offset = gen.Allocate(Geometry.ClustersFor(entries.Length * 8L));
        gen.Write(offset, EncodeL1Padded(entries));
        return offset;
    }

    /// <summary>Writes the snapshot table for <paramref name="list"/> into fresh clusters (nothing when empty) and frees the current one.</summary>
    private (long Offset, long Bytes) WriteNewSnapshotTable(MetadataGeneration gen, List<SnapshotEntry> list)
    {
        if (Header.SnapshotCount > 0 && _snapshots.TableBytes > 0)
            gen.AddRange((long)Header.SnapshotsOffset, _snapshots.TableBytes, -1);
        if (list.Count == 0) return (0, 0);
        byte[] bytes = SnapshotTable.Encode(list);
        long clusters = Geometry.ClustersFor(bytes.Length);
        long offset = gen.Allocate(clusters);
        byte[] padded = new byte[clusters << Geometry.ClusterBits];
        bytes.CopyTo(padded, 0);
        gen.Write(offset, padded);
        return (offset, bytes.Length);
    }

    // ---- the switch ---------------------------------------------------------------------------

    /// <summary>
    /// Writes the generation, then switches the header (L1, refcount table and snapshot table
    /// fields) in one write and adopts the new state in memory, <paramref name="adopted"/> included:
    /// it runs as soon as the switch landed, so a failure of the flush after it still leaves the
    /// engine describing the image as it now is.
    /// </summary>
    private void Switch(MetadataGeneration gen, ulong[]? newActive, long newActiveOffset, List<SnapshotEntry>? newSnapshots, (long Offset, long Bytes) newTable,
        Action? adopted = null)
    {
        Qcow2Header h = PrepareSwitch(gen, newActive, newActiveOffset, newSnapshots, newTable);
        CompleteSwitch(gen, h, newActive, newActiveOffset, newSnapshots, newTable, adopted);
    }

    /// <summary>The header the generation switches to (it is prepared: nothing more is allocated in it).</summary>
    private Qcow2Header PrepareSwitch(MetadataGeneration gen, ulong[]? newActive, long newActiveOffset, List<SnapshotEntry>? newSnapshots, (long Offset, long Bytes) newTable)
    {
        Qcow2Header h = Header.Clone();
        if (newActive is not null)
        {
            h.L1Size = (uint)newActive.Length;
            h.L1TableOffset = (ulong)newActiveOffset;
        }
        if (newSnapshots is not null)
        {
            h.SnapshotCount = (uint)newSnapshots.Count;
            h.SnapshotsOffset = (ulong)newTable.Offset;
        }
        gen.Prepare(h);
        return h;
    }

    /// <summary>Writes a prepared generation, switches the header to <paramref name="h"/> in one write and adopts it (see <see cref="Switch"/>).</summary>
    private void CompleteSwitch(MetadataGeneration gen, Qcow2Header h, ulong[]? newActive, long newActiveOffset, List<SnapshotEntry>? newSnapshots,
        (long Offset, long Bytes) newTable, Action? adopted = null, bool trim = true)
    {
        _guard.BeforeFirstChange();
        gen.WriteOut();
        byte[] before = MetadataGeneration.SwitchBytes(Header);
        byte[] after = MetadataGeneration.SwitchBytes(h);
        try
        {
            _file.WriteHeader(after, MetadataGeneration.SwitchOffset);
        }
        catch (Exception e) when (e is VmsnapException or IOException)
        {
            if (!SwitchLanded(before, after, e)) throw;
        }

        Header.L1Size = h.L1Size;
        Header.L1TableOffset = h.L1TableOffset;
        Header.RefcountTableOffset = h.RefcountTableOffset;
        Header.RefcountTableClusters = h.RefcountTableClusters;
        Header.SnapshotCount = h.SnapshotCount;
        Header.SnapshotsOffset = h.SnapshotsOffset;
        if (newActive is not null) ActiveL1.Replace(newActiveOffset, newActive);
        Refcounts.Adopt(gen.Refcounts);
        if (newSnapshots is not null)
        {
            _snapshots.Set(newSnapshots, newTable.Bytes);
            long at = newTable.Offset;
            foreach (SnapshotEntry e in newSnapshots)
            {
                e.FileOffset = at;   // where error messages find the entry now
                at += e.EncodedLength;
            }
        }
        L2Cache.Clear();   // clean since the flush that started the operation; tables may have moved or changed
        _mapping.ForgetValidatedTables();
        adopted?.Invoke();
        _file.Flush();
        // Only now: until the switch is durable the old generation may still use the clusters at the end.
        if (trim) _refcounts.TrimFreeTail();
    }

    /// <summary>After a failed header write: true when the new bytes are there anyway, false when the old ones are; otherwise the image is left alone.</summary>
    private bool SwitchLanded(byte[] before, byte[] after, Exception error)
    {
        byte[] now = new byte[before.Length];
        try
        {
            if (Device.Read(now, MetadataGeneration.SwitchOffset) != now.Length) throw new Storage.StorageException("short read");
        }
        catch (Exception e) when (e is VmsnapException or IOException)
        {
            _health.SwitchFailure = $"the header switch failed ({error.Message}) and the header cannot be read back ({e.Message})";
            return false;
        }
        if (now.AsSpan().SequenceEqual(after)) return true;
        if (!now.AsSpan().SequenceEqual(before))
            _health.SwitchFailure = $"the header switch failed halfway ({error.Message})";
        return false;
    }

    /// <summary>What every snapshot operation needs first: a writable image, metadata on disk (a VM-state area being written keeps its reservation: generations do not allocate there).</summary>
    private void PrepareGeneration()
    {
        _health.ThrowIfSwitchFailed();
        _guard.EnsureWritable();
        _caches.FlushAll();
    }

    // ---- operations ---------------------------------------------------------------------------

    /// <summary>Creates a snapshot of the active disk (and of the VM state written so far, up to <see cref="Qcow2SnapshotCreateOptions.VmStateSize"/>).</summary>
    internal SnapshotEntry CreateSnapshot(string name, Qcow2SnapshotCreateOptions options) => _gate.RunExclusive(() =>
    {
        CheckSnapshotName(name);
        ArgumentOutOfRangeException.ThrowIfNegative(options.VmStateSize, "options.VmStateSize");
        ArgumentOutOfRangeException.ThrowIfNegative(options.VmClock, "options.VmClock");
        if (options.ExtraData.Length > SnapshotEntry.MaxExtraDataSize - SnapshotEntry.KnownExtraDataSize)
            throw new ArgumentOutOfRangeException(nameof(options), options.ExtraData.Length,
                $"a snapshot's extra data past QEMU's fields holds at most {SnapshotEntry.MaxExtraDataSize - SnapshotEntry.KnownExtraDataSize} bytes");
        ValidateSnapshotTable();
        int same = Snapshots.FindIndex(s => s.Name == name);
        if (same >= 0) throw new SnapshotExistsException(name, Snapshots[same].Id, Path, $"'{Path}' already has a snapshot named '{name}' (ID {Snapshots[same].Id})");
        if (Snapshots.Count >= SnapshotTable.MaxSnapshots)
            throw new OperationRefusedException($"'{Path}' already has {Snapshots.Count} snapshots, the most qcow2 allows");
        DateTimeOffset date = options.Date ?? DateTimeOffset.UtcNow;
        long unixSeconds = date.ToUnixTimeSeconds();
        if (unixSeconds is < 0 or > uint.MaxValue)
            throw new ArgumentOutOfRangeException(nameof(options), date, "the date must lie between 1970 and 2106 (qcow2 keeps 32-bit seconds)");
        PrepareGeneration();
        bool withVmState = options.VmStateSize > 0;
        VmStateAllocation? captured = withVmState ? _vmState.Writer : null;
        captured?.Quiesce();   // its data complete and zero-filled before the snapshot can point to it

        var entry = new SnapshotEntry
        {
            Id = NewSnapshotId(),
            Name = name,
            DateSeconds = (uint)unixSeconds,
            DateNanoseconds = (uint)((date.UtcTicks % TimeSpan.TicksPerSecond) / 10 * 1000),   // microseconds, as QEMU keeps them
            VmClockNanoseconds = (ulong)options.VmClock,
            VmStateSizeLarge = (ulong)options.VmStateSize,
            VmStateSize32 = options.VmStateSize <= uint.MaxValue ? (uint)options.VmStateSize : 0,
            DiskSize = (ulong)VirtualSize,
            Icount = options.Icount,
            UnknownExtraData = options.ExtraData.ToArray(),
        };

        // The snapshot's L1 table is a copy of the active one: it shares the disk's L2 tables and,
        // for a disk-only snapshot, the VM-state range too (QEMU's snapshot takes the whole table).
        // Every new path through a shared table is counted; the active disk continues in a new L1
        // table whose entries are not COPIED any more.
        var gen = new MetadataGeneration(_file, _refcounts);
        long diskEntries = Math.Min(Geometry.L1EntriesFor(VirtualSize), ActiveL1.Size);
        long sharedEnd = withVmState ? diskEntries : ActiveL1.Size;
        List<long> changed = CountSharedPaths(gen, sharedEnd);
        long snapshotSize = Math.Max(ActiveL1.Size, captured?.L1End ?? 0);
        var snapshotL1 = new ulong[snapshotSize];
        var active = (ulong[])ActiveL1.Entries.Clone();
        for (long i = 0; i < sharedEnd; i++) snapshotL1[i] = active[i] = ActiveL1[i] & ~L1Entry.Copied;
        if (withVmState)
        {
            if (captured is not null)
            {
                // The snapshot takes the area's own new tables; whatever the active table mapped past
                // the disk (an earlier apply's VM state) goes.
                CountL1Paths(gen, ActiveL1, diskEntries, ActiveL1.Size, -1);
                captured.CountInto(gen, snapshotL1);
            }
            else
            {
                // No area: the VM state is what the active table maps past the disk (written as QEMU's savevm does); it moves to the snapshot.
                for (long i = diskEntries; i < ActiveL1.Size; i++) snapshotL1[i] = ActiveL1[i] & ~L1Entry.Copied;
            }
            Array.Clear(active, (int)diskEntries, active.Length - (int)diskEntries);
        }
        entry.L1Size = (uint)snapshotSize;
        entry.L1TableOffset = snapshotSize == 0 ? 0 : WriteNewL1(gen, snapshotL1);
        if (ActiveL1.Size > 0) gen.AddRange(ActiveL1.Offset, ActiveL1.Size * 8L, -1);
        long activeOffset = WriteNewL1(gen, active);
        var list = new List<SnapshotEntry>(Snapshots) { entry };
        (long Offset, long Bytes) table = WriteNewSnapshotTable(gen, list);
        Qcow2Header final = PrepareSwitch(gen, active, activeOffset, list, table);

        // Everything is counted and checked: from here on the image changes.
        captured?.WriteTables();
        if (changed.Count > 0) ClearCopiedInPlace(gen, changed);
        CompleteSwitch(gen, final, active, activeOffset, list, table, () =>
        {
            if (captured is null) return;
            captured.MarkCaptured(name);   // its clusters are the snapshot's now
            _vmState.Writer = null;
            Refcounts.ReleaseReserved();
        });
        return entry;
    });

    /// <summary>
    /// Counts one more path through each active L2 table of L1 entries [0, <paramref name="end"/>)
    /// (the table and what it references); returns the L1 indices of the tables holding COPIED data
    /// entries, which the new generation needs cleared.
    /// </summary>
    private List<long> CountSharedPaths(MetadataGeneration gen, long end)
    {
        var changed = new List<long>();
        bool extended = Geometry.ExtendedL2;
        for (long i = 0; i < end; i++)
        {
            long l2 = L1Entry.L2Offset(ActiveL1[i]);
            if (l2 == 0) continue;
            byte[] table = ReadL2ForWalk(ActiveL1, i, l2);
            CountL2Path(gen, table, l2, +1);
            gen.Add(l2 >> Geometry.ClusterBits, +1);
            bool anyCopied = false;
            for (int j = 0; j < Geometry.L2Entries && !anyCopied; j++)
            {
                L2Entry e = L2Entry.Read(table, j, extended);
                anyCopied = e.IsCopied && e.Kind(extended) is ClusterKind.Normal or ClusterKind.ZeroAllocated;
            }
            if (!anyCopied) continue;
            // COPIED entries say the table is this L1 entry's alone.
            if (!L1Entry.IsCopied(ActiveL1[i]) || Refcounts.Get(l2 >> Geometry.ClusterBits) != 1)
                throw _health.WriteRefused($"L1 table entry {i}", ActiveL1.Offset + i * 8,
                    $"points to the L2 table at 0x{l2:x}, which has COPIED entries but is shared (refcount {Refcounts.Get(l2 >> Geometry.ClusterBits)})");
            changed.Add(i);
        }
        return changed;
    }

    /// <summary>
    /// Clears the COPIED flags of the active L2 tables at <paramref name="indices"/> in place, so the
    /// final generation (<paramref name="final"/>, prepared) can share them without copies. A table
    /// the live generation uses as active cannot change under it, so an intermediate generation
    /// first moves the active L1 entries to identical copies (a switch of its own, one header write);
    /// the originals, free in it, are then rewritten, and the final switch points back at them and
    /// frees the copies. Every state on disk is a whole, consistent generation.
    /// </summary>
    private void ClearCopiedInPlace(MetadataGeneration final, List<long> indices)
    {
        var detour = new MetadataGeneration(_file, _refcounts, final.AllocatedHere);
        var moved = (ulong[])ActiveL1.Entries.Clone();
        var tables = new List<(long Original, long Copy)>();
        foreach (long i in indices)
        {
            long original = L1Entry.L2Offset(ActiveL1[i]);
            long copy = detour.Allocate(1);
            detour.Add(original >> Geometry.ClusterBits, -1);
            moved[i] = L1Entry.Make(copy, copied: true);
            tables.Add((original, copy));
        }
        detour.AddRange(ActiveL1.Offset, ActiveL1.Size * 8L, -1);
        long movedOffset = WriteNewL1(detour, moved);
        Qcow2Header h = PrepareSwitch(detour, moved, movedOffset, null, default);
        foreach ((long original, long copy) in tables) _file.Write(ReadCluster(original), copy, Qcow2Metadata.None);   // free until the switch
        CompleteSwitch(detour, h, moved, movedOffset, null, default, trim: false);

        bool extended = Geometry.ExtendedL2;
        foreach ((long original, _) in tables)
        {
            byte[] data = ReadCluster(original);   // free now, and unchanged
            for (int j = 0; j < Geometry.L2Entries; j++)
            {
                L2Entry e = L2Entry.Read(data, j, extended);
                if (e.IsCopied && e.Kind(extended) is ClusterKind.Normal or ClusterKind.ZeroAllocated)
                    L2Entry.Write(data, j, extended, e with { Word = e.Word & ~L2Entry.Copied });
            }
            _file.Write(data, original, Qcow2Metadata.None);   // free in the generation now live
        }
    }

    private byte[] ReadCluster(long offset)
    {
        byte[] data = new byte[Geometry.ClusterSize];
        int n = Device.Read(data, offset);
        if (n < data.Length) data.AsSpan(n).Clear();
        return data;
    }

    /// <summary>Deletes a snapshot: the table without it, then everything only it used is free (its VM state included).</summary>
    internal SnapshotEntry DeleteSnapshot(string idOrName) => _gate.RunExclusive(() =>
    {
        SnapshotEntry sn = Lookup(idOrName);
        if (_vmState.Readers.GetValueOrDefault(sn.L1TableOffset) > 0)
            throw new OperationRefusedException($"'{Path}': {Describe(sn)} cannot be deleted while its VM state is open for reading");
        L1Table l1 = ReadSnapshotL1(sn);   // bad input is refused before anything is written
        PrepareGeneration();

        var gen = new MetadataGeneration(_file, _refcounts);
        CountL1Paths(gen, l1, 0, l1.Size, -1);
        if (sn.L1Size > 0) gen.AddRange(sn.L1TableOffset, sn.L1Size * 8L, -1);
        var active = (ulong[])ActiveL1.Entries.Clone();
        FixActiveFlags(gen, ActiveL1, active);
        bool activeChanged = !active.AsSpan().SequenceEqual(ActiveL1.Entries);
        long activeOffset = ActiveL1.Offset;
        if (activeChanged)
        {
            gen.AddRange(ActiveL1.Offset, ActiveL1.Size * 8L, -1);
            activeOffset = WriteNewL1(gen, active);
        }
        // The entries left are written the way QEMU writes a snapshot table: each with its complete
        // extra data, so that a version 3 image loses entries qemu-img check calls incomplete.
        var list = Snapshots.Where(s => s != sn).Select(s => s.WithCompleteExtraData(VirtualSize)).ToList();
        (long Offset, long Bytes) table = WriteNewSnapshotTable(gen, list);
        Switch(gen, activeChanged ? active : null, activeOffset, list, table);
        return sn;
    });

    /// <summary>Makes a snapshot's disk the active disk (like <c>qemu-img snapshot -a</c>); the snapshot stays.</summary>
    internal SnapshotEntry ApplySnapshot(string idOrName, bool withVmState) => _gate.RunExclusive(() =>
    {
        SnapshotEntry sn = Lookup(idOrName);
        if (_vmState.Writer is not null)
            throw new OperationRefusedException($"'{Path}': close the VM-state area open for writing before applying {Describe(sn)}");
        long diskSize = sn.DiskSize is ulong d ? (long)d : VirtualSize;
        if (diskSize != VirtualSize)
            throw new OperationRefusedException($"'{Path}': {Describe(sn)} was taken of a disk of {diskSize} bytes and the disk now has {VirtualSize} bytes; snapshots of another disk size cannot be applied (QEMU refuses them too)");
        L1Table l1 = ReadSnapshotL1(sn);   // bad input is refused before anything is written
        if (!withVmState && l1.Size > Geometry.L1EntriesFor(VirtualSize))
            l1 = l1.Prefix((int)Geometry.L1EntriesFor(VirtualSize));   // the disk's range only: its entries past the disk stay the snapshot's alone
        PrepareGeneration();

        // The new active table is the snapshot's whole L1 table, VM-state range included, as QEMU's
        // apply makes it (padded with zeroes to the current size when the snapshot's is smaller);
        // without the VM state, the disk's range of it.
        var gen = new MetadataGeneration(_file, _refcounts);
        var active = new ulong[Math.Max(ActiveL1.Size, l1.Size)];
        for (long i = 0; i < l1.Size; i++) active[i] = l1[i] & ~L1Entry.Copied;
        // Only the final counts reach the disk, so the old active paths go first: a narrow refcount
        // (2 bits, say) that holds the final count must not overflow on the way.
        CountL1Paths(gen, ActiveL1, 0, ActiveL1.Size, -1);
        gen.AddRange(ActiveL1.Offset, ActiveL1.Size * 8L, -1);
        CountL1Paths(gen, l1, 0, l1.Size, +1);
        var current = new HashSet<long>();
        for (long i = 0; i < ActiveL1.Size; i++)
            if (L1Entry.L2Offset(ActiveL1[i]) is long t and not 0) current.Add(t);
        // The snapshot's own tables are not active yet: their COPIED flags may be corrected in place.
        FixActiveFlags(gen, l1, active, l2 => !current.Contains(l2));
        long activeOffset = WriteNewL1(gen, active);
        Switch(gen, active, activeOffset, null, default, () => _mapping.RefreshActiveSharing(FindActiveDuplicates()));
        return sn;
    });

    /// <summary>Host clusters more than one active L2 entry references (rare: only after check repaired such sharing).</summary>
    private HashSet<long> FindActiveDuplicates()
    {
        var seen = new HashSet<long>();
        var duplicates = new HashSet<long>();
        for (long i = 0; i < ActiveL1.Size; i++)
        {
            long l2 = L1Entry.L2Offset(ActiveL1[i]);
            if (l2 == 0) continue;
            byte[] table = ReadL2ForWalk(ActiveL1, i, l2);
            for (int j = 0; j < Geometry.L2Entries; j++)
            {
                L2Entry e = L2Entry.Read(table, j, Geometry.ExtendedL2);
                if (e.Kind(Geometry.ExtendedL2) is not (ClusterKind.Normal or ClusterKind.ZeroAllocated)) continue;
                long c = e.HostOffset >> Geometry.ClusterBits;
                if (!seen.Add(c)) duplicates.Add(c);
            }
        }
        return duplicates;
    }
}
