using Kind = Vmsnap.Qcow2.Qcow2CheckFindingKind;

using System.Buffers.Binary;

namespace Vmsnap.Qcow2;

// Reference counts rebuilt in memory and compared with the stored ones (QEMU's
// qcow2_check_refcounts and the functions it calls), and the COPIED flags of the active tables.
internal sealed partial class Qcow2Checker
{
    private ReferenceCounts _counts = new(0);
    private long _clusters;          // entries of the in-memory refcounts (QEMU's nb_clusters): grows past the file end if references do
    private long _fileLength;
    private bool _rebuild;
    private long _totalClusters, _allocated, _fragmented, _compressed, _highest, _imageEnd;
    private ulong[] _activeSeen = [];
    private readonly HashSet<long> _activeDuplicates = [];

    private void CheckRefcounts()
    {
        _fileLength = _file.Device.Length;
        long clusters = _g.ClustersFor(_fileLength);
        _totalClusters = _g.ClustersFor((long)H.Size);
        if (clusters > int.MaxValue)
        {
            _res.CheckErrors++;
            throw new CheckFailedException($"the image file has {clusters} clusters, more than a check can count");
        }
        _counts = new ReferenceCounts(_g.RefcountOrder);
        Grow(clusters);
        CalculateRefcounts(_mode);

        // Without a rebuild, a repair compares again from the figures before this comparison.
        Tally preCompare = _res.Copy();
        CompareRefcounts(Qcow2RepairMode.None);

        if (_rebuild && FixErrors)
        {
            Tally old = _res.Copy();
            Report(Kind.Repair, "Rebuilding refcount structure");
            RebuildRefcountStructure();
            _res.Corruptions = 0;
            _res.Leaks = 0;
            // The header points to the new structure: count again (the old one is now leaked, and freed below).
            _rebuild = false;
            _counts.Clear();
            _fileLength = _file.Device.Length;
            CalculateRefcounts(Qcow2RepairMode.None);
            Tally saved = _res;
            _res = new Tally();
            CompareRefcounts(Qcow2RepairMode.Leaks);
            if (_rebuild) Report(Kind.Error, "ERROR rebuilt refcount structure is still broken");
            int freshLeaks = _res.Leaks;   // leaks the rebuild made and could not free
            _res = saved;
            if (_res.Corruptions < old.Corruptions) _res.CorruptionsFixed += old.Corruptions - _res.Corruptions;
            if (_res.Leaks < old.Leaks) _res.LeaksFixed += old.Leaks - _res.Leaks;
            _res.Leaks += freshLeaks;
        }
        else if (_mode != Qcow2RepairMode.None)
        {
            if (_rebuild)
            {
                Report(Kind.Error, "ERROR need to rebuild refcount structures");
                _res.CheckErrors++;
                throw new CheckFailedException("the refcount structure needs to be rebuilt, which only a repair of all errors does");
            }
            if (_res.Leaks > 0 || _res.Corruptions > 0)
            {
                _res = preCompare;
                CompareRefcounts(_mode);
            }
        }

        CheckOflagCopied();
        _imageEnd = (_highest + 1) * ClusterSize;
    }

    // ---- in-memory refcounts --------------------------------------------------------------------

    /// <summary>Counts one reference to every cluster of [offset, offset + size) (QEMU's qcow2_inc_refcounts_imrt).</summary>
    private void Inc(long offset, long size)
    {
        if (size <= 0) return;
        // The file's last cluster may be partly missing; a reference a whole cluster past the end is not.
        if (offset < 0 || (Int128)offset + size - _fileLength >= ClusterSize)
        {
            Report(Kind.Error, $"ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x{(ulong)offset:x} size 0x{size:x}");
            _res.Corruptions++;
            return;
        }
        long first = offset >> _g.ClusterBits, last = (offset + size - 1) >> _g.ClusterBits;
        for (long k = first; k <= last; k++)
        {
            if (k >= _clusters) Grow(k + 1);
            ulong count = _counts[k];
            if (count == _g.RefcountMax)
            {
                Report(Kind.Error, $"ERROR: overflow cluster offset=0x{k << _g.ClusterBits:x}");
                Report(Kind.Note, "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing");
                _res.Corruptions++;
                continue;
            }
            _counts[k] = count + 1;
        }
    }

