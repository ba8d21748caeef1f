using System.Buffers.Binary;
using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Qcow2;

/// <summary>
/// Images damaged on purpose, one per kind of damage QEMU's check knows (its check_refcounts_l1/l2,
/// check_refblocks, compare_refcounts, check_oflag_copied and snapshot table paths), many of them
/// the situations of QEMU's iotests 060, 080, 138 and 261 rebuilt here: made by qemu-img and
/// qemu-io, then bytes changed at offsets found by reading the image's own structures.
/// </summary>
internal static class CheckParityImages
{
    /// <summary>Writes that give an image data, a zero cluster and a partly written cluster (qemu-io).</summary>
    internal static void Populate(string image) =>
        Qemu.Io(image, "write -P 0x11 0 256k", "write -P 0x22 1M 64k", "write -z 2M 64k", "write -P 0x33 3M 100k");

    internal static string Populated(string image, string options = "")
    {
        Qemu.Create(image, 64 << 20, options);
        Populate(image);
        return image;
    }

    internal static void Snapshot(string image, string name) => Tool.QemuImg("snapshot", "-c", name, image);

    // ---- structures of the image, read back from the file -----------------------------------------

    private static Qcow2Header Header(string image) => Qemu.Header(image);

    private static ClusterGeometry Geometry(string image)
    {
        Qcow2Header h = Header(image);
        return new ClusterGeometry(h.ClusterBits, h.HasExtendedL2, h.RefcountOrder);
    }

    /// <summary>File offset of the active L2 entry for a guest offset.</summary>
    internal static long L2EntryOffset(string image, long guest)
    {
        Qcow2Header h = Header(image);
        ClusterGeometry g = Geometry(image);
        long l2 = L1Entry.L2Offset(Qemu.ReadBE64(image, (long)h.L1TableOffset + g.L1Index(guest) * 8));
        Assert.NotEqual(0, l2);
        return l2 + (long)g.L2Index(guest) * g.L2EntrySize;
    }

    internal static void SetRefcount(string image, long cluster, ulong value)
    {
        Qcow2Header h = Header(image);
        ClusterGeometry g = Geometry(image);
        long block = (long)(Qemu.ReadBE64(image, (long)h.RefcountTableOffset + (cluster >> g.RefcountBlockBits) * 8) & RefcountTableEntry.OffsetMask);
        Assert.NotEqual(0, block);
        byte[] data = Qemu.ReadRaw(image, block, g.ClusterSize);
        RefcountBlock.Set(data, cluster & (g.RefcountBlockEntries - 1), g.RefcountOrder, value);
        Qemu.WriteRaw(image, block, data);
    }

    internal static ulong GetRefcount(string image, long cluster)
    {
        Qcow2Header h = Header(image);
        ClusterGeometry g = Geometry(image);
        long block = (long)(Qemu.ReadBE64(image, (long)h.RefcountTableOffset + (cluster >> g.RefcountBlockBits) * 8) & RefcountTableEntry.OffsetMask);
        return RefcountBlock.Get(Qemu.ReadRaw(image, block, g.ClusterSize), cluster & (g.RefcountBlockEntries - 1), g.RefcountOrder);
    }

    private static void Or64(string image, long offset, ulong bits) => Qemu.WriteBE64(image, offset, Qemu.ReadBE64(image, offset) | bits);

    private static void Add64(string image, long offset, ulong delta) => Qemu.WriteBE64(image, offset, Qemu.ReadBE64(image, offset) + delta);

    private static void SetIncompatible(string image, ulong bits) => Or64(image, Qcow2Header.IncompatibleFeaturesOffset, bits);

    private static long FirstRefblock(string image) => (long)Qemu.ReadBE64(image, (long)Header(image).RefcountTableOffset);

    private static long RoundUpToCluster(string image, long offset) => (offset + Header(image).ClusterSize - 1) & ~(long)(Header(image).ClusterSize - 1);

    /// <summary>Offset of snapshot table entry <paramref name="index"/>.</summary>
    internal static long SnapshotEntryOffset(string image, int index)
    {
        long at = (long)Header(image).SnapshotsOffset;
        for (int i = 0; i < index; i++) at += SnapshotEntryLength(image, at);
        return at;
    }

