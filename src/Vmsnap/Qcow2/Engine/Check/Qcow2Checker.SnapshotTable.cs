using Kind = Vmsnap.Qcow2.Qcow2CheckFindingKind;

using System.Buffers.Binary;
using System.Text;

namespace Vmsnap.Qcow2;

// The snapshot table, read as QEMU's check reads it (qcow2_check_read_snapshot_table), and written
// anew when it was damaged (qcow2_check_fix_snapshot_table).
internal sealed partial class Qcow2Checker
{
    private List<SnapshotEntry> _snapshots = [];
    private long _snapshotsOffset, _snapshotsSize;

    /// <summary>
    /// Reads nb_snapshots and snapshots_offset from the header and the table they point to. An
    /// invalid pointer, an entry with more than 1 KiB of extra data or a table past 64 MiB stop the
    /// check, unless --repair all may drop the extra data or the snapshots past the limit (the
    /// header's count is lowered at once, the table is rewritten after the refcounts are repaired).
    /// Version 3 entries without the disk size in their extra data are corruptions.
    /// </summary>
    private void CheckReadSnapshotTable()
    {
        byte[] pointer = new byte[12];
        if (!TryRead(Qcow2Header.SnapshotFieldsOffset, pointer))
            throw SnapshotReadFailure(_snapshotRes, "ERROR failed to read the snapshot table pointer from the image header", "the header cannot be read");
        uint count = BinaryPrimitives.ReadUInt32BigEndian(pointer);
        ulong offset = BinaryPrimitives.ReadUInt64BigEndian(pointer.AsSpan(4));
        int reduced = 0, dropped = 0;

        if (count > SnapshotTable.MaxSnapshots && FixErrors)
        {
            Report(Kind.Repair, $"Discarding {count - SnapshotTable.MaxSnapshots} overhanging snapshots");
            reduced += (int)(count - SnapshotTable.MaxSnapshots);
            count = SnapshotTable.MaxSnapshots;
        }
        if (count > SnapshotTable.MaxSnapshots)
        {
            _snapshotRes.CheckErrors++;
            Report(Kind.Error, $"ERROR snapshot table too large: {count} snapshots, more than the {SnapshotTable.MaxSnapshots} qcow2 allows");
            Report(Kind.Note, $"You can force-remove all {count - SnapshotTable.MaxSnapshots} overhanging snapshots with qemu-img check -r all");
            throw new CheckFailedException($"header: nb_snapshots {count} is more than the {SnapshotTable.MaxSnapshots} snapshots qcow2 allows (a repair of all errors drops the ones past the limit)");
        }
        // QEMU validates the pointer even when there are no snapshots.
        if (offset > (ulong)long.MaxValue - count * (ulong)SnapshotEntry.FixedSize || (offset & (ulong)(ClusterSize - 1)) != 0)
        {
            _snapshotRes.CheckErrors++;
            Report(Kind.Error, $"ERROR snapshot table offset invalid: 0x{offset:x}");
            throw new CheckFailedException($"header: snapshot table offset 0x{offset:x} is invalid ({((offset & (ulong)(ClusterSize - 1)) != 0 ? "not aligned to a cluster" : "beyond any file")})");
        }

        long start = (long)offset, pos = start, tableLength = 0;
        var list = new List<SnapshotEntry>();
        byte[] fixedPart = new byte[SnapshotEntry.FixedSize];
        for (int i = 0; i < count; i++)
        {
            long entryStart = pos;
            tableLength = (tableLength + 7) & ~7L;
            pos = (pos + 7) & ~7L;
            if (!TryRead(pos, fixedPart)) throw SnapshotTableUnreadable(i, pos);
            long fixedAt = pos;
            pos += SnapshotEntry.FixedSize;
            var sn = new SnapshotEntry
            {
                L1TableOffset = (long)BinaryPrimitives.ReadUInt64BigEndian(fixedPart),
                L1Size = BinaryPrimitives.ReadUInt32BigEndian(fixedPart.AsSpan(8)),
                DateSeconds = BinaryPrimitives.ReadUInt32BigEndian(fixedPart.AsSpan(16)),
                DateNanoseconds = BinaryPrimitives.ReadUInt32BigEndian(fixedPart.AsSpan(20)),
                VmClockNanoseconds = BinaryPrimitives.ReadUInt64BigEndian(fixedPart.AsSpan(24)),
                VmStateSize32 = BinaryPrimitives.ReadUInt32BigEndian(fixedPart.AsSpan(32)),
                FileOffset = fixedAt,
            };
            int idSize = BinaryPrimitives.ReadUInt16BigEndian(fixedPart.AsSpan(12));
            int nameSize = BinaryPrimitives.ReadUInt16BigEndian(fixedPart.AsSpan(14));
            long extraSize = BinaryPrimitives.ReadUInt32BigEndian(fixedPart.AsSpan(36));
            bool truncateExtra = false;
            if (extraSize > SnapshotEntry.MaxExtraDataSize)
            {
                if (!FixErrors)
                {
                    _snapshotRes.CheckErrors++;
                    Report(Kind.Error, $"ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry {i}");
                    Report(Kind.Note, "You can force-remove this extra metadata with qemu-img check -r all");
                    throw new CheckFailedException($"snapshot table entry {i} at file offset 0x{fixedAt:x}: {extraSize} bytes of extra data, more than the {SnapshotEntry.MaxExtraDataSize} qcow2 allows (a repair of all errors drops the excess)");
                }
                Report(Kind.Repair, $"Discarding too much extra metadata in snapshot table entry {i} ({extraSize} > {SnapshotEntry.MaxExtraDataSize})");
                dropped++;
                truncateExtra = true;
            }

            byte[] known = new byte[Math.Min(SnapshotEntry.KnownExtraDataSize, extraSize)];
            if (!TryRead(pos, known)) throw SnapshotTableUnreadable(i, pos);
            pos += known.Length;
            if (extraSize >= 8) sn.VmStateSizeLarge = BinaryPrimitives.ReadUInt64BigEndian(known);
            if (extraSize >= 16) sn.DiskSize = BinaryPrimitives.ReadUInt64BigEndian(known.AsSpan(8));
            if (extraSize >= 24) sn.Icount = BinaryPrimitives.ReadInt64BigEndian(known.AsSpan(16));
            if (extraSize > SnapshotEntry.KnownExtraDataSize)
            {
                long extraEnd = pos + extraSize - SnapshotEntry.KnownExtraDataSize;
                if (truncateExtra) extraSize = SnapshotEntry.MaxExtraDataSize;
                byte[] unknown = new byte[extraSize - SnapshotEntry.KnownExtraDataSize];
                if (!TryRead(pos, unknown)) throw SnapshotTableUnreadable(i, pos);
                sn.UnknownExtraData = unknown;
                pos = extraEnd;
            }
            byte[] id = new byte[idSize], name = new byte[nameSize];
            if (!TryRead(pos, id)) throw SnapshotTableUnreadable(i, pos);
            pos += idSize;
            if (!TryRead(pos, name)) throw SnapshotTableUnreadable(i, pos);
            pos += nameSize;
            sn.Id = CString(id);
            sn.Name = CString(name);

            tableLength += SnapshotEntry.FixedSize + extraSize + idSize + nameSize;
            if (tableLength > SnapshotTable.MaxTableBytes || pos - start > int.MaxValue)
            {
                if (!FixErrors)
                {
                    _snapshotRes.CheckErrors++;
                    Report(Kind.Error, "ERROR failed to read the snapshot table: Snapshot table is too big");
                    Report(Kind.Note, $"You can force-remove all {count - i} overhanging snapshots with qemu-img check -r all");
                    throw new CheckFailedException($"snapshot table at file offset 0x{start:x}: larger than {SnapshotTable.MaxTableBytes} bytes from entry {i} on (a repair of all errors drops the snapshots past the limit)");
                }
                Report(Kind.Repair, $"Discarding {count - i} overhanging snapshots (snapshot table is too big)");
                reduced += (int)(count - i);
                count = (uint)i;
                pos = entryStart;
                break;
            }
            list.Add(sn);
        }
        _snapshots = list;
        _snapshotsOffset = start;
        _snapshotsSize = pos - start;
        _snapshotRes.Corruptions += reduced + dropped;

        if (reduced != 0)   // an int, as in QEMU: a count near 2^32 wraps the same way
        {
            // The count goes down now (leaking what the dropped entries used, which the refcount
            // check then frees), because the refcount check must see the table the header describes.
            byte[] bytes = new byte[4];
            BinaryPrimitives.WriteUInt32BigEndian(bytes, count);
            _file.WriteHeader(bytes, Qcow2Header.SnapshotFieldsOffset);
            _file.Flush();
            H.SnapshotCount = count;
            _snapshotRes.CorruptionsFixed += reduced;
            _snapshotRes.Corruptions -= reduced;
        }
        if (_mode != Qcow2RepairMode.None) _snapshotList.Set(list, _snapshotsSize);

        // Version 3 needs the 64-bit VM-state size and the disk size in every entry's extra data.
        if (H.Version >= 3 && _incompleteEntriesAreCorrupt)
        {
            for (int i = 0; i < list.Count; i++)
            {
                if (list[i].DiskSize is not null) continue;
                _snapshotRes.Corruptions++;
                RepairingOrError(FixErrors, $"snapshot table entry {i} is incomplete");
            }
        }
    }