    /// <summary>Makes the in-memory refcounts cover <paramref name="clusters"/> entries (QEMU: ENOMEM, a check error, when it cannot).</summary>
    private void Grow(long clusters)
    {
        if (!_counts.TryReserve(clusters)) throw OutOfCountMemory(clusters);
        _clusters = Math.Max(_clusters, clusters);
    }

    /// <summary>The in-memory refcounts cannot describe that many clusters (QEMU: ENOMEM, a check error).</summary>
    private CheckFailedException OutOfCountMemory(long clusters)
    {
        _res.CheckErrors++;
        return new CheckFailedException($"checking needs a reference count for each of {clusters} clusters, more than vmsnap can hold in memory");
    }

    private ulong Count(long cluster) => cluster < _clusters ? _counts[cluster] : 0;

    /// <summary>Counts the header, the active and snapshot tables, the snapshot table, the refcount structure and bitmaps (QEMU's calculate_refcounts).</summary>
    private void CalculateRefcounts(Qcow2RepairMode mode)
    {
        Inc(0, ClusterSize);
        CheckL1((long)H.L1TableOffset, H.L1Size, mode, active: true);
        foreach (SnapshotEntry sn in _snapshots)
        {
            if ((sn.L1TableOffset & (ClusterSize - 1)) != 0)
            {
                Report(Kind.Error, $"ERROR snapshot {sn.Id} ({sn.Name}) l1_offset=0x{(ulong)sn.L1TableOffset:x}: L1 table is not cluster aligned; snapshot table entry corrupted");
                _res.Corruptions++;
                continue;
            }
            if ((long)sn.L1Size * 8 > ClusterGeometry.MaxL1Bytes)
            {
                Report(Kind.Error, $"ERROR snapshot {sn.Id} ({sn.Name}) l1_size=0x{sn.L1Size:x}: L1 table is too large; snapshot table entry corrupted");
                _res.Corruptions++;
                continue;
            }
            CheckL1(sn.L1TableOffset, sn.L1Size, mode, active: false);
        }
        Inc(_snapshotsOffset, _snapshotsSize);
        Inc((long)H.RefcountTableOffset, (long)H.RefcountTableClusters * ClusterSize);
        CountBitmaps();
        CheckRefblocks(mode);
    }

    /// <summary>Counts an L1 table, its L2 tables and what they reference (QEMU's check_refcounts_l1); the active one also gives the allocation figures.</summary>
    private void CheckL1(long offset, uint size, Qcow2RepairMode mode, bool active)
    {
        if (size == 0) return;
        Inc(offset, size * 8L);
        byte[]? raw = TryRead(offset, size * 8L);
        if (raw is null)
        {
            Report(Kind.Error, "ERROR: I/O error in check_refcounts_l1");
            _res.CheckErrors++;
            throw new CheckFailedException($"the {(active ? "active" : "snapshot")} L1 table at 0x{(ulong)offset:x} cannot be read");
        }
        for (int i = 0; i < size; i++)
        {
            ulong entry = BinaryPrimitives.ReadUInt64BigEndian(raw.AsSpan(i * 8));
            if (entry == 0) continue;
            if ((entry & L1Entry.ReservedMask) != 0)
            {
                Report(Kind.Error, $"ERROR found L1 entry with reserved bits set: {entry:x}");
                _res.Corruptions++;
            }
            long l2 = L1Entry.L2Offset(entry);
            Inc(l2, ClusterSize);
            if ((l2 & (ClusterSize - 1)) != 0)
            {
                Report(Kind.Error, $"ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted");
                _res.Corruptions++;
            }
            CheckL2(l2, mode, active);
        }
    }