    private static long SnapshotEntryLength(string image, long at)
    {
        byte[] f = Qemu.ReadRaw(image, at, 40);
        long length = 40 + BinaryPrimitives.ReadUInt32BigEndian(f.AsSpan(36)) + BinaryPrimitives.ReadUInt16BigEndian(f.AsSpan(12)) + BinaryPrimitives.ReadUInt16BigEndian(f.AsSpan(14));
        return (length + 7) & ~7L;
    }

    /// <summary>
    /// Rewrites the snapshot table in place with entry <paramref name="index"/>'s extra data cut or
    /// extended to <paramref name="extraSize"/> bytes (<paramref name="fill"/> first, then zeroes),
    /// later entries moved (like iotest 261 builds its tables).
    /// </summary>
    internal static void SetExtraDataSize(string image, int index, int extraSize, byte[]? fill = null)
    {
        Qcow2Header h = Header(image);
        long at = (long)h.SnapshotsOffset;
        var table = new List<byte>();
        for (int i = 0; i < h.SnapshotCount; i++)
        {
            long length = SnapshotEntryLength(image, at);
            byte[] e = new byte[length];   // the last entry's padding may lie past the end of the file
            Qemu.ReadRaw(image, at, (int)Math.Min(length, new FileInfo(image).Length - at)).CopyTo(e, 0);
            at += length;
            if (i == index)
            {
                int extra = (int)BinaryPrimitives.ReadUInt32BigEndian(e.AsSpan(36));
                int names = BinaryPrimitives.ReadUInt16BigEndian(e.AsSpan(12)) + BinaryPrimitives.ReadUInt16BigEndian(e.AsSpan(14));
                byte[] newExtra = new byte[extraSize];
                byte[] source = fill ?? e.AsSpan(40, extra).ToArray();
                source.AsSpan(0, Math.Min(source.Length, extraSize)).CopyTo(newExtra);
                var entry = new List<byte>(e.AsSpan(0, 40).ToArray());
                BinaryPrimitives.WriteUInt32BigEndian(System.Runtime.InteropServices.CollectionsMarshal.AsSpan(entry).Slice(36), (uint)extraSize);
                entry.AddRange(newExtra);
                entry.AddRange(e.AsSpan(40 + extra, names).ToArray());
                while (entry.Count % 8 != 0) entry.Add(0);
                e = [.. entry];
            }
            table.AddRange(e);
        }
        Qemu.WriteRaw(image, (long)h.SnapshotsOffset, table.ToArray());
    }

    // ---- the damages ------------------------------------------------------------------------------