    /// <summary>QEMU keeps IDs and names as C strings: they end at the first NUL byte.</summary>
    private static string CString(ReadOnlySpan<byte> bytes)
    {
        int nul = bytes.IndexOf((byte)0);
        return Encoding.UTF8.GetString(nul >= 0 ? bytes[..nul] : bytes);
    }

    private CheckFailedException SnapshotTableUnreadable(int index, long offset) =>
        SnapshotReadFailure(_snapshotRes, $"ERROR failed to read the snapshot table: cannot read entry {index} at 0x{offset:x}",
            $"snapshot table entry {index} at file offset 0x{offset:x} cannot be read");

    private CheckFailedException SnapshotReadFailure(Tally tally, string message, string reason)
    {
        tally.CheckErrors++;
        Report(Kind.Error, message);
        return new CheckFailedException(reason);
    }

    /// <summary>After the refcounts are right: a snapshot table found damaged (--repair all) is written anew, complete.</summary>
    private void FixSnapshotTable()
    {
        if (_snapshotRes.Corruptions == 0 || !FixErrors) return;
        WriteSnapshotTable();
        _snapshotRes.CorruptionsFixed += _snapshotRes.Corruptions;
        _snapshotRes.Corruptions = 0;
    }

    /// <summary>
    /// QEMU's qcow2_write_snapshots: every entry with its complete extra data, in fresh clusters;
    /// after a flush the header switches to them in one write; then the old table is freed.
    /// </summary>
    private void WriteSnapshotTable()
    {
        var list = _snapshots.ConvertAll(s => s.WithCompleteExtraData((long)H.Size));
        long size = 0;
        foreach (SnapshotEntry s in list) size = ((size + 7) & ~7L) + s.UnpaddedLength;
        if (size > SnapshotTable.MaxTableBytes)
        {
            _snapshotRes.CheckErrors++;
            Report(Kind.Error, "ERROR failed to update snapshot table: File too large");
            throw new CheckFailedException($"the repaired snapshot table would take {size} bytes, more than the {SnapshotTable.MaxTableBytes} qcow2 allows");
        }
        _caches.FlushAll();   // clusters freed by the refcount repair may be used again
        long offset = 0;
        if (list.Count > 0)
        {
            byte[] bytes = SnapshotTable.Encode(list);
            long clusters = _g.ClustersFor(bytes.Length);
            offset = _refcounts.Allocate(clusters);
            _caches.FlushAll();
            if (Overlap(Qcow2Metadata.None, offset, size) is string what)
            {
                SignalCorruption($"Preventing invalid write on metadata (overlaps with {what})");
                _snapshotRes.CheckErrors++;
                Report(Kind.Error, "ERROR failed to update snapshot table: Input/output error");
                throw new CheckFailedException($"the new snapshot table at 0x{offset:x} would overlap the {what}");
            }
            // Exactly the table, as QEMU writes it (a table at the end of the file ends the file).
            _file.Write(bytes.AsSpan(0, (int)size), offset, Qcow2Metadata.None);
            _file.Flush();
        }
        Qcow2Header h = H.Clone();
        h.SnapshotCount = (uint)list.Count;
        h.SnapshotsOffset = (ulong)offset;
        _file.WriteHeader(h.EncodeSnapshotFields(), Qcow2Header.SnapshotFieldsOffset);
        _file.Flush();
        long oldOffset = _snapshotsOffset, oldSize = _snapshotsSize;
        H.SnapshotCount = h.SnapshotCount;
        H.SnapshotsOffset = h.SnapshotsOffset;
        _snapshotList.Set(list, size);
        _snapshots = list;
        _snapshotsOffset = offset;
        _snapshotsSize = size;
        FreeClusters(oldOffset, oldSize);
    }

    /// <summary>
    /// Frees the clusters of a range (QEMU's qcow2_free_clusters): nothing changes when one of
    /// them is not counted at all (a table past the end of the file, say), which is only reported.
    /// </summary>
    private void FreeClusters(long offset, long size)
    {
        if (size <= 0 || offset <= 0) return;
        long first = offset >> _g.ClusterBits, last = (offset + size - 1) >> _g.ClusterBits;
        try
        {
            for (long c = first; c <= last; c++)
                if (_refcounts.Get(c) == 0) throw new Qcow2FormatException("refcount", c << _g.ClusterBits, "the cluster is already free");
            for (long c = first; c <= last; c++) UpdateRefcount(c, -1);
        }
        catch (Qcow2FormatException e)
        {
            Report(Kind.Note, $"freeing the old clusters at 0x{offset:x} failed: {e.Problem}");
        }
    }
}