    /// <summary>Counts what an L2 table references and checks its entries (QEMU's check_refcounts_l2); read where the L1 entry points, aligned or not.</summary>
    private void CheckL2(long l2Offset, Qcow2RepairMode mode, bool active)
    {
        byte[]? table = TryRead(l2Offset, ClusterSize);
        if (table is null)
        {
            Report(Kind.Error, "ERROR: I/O error in check_refcounts_l2");
            _res.CheckErrors++;
            throw new CheckFailedException($"the L2 table at 0x{l2Offset:x} cannot be read");
        }
        long nextContiguous = 0;
        bool extended = _g.ExtendedL2;
        for (int i = 0; i < _g.L2Entries; i++)
        {
            L2Entry e = L2Entry.Read(table, i, extended);
            ClusterKind kind = e.Kind(extended);
            if (kind != ClusterKind.Compressed && (e.Word & L2Entry.StandardReservedMask) != 0)
            {
                Report(Kind.Error, $"ERROR found l2 entry with reserved bits set: {e.Word:x}");
                _res.Corruptions++;
            }
            switch (kind)
            {
                case ClusterKind.Compressed:
                    if (e.IsCopied)
                    {
                        Report(Kind.Error, $"ERROR: coffset=0x{e.Word & _g.CompressedOffsetMask:x}: copied flag must never be set for compressed clusters");
                        e = e with { Word = e.Word & ~L2Entry.Copied };
                        _res.Corruptions++;
                    }
                    if (e.Bitmap != 0)
                    {
                        Report(Kind.Error, $"ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry=0x{e.Word:x}");
                        _res.Corruptions++;
                        break;
                    }
                    (long coffset, int csize) = e.CompressedRange(_g);
                    Inc(coffset, csize);
                    if (active)
                    {
                        // Compressed clusters count as fragmented by nature (QEMU's convention).
                        _allocated++;
                        _compressed++;
                        _fragmented++;
                    }
                    break;

                case ClusterKind.ZeroAllocated or ClusterKind.Normal:
                    long offset = e.HostOffset;
                    if (((e.Bitmap >> 32) & e.Bitmap) != 0)
                    {
                        _res.Corruptions++;
                        Report(Kind.Error, $"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap");
                    }
                    if ((offset & (ClusterSize - 1)) != 0)
                    {
                        _res.Corruptions++;
                        bool containsData = extended ? (e.Bitmap & L2Entry.AllAllocated) != 0 : (e.Word & L2Entry.ZeroFlag) == 0;
                        if (!containsData)
                        {
                            bool fix = mode == Qcow2RepairMode.All;
                            RepairingOrError(fix, $"offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.");
                            // Nothing is lost by making it a plain zero cluster; the cluster it pointed into is then a leak.
                            if (fix && FixL2EntryByZero(l2Offset, table, i, active)) continue;
                        }
                        else
                        {
                            Report(Kind.Error, $"ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted.");
                        }
                    }
                    if (active)
                    {
                        _allocated++;
                        if (nextContiguous != 0 && offset != nextContiguous) _fragmented++;
                        nextContiguous = offset + ClusterSize;
                        NoteActiveReference(offset);
                    }
                    Inc(offset, ClusterSize);
                    break;

                case ClusterKind.Unallocated when (e.Bitmap & L2Entry.AllAllocated) != 0:
                    _res.Corruptions++;
                    Report(Kind.Error, "ERROR: Unallocated cluster has non-zero subcluster allocation map");
                    break;
            }
        }
    }

    /// <summary>
    /// QEMU's fix_l2_entry_by_zero: the entry becomes a plain zero cluster (with extended L2
    /// entries, its allocated subclusters become zero subclusters), written at once. A write that
    /// would hit other metadata stops the check.
    /// </summary>
    private bool FixL2EntryByZero(long l2Offset, byte[] table, int index, bool active)
    {
        bool extended = _g.ExtendedL2;
        L2Entry e = L2Entry.Read(table, index, extended);
        L2Entry zero = extended
            ? new L2Entry(0, (e.Bitmap | (e.Bitmap << 32)) & L2Entry.AllZeroes)
            : new L2Entry(L2Entry.ZeroFlag, 0);
        L2Entry.Write(table, index, extended, zero);
        long at = l2Offset + (long)index * _g.L2EntrySize;
        if (Overlap(active ? Qcow2Metadata.ActiveL2 : Qcow2Metadata.InactiveL2, at, _g.L2EntrySize) is string what)
        {
            SignalCorruption($"Preventing invalid write on metadata (overlaps with {what})");
            Report(Kind.Error, "ERROR: Overlap check failed");
            _res.CheckErrors++;
            throw new CheckFailedException($"repairing the L2 entry at 0x{at:x} would overwrite the {what}");
        }
        try
        {
            _file.Write(table.AsSpan(index * _g.L2EntrySize, _g.L2EntrySize), at, active ? Qcow2Metadata.ActiveL2 : Qcow2Metadata.InactiveL2);
            _file.Flush();
        }
        catch (Exception ex) when (ex is VmsnapException or IOException)
        {
            Report(Kind.Error, $"ERROR: Failed to overwrite L2 table entry: {ex.Message}");
            _res.CheckErrors++;
            return false;
        }
        ForgetCachedTables(at, _g.L2EntrySize);
        _res.Corruptions--;
        _res.CorruptionsFixed++;
        return true;
    }