    /// <summary>Every kind of damage by name: it builds the damaged image at the path given.</summary>
    internal static readonly Dictionary<string, Action<string>> Kinds = new()
    {
        // The snapshot table (qcow2_check_read_snapshot_table, qcow2_check_fix_snapshot_table).
        ["snapshot-offset-unaligned-without-snapshots"] = f =>
        {
            Populated(f);
            Qemu.WriteBE64(f, Qcow2Header.SnapshotFieldsOffset + 4, 0x1234567890abcdef);   // iotest 080
        },
        ["snapshot-offset-beyond-any-file"] = f =>
        {
            Populated(f);
            Qemu.WriteBE64(f, Qcow2Header.SnapshotFieldsOffset + 4, 0xffff_ffff_ffff_0000);
            Qemu.WriteBE32(f, Qcow2Header.SnapshotFieldsOffset, 0xffff);
        },
        ["snapshot-count-over-limit"] = f =>
        {
            Populated(f);
            Qemu.WriteBE32(f, Qcow2Header.SnapshotFieldsOffset, 0xffff_ffff);
        },
        ["too-many-snapshots"] = f =>
        {
            // iotest 261: 2^17 all-zero v2 entries (valid in v2), one of those past the limit with an L1 table.
            Qemu.Create(f, 64 << 20, "compat=0.10");
            const long table = 0x100000;
            Qemu.WriteBE64(f, Qcow2Header.SnapshotFieldsOffset + 4, table);
            Qemu.WriteBE32(f, Qcow2Header.SnapshotFieldsOffset, 0x20000);
            using (var s = new FileStream(f, FileMode.Open)) s.SetLength(table + 40 * 131072);
            Qemu.WriteBE64(f, table + 40 * 65536, 0xe0000);
            Qemu.WriteBE32(f, table + 40 * 65536 + 8, 1);
            Qemu.WriteBE64(f, table - 2 * 65536, L1Entry.Copied | 0xf0000);
            for (long c = (table - 2 * 65536) / 65536; c < (table + 40 * 131072 + 65535) / 65536; c++) SetRefcount(f, c, 1);
        },
        ["snapshot-table-too-big"] = f =>
        {
            // iotest 261: entries with 1 KiB of extra data and 65535-byte IDs and names past 64 MiB;
            // the last one has an L1 table.
            Qemu.Create(f, 64 << 20);
            const long table = 0x100000;
            byte[] entry = new byte[40];
            BinaryPrimitives.WriteUInt16BigEndian(entry.AsSpan(12), 0xffff);
            BinaryPrimitives.WriteUInt16BigEndian(entry.AsSpan(14), 0xffff);
            BinaryPrimitives.WriteUInt32BigEndian(entry.AsSpan(36), 1024);
            const long size = 40 + 1024 + 65535 + 65535 + 2;
            Qemu.WriteBE64(f, Qcow2Header.SnapshotFieldsOffset + 4, table);
            long at = table;
            uint count = 0;
            using (var s = new FileStream(f, FileMode.Open))
            {
                for (long written = 0; written <= 64L << 20; written += size, at += size, count++)
                {
                    s.Position = at;
                    s.Write(entry);
                }
                s.SetLength(at);
            }
            Qemu.WriteBE64(f, at - size, 0xe0000);
            Qemu.WriteBE32(f, at - size + 8, 1);
            Qemu.WriteBE64(f, table - 2 * 65536, L1Entry.Copied | 0xf0000);
            for (long c = (table - 2 * 65536) / 65536; c < (at + 65535) / 65536; c++) SetRefcount(f, c, 1);
            Qemu.WriteBE32(f, Qcow2Header.SnapshotFieldsOffset, count);
        },
        ["snapshot-extra-data-too-large"] = f =>
        {
            // iotest 261: 64 KiB of extra data announced, which also spills into the next cluster.
            Qemu.Create(f, 64 << 20);
            Snapshot(f, "s1");
            Snapshot(f, "s2");
            Qemu.WriteBE32(f, SnapshotEntryOffset(f, 1) + 36, 0x10000);
        },
        ["snapshot-entry-incomplete"] = f =>
        {
            Qemu.Create(f, 64 << 20);
            Qemu.Io(f, "write -P 1 0 64k");
            Snapshot(f, "s1");
            Qemu.Io(f, "write -P 2 0 64k");
            Snapshot(f, "s2");
            SetExtraDataSize(f, 0, 8);   // the 64-bit VM-state size only, no disk size
        },
        ["snapshot-entry-without-extra-data"] = f =>
        {
            Qemu.Create(f, 64 << 20);
            Qemu.Io(f, "write -P 1 0 64k");
            Snapshot(f, "s1");
            Snapshot(f, "s2");
            SetExtraDataSize(f, 1, 0);
        },
        ["snapshot-entries-botched-v3"] = f =>
        {
            // iotest 261: a v2 table (no extra data, unknown extra data, 8 bytes) in an image made v3 by hand.
            BotchedV3(f);
        },
        ["snapshot-unknown-extra-data"] = f =>
        {
            Qemu.Create(f, 64 << 20);
            Snapshot(f, "s1");
            Snapshot(f, "s2");
            SetExtraDataSize(f, 0, 50, [.. new byte[24], .. "very important data"u8.ToArray()]);
        },
        ["snapshot-table-past-end-of-file"] = f =>
        {
            Populated(f);
            Snapshot(f, "s1");
            Qemu.WriteBE64(f, Qcow2Header.SnapshotFieldsOffset + 4, 0x4000_0000);
        },
        ["snapshot-table-past-end-of-file-v2"] = f =>
        {
            Qemu.Create(f, 64 << 20, "compat=0.10");
            Snapshot(f, "s1");
            Qemu.WriteBE64(f, Qcow2Header.SnapshotFieldsOffset + 4, 0x4000_0000);
        },
        ["snapshot-l1-unaligned"] = f =>
        {
            Populated(f);
            Snapshot(f, "s1");
            Add64(f, SnapshotEntryOffset(f, 0), 0x200);   // iotest 080
        },
        ["snapshot-l1-too-large"] = f =>
        {
            Populated(f);
            Snapshot(f, "s1");
            Qemu.WriteBE32(f, SnapshotEntryOffset(f, 0) + 8, 0x1000_0000);
        },
        ["snapshot-l1-past-end-of-file"] = f =>
        {
            Populated(f);
            Snapshot(f, "s1");
            Qemu.WriteBE64(f, SnapshotEntryOffset(f, 0), 0x4000_0000);
        },

        // L1 and L2 entries (check_refcounts_l1, check_refcounts_l2, fix_l2_entry_by_zero).
        ["l1-entry-reserved-bits"] = f =>
        {
            Populated(f);
            Or64(f, (long)Header(f).L1TableOffset, 0x100);
        },
        ["l1-entry-unaligned"] = f =>
        {
            Populated(f);
            Add64(f, (long)Header(f).L1TableOffset, 0x2a00);   // iotest 060: the L2 table read off its cluster
        },
        ["l1-table-past-end-of-file"] = f =>
        {
            Populated(f);
            Qemu.WriteBE64(f, Qcow2Header.L1SizeOffset + 4, (ulong)RoundUpToCluster(f, new FileInfo(f).Length) + 0x100000);
        },
        ["l2-table-is-the-l1-table"] = f =>
        {
            Qemu.Create(f, 64 << 20);
            Qemu.Io(f, "write -P 1 0 64k");
            long l1 = (long)Header(f).L1TableOffset;
            Qemu.WriteBE64(f, l1, L1Entry.Copied | (ulong)l1);   // iotest 060
        },
        ["l2-entry-reserved-bits"] = f =>
        {
            Populated(f);
            Or64(f, L2EntryOffset(f, 0), 0x100);
        },
        ["l2-entry-past-end-of-file"] = f =>
        {
            Populated(f);
            Qemu.WriteBE64(f, L2EntryOffset(f, 1 << 20), L2Entry.Copied | 0x4000_0000);
        },
        ["preallocated-zero-past-end-of-file"] = f =>
        {
            Populated(f);
            Qemu.WriteBE64(f, L2EntryOffset(f, 1 << 20), L2Entry.Copied | 0x4000_0000 | L2Entry.ZeroFlag);
        },
        ["data-cluster-unaligned"] = f =>
        {
            Populated(f);
            Add64(f, L2EntryOffset(f, 0), 0x2a00);   // iotest 060
        },
        ["preallocated-zero-unaligned"] = f =>
        {
            Populated(f);
            long at = L2EntryOffset(f, 0);
            Qemu.WriteBE64(f, at, (Qemu.ReadBE64(f, at) | L2Entry.ZeroFlag) + 0x2a00);
        },
        ["preallocated-zero-unaligned-in-snapshot"] = f =>
        {
            Populated(f);
            Snapshot(f, "s1");
            Qemu.Io(f, "write -P 9 0 128k");   // the active disk gets its own L2 table
            long l1 = SnapshotEntryOffset(f, 0);
            long l2 = L1Entry.L2Offset(Qemu.ReadBE64(f, (long)Qemu.ReadBE64(f, l1)));
            Qemu.WriteBE64(f, l2, (Qemu.ReadBE64(f, l2) | L2Entry.ZeroFlag) + 0x2a00);
        },
        ["preallocated-zero-unaligned-v2"] = f =>
        {
            Populated(f, "compat=0.10");
            long at = L2EntryOffset(f, 0);
            Qemu.WriteBE64(f, at, (Qemu.ReadBE64(f, at) | L2Entry.ZeroFlag) + 0x2a00);
        },
        ["preallocated-zero-in-header-cluster"] = f =>
        {
            Qemu.Create(f, 64 << 20);
            Qemu.Io(f, "write 0 64k", "discard 0 64k");
            Qemu.WriteBE64(f, L2EntryOffset(f, 0), 0x8000_0000_0000_2a01);   // iotest 060
        },
        ["compressed-cluster-copied-flag"] = f =>
        {
            Qemu.Create(f, 64 << 20);
            Qemu.Io(f, "write -c -P 5 0 64k");
            Or64(f, L2EntryOffset(f, 0), L2Entry.Copied);
        },
        ["data-cluster-in-refcount-block"] = f =>
        {
            Populated(f);
            Qemu.WriteBE64(f, L2EntryOffset(f, 1 << 20), L2Entry.Copied | (ulong)FirstRefblock(f));   // iotest 060
        },
        ["data-cluster-in-snapshot-l2-table"] = f =>
        {
            Qemu.Create(f, 64 << 20);
            Qemu.Io(f, "write -P 1 0 512");
            Snapshot(f, "foo");
            Qemu.Io(f, "write -P 2 0 512");
            long l2 = L1Entry.L2Offset(Qemu.ReadBE64(f, (long)Qemu.ReadBE64(f, SnapshotEntryOffset(f, 0))));
            Qemu.WriteBE64(f, l2, L2Entry.Copied | (ulong)L1Entry.L2Offset(Qemu.ReadBE64(f, (long)Header(f).L1TableOffset)));   // iotest 060
        },
        ["extended-l2-unaligned-clusters"] = f =>
        {
            Qemu.Create(f, 64 << 20, "extended_l2=on");
            Qemu.Io(f, "write -P 1 0 64k", "write -P 2 128k 8k");
            long l2 = L2EntryOffset(f, 0);
            Add64(f, l2, 0x2a00);              // data
            Add64(f, l2 + 32, 0x2a00);         // entry 2: no allocated subclusters, so "preallocated"
            Qemu.WriteBE64(f, l2 + 40, 0);
        },
        ["extended-l2-bitmap-allocated-and-zero"] = f =>
        {
            Qemu.Create(f, 64 << 20, "extended_l2=on");
            Qemu.Io(f, "write -P 1 0 64k");
            Qemu.WriteBE64(f, L2EntryOffset(f, 0) + 8, 0x0000_0001_0000_0001);
        },
        ["extended-l2-unallocated-with-bitmap"] = f =>
        {
            Qemu.Create(f, 64 << 20, "extended_l2=on");
            Qemu.Io(f, "write -P 1 0 64k");
            Qemu.WriteBE64(f, L2EntryOffset(f, 0) + 16 + 8, 3);
        },
        ["extended-l2-compressed-with-bitmap"] = f =>
        {
            Qemu.Create(f, 64 << 20, "extended_l2=on");
            Qemu.Io(f, "write -c -P 1 0 64k");
            Qemu.WriteBE64(f, L2EntryOffset(f, 0) + 8, 1);
        },
        ["cluster-at-32-pib"] = f =>
        {
            // iotest 138: a data cluster so far away that counting it needs 2^47 entries.
            Qemu.Create(f, 512, "cluster_size=512");
            Qemu.Io(f, "write 0 512");
            Qemu.WriteBE64(f, L2EntryOffset(f, 0), 0x0080_0000_0000_0000);
        },

        // COPIED flags (check_oflag_copied).
        ["copied-flag-missing-in-l1-and-header-refcount-2"] = f =>
        {
            // iotest 138: one leak and one corruption, both repaired.
            Qemu.Create(f, 64 << 10);
            Qemu.Io(f, "write 0 64k");
            SetRefcount(f, 0, 2);
            long l1 = (long)Header(f).L1TableOffset;
            Qemu.WriteBE64(f, l1, Qemu.ReadBE64(f, l1) & ~L1Entry.Copied);
        },
        ["copied-flag-missing-in-l2"] = f =>
        {
            Populated(f);
            long at = L2EntryOffset(f, 64 << 10);
            Qemu.WriteBE64(f, at, Qemu.ReadBE64(f, at) & ~L2Entry.Copied);
        },
        ["copied-flag-on-shared-cluster"] = f =>
        {
            Populated(f);
            Snapshot(f, "s1");
            Or64(f, L2EntryOffset(f, 0), L2Entry.Copied);
        },

        // Refcounts (compare_refcounts, check_refblocks, rebuild_refcount_structure).
        ["leaked-cluster"] = f =>
        {
            Populated(f);
            Qcow2Header h = Header(f);
            long cluster = (new FileInfo(f).Length + h.ClusterSize - 1) / h.ClusterSize;
            using (var s = new FileStream(f, FileMode.Open)) s.SetLength((cluster + 1) * h.ClusterSize);
            SetRefcount(f, cluster, 1);
        },
        ["refcount-too-high"] = f =>
        {
            Populated(f);
            SetRefcount(f, L1Entry.L2Offset(Qemu.ReadBE64(f, L2EntryOffset(f, 0))) / Header(f).ClusterSize, 2);
        },
        ["refcount-zero-for-data"] = f =>
        {
            Populated(f);
            SetRefcount(f, L1Entry.L2Offset(Qemu.ReadBE64(f, L2EntryOffset(f, 1 << 20))) / Header(f).ClusterSize, 0);
        },
        ["refcount-too-low-for-shared-cluster"] = f =>
        {
            Populated(f);
            Snapshot(f, "s1");
            SetRefcount(f, L1Entry.L2Offset(Qemu.ReadBE64(f, L2EntryOffset(f, 0))) / Header(f).ClusterSize, 1);
        },
        ["refcount-overflow"] = f =>
        {
            Qemu.Create(f, 64 << 20, "refcount_bits=1");
            Qemu.Io(f, "write -P 1 0 64k");
            Qemu.WriteBE64(f, L2EntryOffset(f, 0) + 8, Qemu.ReadBE64(f, L2EntryOffset(f, 0)));
        },
        ["refcount-table-entry-zero"] = f =>
        {
            Populated(f);
            Qemu.WriteBE64(f, (long)Header(f).RefcountTableOffset, 0);   // iotest 060 "empty refcount table"
        },
        ["refcount-block-zeroed"] = f =>
        {
            Qemu.Create(f, 64 << 20);
            Qemu.WriteBE64(f, FirstRefblock(f), 0);   // iotest 060 "empty refcount block"
            Tool.Run("qemu-io", ["-f", "qcow2", "-c", "write 0 64k", f]);   // QEMU refuses the write and marks the image corrupt
        },
        ["refcount-table-clusters-zero"] = f =>
        {
            Populated(f);
            Qemu.WriteBE32(f, Qcow2Header.RefcountTableFieldsOffset + 8, 0);   // iotest 060
        },
        ["refcount-table-past-end-of-file"] = f =>
        {
            Populated(f);
            Qemu.WriteBE64(f, Qcow2Header.RefcountTableFieldsOffset, (ulong)RoundUpToCluster(f, new FileInfo(f).Length) + 0x100000);
        },
        ["refcount-block-unaligned"] = f =>
        {
            Populated(f);
            Add64(f, (long)Header(f).RefcountTableOffset, 0x2a00);   // iotest 060 "unaligned reftable entry"
        },
        ["refcount-table-entry-reserved-bits"] = f =>
        {
            Populated(f);
            Or64(f, (long)Header(f).RefcountTableOffset, 0x100);
        },
        ["refcount-block-outside-image"] = f =>
        {
            Populated(f);
            Qemu.WriteBE64(f, (long)Header(f).RefcountTableOffset + 8, 0x1000_0000);
        },
        ["refcount-block-far-outside-image"] = f =>
        {
            Populated(f);
            Qemu.WriteBE64(f, (long)Header(f).RefcountTableOffset + 8, 0x00ff_ffff_0000_0000);   // iotest 060
        },
        ["refcount-block-shared-with-data"] = f =>
        {
            Populated(f);
            Qemu.WriteBE64(f, L2EntryOffset(f, 1 << 20), L2Entry.Copied | (ulong)FirstRefblock(f));
        },

        // Persistent bitmaps (qcow2_check_bitmaps_refcounts).
        ["bitmap-table-entry-unaligned"] = f => DamageBitmapTable(f, entry => entry + 0x200),
        ["bitmap-table-entry-reserved-bits"] = f => DamageBitmapTable(f, entry => entry | 0x2),

        // Header bits.
        ["dirty-with-leak"] = f =>
        {
            Populated(f, "lazy_refcounts=on");
            SetIncompatible(f, Qcow2Header.IncompatibleDirty);
            SetRefcount(f, 3, 2);
        },
        ["dirty-with-refcount-too-low"] = f =>
        {
            Populated(f, "lazy_refcounts=on");
            Snapshot(f, "s1");
            SetIncompatible(f, Qcow2Header.IncompatibleDirty);
            SetRefcount(f, L1Entry.L2Offset(Qemu.ReadBE64(f, L2EntryOffset(f, 0))) / Header(f).ClusterSize, 1);
        },
        ["dirty-with-unaligned-refcount-block"] = f =>
        {
            Qemu.Create(f, 64 << 20);
            Qemu.WriteBE64(f, (long)Header(f).RefcountTableOffset, 0xffff_2a00);   // iotest 060 "dirty corrupt image"
            SetIncompatible(f, Qcow2Header.IncompatibleDirty);
        },
        ["corrupt-bit-on-clean-image"] = f =>
        {
            Populated(f);
            SetIncompatible(f, Qcow2Header.IncompatibleCorrupt);
        },
        ["corrupt-bit-with-leak"] = f =>
        {
            Populated(f);
            SetIncompatible(f, Qcow2Header.IncompatibleCorrupt);
            SetRefcount(f, 3, 2);
        },
    };