    /// <summary>Drops cached L2 tables a direct write touched (they are clean: the check started with a flush).</summary>
    private void ForgetCachedTables(long offset, long length)
    {
        for (long c = offset & ~(long)(ClusterSize - 1); c < offset + length; c += ClusterSize) _l2Cache.Remove(c);
    }

    /// <summary>Remembers host clusters the active tables reference more than once.</summary>
    private void NoteActiveReference(long offset)
    {
        // Past the end of the file: already an error (Inc), and a bitmap that far would be unbounded.
        if (offset < 0 || (offset & (ClusterSize - 1)) != 0 || offset >= _fileLength) return;
        long c = offset >> _g.ClusterBits;
        if (c >= (long)_activeSeen.Length * 64)
        {
            if (c >= (long)int.MaxValue * 32) return;
            Array.Resize(ref _activeSeen, (int)Math.Max(c / 64 + 1, _activeSeen.Length * 2L));
        }
        ulong bit = 1UL << (int)(c & 63);
        if ((_activeSeen[c >> 6] & bit) != 0) _activeDuplicates.Add(c);
        else _activeSeen[c >> 6] |= bit;
    }

    /// <summary>
    /// Clusters used by persistent bitmaps (only when the bitmaps autoclear bit says the extension
    /// is valid, as QEMU does; qcow2_check_bitmaps_refcounts): a directory that cannot be read
    /// stops the check; a bad bitmap table entry is a corruption, and stops the check too, because
    /// QEMU loads the bitmaps when it opens the image and refuses to open it (qemu-img check fails).
    /// </summary>
    private void CountBitmaps()
    {
        HeaderExtension? ext = H.FindExtension(HeaderExtension.Bitmaps);
        if (ext is null || (H.AutoclearFeatures & Qcow2Header.AutoclearBitmaps) == 0) return;
        var (count, dirOffset, dirSize) = BitmapDirectory.ParseExtension(ext.Data);
        if (count == 0) return;
        Inc(dirOffset, dirSize);
        BitmapDirectory dir;
        try
        {
            dir = BitmapDirectory.Read(_file.Device, ext.Data, _fileLength);
        }
        catch (Qcow2FormatException ex)
        {
            Report(Kind.Error, $"ERROR {ex.Message}");
            _res.Corruptions++;
            throw new CheckFailedException($"the bitmap directory cannot be read: {ex.Problem}");
        }
        const ulong reservedMask = 0xff00_0000_0000_01fe;
        string? invalid = null;
        foreach (BitmapDirectory.Entry bm in dir.Entries)
        {
            Inc(bm.TableOffset, bm.TableSize * 8L);
            // QEMU's directory check: a table too large or past the end of the file (it then refuses to open the image).
            if (bm.TableSize > 0x800_0000 || bm.TableOffset < 0 || bm.TableOffset + bm.TableSize * 8L > _fileLength)
            {
                Report(Kind.Error, $"ERROR bitmap '{bm.Name}': table of {bm.TableSize} entries at 0x{bm.TableOffset:x} does not lie within the file");
                _res.Corruptions++;
                throw new CheckFailedException($"bitmap '{bm.Name}': table of {bm.TableSize} entries at file offset 0x{bm.TableOffset:x} does not lie within the file, so QEMU cannot open the image");
            }
            // In pieces: a table may be large.
            byte[] chunk = new byte[Math.Min(bm.TableSize * 8L, 1 << 20)];
            for (long done = 0; done < bm.TableSize * 8L; done += chunk.Length)
            {
                Span<byte> part = chunk.AsSpan(0, (int)Math.Min(chunk.Length, bm.TableSize * 8L - done));
                if (!TryRead(bm.TableOffset + done, part))
                {
                    _res.Corruptions++;
                    throw new CheckFailedException($"the table of bitmap '{bm.Name}' at 0x{bm.TableOffset:x} cannot be read");
                }
                for (int i = 0; i + 8 <= part.Length; i += 8)
                {
                    ulong entry = BinaryPrimitives.ReadUInt64BigEndian(part[i..]);
                    long offset = (long)(entry & BitmapDirectory.TableEntryOffsetMask);
                    long index = (done + i) / 8;
                    if ((entry & reservedMask) != 0 || (offset != 0 && ((entry & 1) != 0 || (offset & (ClusterSize - 1)) != 0)))
                    {
                        Report(Kind.Error, $"ERROR bitmap '{bm.Name}' table entry {index} is invalid: 0x{entry:x}");
                        _res.Corruptions++;
                        invalid ??= $"bitmap '{bm.Name}': table entry {index} at file offset 0x{bm.TableOffset + done + i:x} is invalid (0x{entry:x}), so QEMU cannot load the bitmap nor open the image";
                        continue;
                    }
                    if (offset != 0) Inc(offset, ClusterSize);
                }
            }
        }
        if (invalid is not null) throw new CheckFailedException(invalid);
    }

    /// <summary>
    /// Checks the refcount table's entries and counts the blocks (QEMU's check_refblocks): bad
    /// entries and blocks used twice call for a rebuild; a block past the end of the file is
    /// reached by growing the file (--repair all).
    /// </summary>
    private void CheckRefblocks(Qcow2RepairMode mode)
    {
        ReadOnlySpan<ulong> table = _refcounts.Table;
        bool fix = mode == Qcow2RepairMode.All;
        for (int i = 0; i < table.Length; i++)
        {
            ulong entry = table[i];
            ulong offset = entry & RefcountTableEntry.OffsetMask;
            ulong cluster = offset >> _g.ClusterBits;
            if ((entry & RefcountTableEntry.ReservedMask) != 0)
            {
                Report(Kind.Error, $"ERROR refcount table entry {i} has reserved bits set");
                _res.Corruptions++;
                _rebuild = true;
                continue;
            }
            if ((offset & (ulong)(ClusterSize - 1)) != 0)
            {
                Report(Kind.Error, $"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted");
                _res.Corruptions++;
                _rebuild = true;
                continue;
            }
            if (cluster >= (ulong)_clusters)
            {
                _res.Corruptions++;
                RepairingOrError(fix, $"refcount block {i} is outside image");
                if (fix)
                {
                    string? failed = ReachRefblock((long)offset, offset > (ulong)(long.MaxValue - ClusterSize));
                    if (failed is null)
                    {
                        _res.Corruptions--;
                        _res.CorruptionsFixed++;
                        Inc((long)offset, ClusterSize);
                        continue;
                    }
                    _rebuild = true;
                    Report(Kind.Error, $"ERROR could not resize image: {failed}");
                }
                continue;
            }
            if (offset != 0)
            {
                Inc((long)offset, ClusterSize);
                if (Count((long)cluster) != 1)
                {
                    Report(Kind.Error, $"ERROR refcount block {i} refcount={Count((long)cluster)}");
                    _res.Corruptions++;
                    _rebuild = true;
                }
            }
        }
    }

    /// <summary>Grows the file so that it holds the refcount block at <paramref name="offset"/>; null on success, else why not.</summary>
    private string? ReachRefblock(long offset, bool impossible)
    {
        if (impossible) return "Invalid argument";
        long cluster = offset >> _g.ClusterBits;
        // Refused before the file grows when the in-memory counts could not follow it.
        if (!_counts.TryReserve(cluster + 1)) return $"checking it would need a reference count for each of {cluster + 1} clusters, more than vmsnap can hold in memory";
        try
        {
            _file.Device.SetLength(offset + ClusterSize);
        }
        catch (Exception e) when (e is VmsnapException or IOException)
        {
            return e.Message;
        }
        _fileLength = _file.Device.Length;
        Grow(_g.ClustersFor(_fileLength));
        _refcounts.NoteHighWater(_g.ClustersFor(_fileLength));
        return cluster < _clusters ? null : "Invalid argument";
    }