    /// <summary>An image with a persistent bitmap that has data; the first used entry of its table changed.</summary>
    private static void DamageBitmapTable(string f, Func<ulong, ulong> change)
    {
        Populated(f);
        Tool.QemuImg("bitmap", "--add", f, "b0");
        Qemu.Io(f, "write -P 0x71 5M 1M");
        Qcow2Header h = Header(f);
        HeaderExtension ext = h.FindExtension(HeaderExtension.Bitmaps)!;
        BitmapDirectory dir;
        using (var device = FileBlockDevice.Open(f)) dir = BitmapDirectory.Read(device, ext.Data, new FileInfo(f).Length);
        BitmapDirectory.Entry bm = dir.Entries[0];
        for (long i = 0; i < bm.TableSize; i++)
        {
            long at = bm.TableOffset + i * 8;
            ulong entry = Qemu.ReadBE64(f, at);
            if ((entry & BitmapDirectory.TableEntryOffsetMask) == 0) continue;
            Qemu.WriteBE64(f, at, change(entry));
            return;
        }
        Assert.Fail("the bitmap table has no entry with data");
    }

    /// <summary>iotest 261's "botched v3": a v2 image's table (entries with 0, 50 and 8 bytes of extra data) in a header made v3 by hand.</summary>
    internal static void BotchedV3(string f)
    {
        Qemu.Create(f, 64 << 20, "compat=0.10");
        Qemu.Io(f, "write -P 1 0 64k");
        Snapshot(f, "sn0");
        Qemu.Io(f, "write -P 2 64k 64k");
        Snapshot(f, "sn1");
        Snapshot(f, "sn2");
        SetExtraDataSize(f, 0, 0);
        SetExtraDataSize(f, 1, 50, [.. new byte[24], .. "very important data"u8.ToArray()]);
        SetExtraDataSize(f, 2, 8);
        Qemu.WriteBE32(f, 4, 3);      // version
        Qemu.WriteBE32(f, 100, 0x68); // header length
        Qemu.WriteBE32(f, 96, 4);     // refcount order
    }
}