    // ---- comparison and repair ------------------------------------------------------------------

    /// <summary>The stored refcount of a cluster; false (with QEMU's corruption signal for an unaligned block) when it cannot be read.</summary>
    private bool TryGetRefcount(long cluster, out ulong refcount)
    {
        try
        {
            refcount = _refcounts.Get(cluster);
            return true;
        }
        catch (Exception e) when (e is VmsnapException or IOException)
        {
            long index = cluster >> _g.RefcountBlockBits;
            ulong offset = index < _refcounts.Table.Length ? _refcounts.Table[(int)index] & RefcountTableEntry.OffsetMask : 0;
            if ((offset & (ulong)(ClusterSize - 1)) != 0)
                SignalCorruption($"Refblock offset 0x{offset:x} unaligned (reftable index: {(index == 0 ? "0" : $"0x{index:x}")})");
            refcount = 0;
            return false;
        }
    }

    /// <summary>Compares every stored refcount with the references counted (QEMU's compare_refcounts), repairing what <paramref name="mode"/> allows.</summary>
    private void CompareRefcounts(Qcow2RepairMode mode)
    {
        _highest = 0;
        long blockMask = _g.RefcountBlockEntries - 1;
        for (long i = 0; i < _clusters; i++)
        {
            // Memory stays bounded by the cache: blocks read for the comparison are evicted as it goes.
            if ((i & blockMask) == 0 && _refcounts.Blocks.Count > 2 * _refcounts.Blocks.Capacity) _refcounts.Blocks.Trim();
            if (!TryGetRefcount(i, out ulong stored))
            {
                Report(Kind.Note, $"Can't get refcount for cluster {i}: Input/output error");
                _res.CheckErrors++;
                continue;
            }
            ulong reference = _counts[i];
            if (stored > 0 || reference > 0) _highest = i;
            if (stored == reference) continue;
            bool fixLeak = false, fixCorruption = false;
            if (stored == 0) _rebuild = true;
            else if (stored > reference && mode != Qcow2RepairMode.None) fixLeak = true;
            else if (stored < reference && mode == Qcow2RepairMode.All) fixCorruption = true;
            string text = $"cluster {i} refcount={stored} reference={reference}";
            if (fixLeak || fixCorruption) Report(Kind.Repair, "Repairing " + text);
            else if (stored < reference) Report(Kind.Error, "ERROR " + text);
            else Report(Kind.Leak, "Leaked " + text);
            if (fixLeak || fixCorruption)
            {
                try
                {
                    long delta = reference >= stored ? (long)(reference - stored) : -(long)(stored - reference);
                    UpdateRefcount(i, delta);
                    if (fixLeak) _res.LeaksFixed++;
                    else _res.CorruptionsFixed++;
                    continue;
                }
                catch (Exception ex) when (ex is VmsnapException or IOException)
                {
                    Report(Kind.Error, $"ERROR could not repair cluster {i}: {ex.Message}");
                }
            }
            if (stored < reference) _res.Corruptions++;
            else _res.Leaks++;
        }
    }

    /// <summary>
    /// Changes a stored refcount to what the references on disk say. Nothing in memory depends on
    /// it, so the engine's increment/decrement ordering (which would flush between the two kinds)
    /// does not apply: like QEMU's, the changes stay cached until the repair ends. A cluster left
    /// without references is discarded at once, as QEMU discards it.
    /// </summary>
    private void UpdateRefcount(long cluster, long delta)
    {
        _refcounts.Repair(cluster, delta);
        if (delta < 0 && _refcounts.Get(cluster) == 0) DiscardCluster(cluster);
    }

    private void DiscardCluster(long cluster)
    {
        long offset = cluster << _g.ClusterBits;
        if (offset >= _file.Device.Length) return;
        try
        {
            _file.Device.Discard(offset, Math.Min(ClusterSize, _file.Device.Length - offset));
        }
        catch (Exception e) when (e is VmsnapException or IOException)
        {
            // Only space is lost when a discard fails.
        }
    }

    /// <summary>
    /// COPIED must be set exactly when the refcount is 1, in the active L1 table and its L2 tables
    /// (QEMU's check_oflag_copied). Repaired with --repair all, and with --repair leaks when the
    /// refcounts are right by now.
    /// </summary>
    private void CheckOflagCopied()
    {
        bool repair = FixErrors || (FixLeaks && _res.CheckErrors == 0 && _res.Corruptions == 0 && _res.Leaks == 0);
        L1Table l1 = _activeL1;
        bool extended = _g.ExtendedL2;
        for (int i = 0; i < l1.Size; i++)
        {
            ulong l1Entry = l1.Entries[i];
            long l2 = L1Entry.L2Offset(l1Entry);
            if (l2 == 0) continue;
            if (!TryGetRefcount(l2 >> _g.ClusterBits, out ulong refcount)) continue;
            if ((refcount == 1) != L1Entry.IsCopied(l1Entry))
            {
                _res.Corruptions++;
                RepairingOrError(repair, $"OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1Entry:x} refcount={refcount}");
                if (repair)
                {
                    WriteActiveL1Entry(i, refcount == 1 ? l1Entry | L1Entry.Copied : l1Entry & ~L1Entry.Copied);
                    _res.Corruptions--;
                    _res.CorruptionsFixed++;
                }
            }

            byte[]? table = TryRead(l2, ClusterSize);
            if (table is null)
            {
                Report(Kind.Error, "ERROR: Could not read L2 table: Input/output error");
                _res.CheckErrors++;
                throw new CheckFailedException($"the L2 table at 0x{l2:x} cannot be read");
            }
            int dirty = 0;
            for (int j = 0; j < _g.L2Entries; j++)
            {
                L2Entry e = L2Entry.Read(table, j, extended);
                if (e.Kind(extended) is not (ClusterKind.Normal or ClusterKind.ZeroAllocated)) continue;
                if (!TryGetRefcount(e.HostOffset >> _g.ClusterBits, out refcount)) continue;
                if ((refcount == 1) == e.IsCopied) continue;
                _res.Corruptions++;
                RepairingOrError(repair, $"OFLAG_COPIED data cluster: l2_entry={e.Word:x} refcount={refcount}");
                if (repair)
                {
                    L2Entry.Write(table, j, extended, e with { Word = refcount == 1 ? e.Word | L2Entry.Copied : e.Word & ~L2Entry.Copied });
                    dirty++;
                }
            }
            if (dirty == 0) continue;
            if (Overlap(Qcow2Metadata.ActiveL2, l2, ClusterSize) is string what)
            {
                Report(Kind.Error, "ERROR: Could not write L2 table; metadata overlap check failed: Input/output error");
                _res.CheckErrors++;
                SignalCorruption($"Preventing invalid write on metadata (overlaps with {what})");
                throw new CheckFailedException($"repairing COPIED flags of the L2 table at 0x{l2:x} would overwrite the {what}");
            }
            _file.Write(table, l2, Qcow2Metadata.ActiveL2);
            ForgetCachedTables(l2, ClusterSize);
            _res.Corruptions -= dirty;
            _res.CorruptionsFixed += dirty;
        }
    }

    /// <summary>Writes one entry of the active L1 table in place (QEMU's qcow2_write_l1_entry), unless that would hit other metadata.</summary>
    private void WriteActiveL1Entry(int index, ulong entry)
    {
        L1Table l1 = _activeL1;
        long at = l1.Offset + index * 8L;
        if (Overlap(Qcow2Metadata.ActiveL1, at, 8) is string what)
        {
            SignalCorruption($"Preventing invalid write on metadata (overlaps with {what})");
            _res.CheckErrors++;
            throw new CheckFailedException($"repairing the COPIED flag of active L1 entry {index} at 0x{at:x} would overwrite the {what}");
        }
        byte[] bytes = new byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(bytes, entry);
        _file.Write(bytes, at, Qcow2Metadata.ActiveL1);
        _file.Flush();
        l1.Entries[index] = entry;   // in place: the engine's copy matches the disk, nothing left to write back
    }
}
