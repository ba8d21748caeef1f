using System.Text.Json;
using CsCheck;
using Vmsnap.Qcow2;
using Vmsnap.Storage;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Qcow2;

/// <summary>Encoders and decoders of the on-disk structures: round trips and known layouts.</summary>
[Trait("Category", "Unit")]
public class FormatTests
{
    [Fact]
    public void Refcount_entries_of_every_width_round_trip_without_touching_their_neighbours()
    {
        Gen.Select(Gen.Int[0, 6], Gen.Int[0, 511], Gen.ULong).Sample((order, index, raw) =>
        {
            int bits = 1 << order;
            ulong max = bits == 64 ? ulong.MaxValue : (1UL << bits) - 1;
            ulong value = raw & max;
            byte[] block = new byte[4096];
            new Random(index).NextBytes(block);
            byte[] before = (byte[])block.Clone();
            RefcountBlock.Set(block, index, order, value);
            Assert.Equal(value, RefcountBlock.Get(block, index, order));
            for (int i = 0; i < 4096 * 8 / bits; i++)
                if (i != index) Assert.Equal(RefcountBlock.Get(before, i, order), RefcountBlock.Get(block, i, order));
        });
    }

    [Fact]
    public void Sub_byte_refcounts_pack_from_the_least_significant_bit()
    {
        // The refcount block of "qemu-img create -o cluster_size=512,refcount_bits=1" for 35 used clusters.
        byte[] qemu = [0xff, 0xff, 0xff, 0xff, 0x07, 0x00];
        for (int i = 0; i < 48; i++) Assert.Equal(i < 35 ? 1UL : 0UL, RefcountBlock.Get(qemu, i, 0));
        byte[] b = new byte[2];
        RefcountBlock.Set(b, 1, 1, 3);
        RefcountBlock.Set(b, 2, 2, 9);
        Assert.Equal(new byte[] { 0b0000_1100, 0x09 }, b);
        Assert.Throws<OverflowException>(() => RefcountBlock.Set(b, 0, 0, 2));
    }

    [Fact]
    public void L2_entries_round_trip_and_classify()
    {
        Gen.Select(Gen.ULong, Gen.ULong, Gen.Bool, Gen.Int[0, 100]).Sample((word, bitmap, extended, index) =>
        {
            byte[] table = new byte[4096];
            var e = new L2Entry(word, extended ? bitmap : 0);
            L2Entry.Write(table, index, extended, e);
            Assert.Equal(e, L2Entry.Read(table, index, extended));
        });
        Assert.Equal(ClusterKind.Unallocated, new L2Entry(0, 0).Kind(false));
        Assert.Equal(ClusterKind.ZeroPlain, new L2Entry(1, 0).Kind(false));
        Assert.Equal(ClusterKind.ZeroAllocated, new L2Entry(0x50001, 0).Kind(false));
        Assert.Equal(ClusterKind.Normal, new L2Entry(L2Entry.Copied | 0x50000, 0).Kind(false));
        Assert.Equal(ClusterKind.Unallocated, new L2Entry(1, 0).Kind(true));   // bit 0 means nothing with extended L2
        Assert.Equal(ClusterKind.Compressed, new L2Entry(L2Entry.CompressedFlag | 0x1234, 0).Kind(true));
    }

    [Fact]
    public void Compressed_descriptors_round_trip_for_every_cluster_size()
    {
        Gen.Select(Gen.Int[9, 21], Gen.Long[1, 1L << 40], Gen.Int[1, 1 << 20]).Sample((bits, offset, length) =>
        {
            var g = new ClusterGeometry(bits, false, 4);
            length = Math.Min(length, 1 << bits);
            offset &= (1L << Math.Min(g.CompressedSizeShift, 48)) - 1;
            L2Entry e = L2Entry.MakeCompressed(g, offset, length);
            (long o, int l) = e.CompressedRange(g);
            Assert.Equal(offset, o);
            Assert.True(l >= length && l < length + 512, $"{l} for {length}");
        });
    }

    private static readonly Gen<HeaderExtension> UnknownExtension =
        Gen.Select(Gen.UInt[0x1000_0000, 0x1fff_ffff], Gen.Byte.Array[0, 200], (type, data) => new HeaderExtension(type, data));

    [Fact]
    public void Headers_round_trip_with_unknown_extensions_and_fields()
    {
        Gen.Select(Gen.Int[12, 21], Gen.ULong[0, 1UL << 50], UnknownExtension.List[0, 4], Gen.Int[0, 12], Gen.String[0, 200]).Sample(
            (bits, size, unknown, extraFields, backing) =>
        {
            var h = new Qcow2Header
            {
                Version = 3, ClusterBits = bits, Size = size, L1Size = 7, L1TableOffset = 3UL << bits,
                RefcountTableOffset = 1UL << bits, RefcountTableClusters = 1, SnapshotCount = 2, SnapshotsOffset = 9UL << bits,
                IncompatibleFeatures = Qcow2Header.IncompatibleExtendedL2, CompatibleFeatures = 1, AutoclearFeatures = 1UL << 40,
                RefcountOrder = 5, HeaderLength = 112 + 8 * extraFields, CompressionType = 1,
                TrailingFields = Enumerable.Range(0, 7 + 8 * extraFields).Select(i => (byte)(i * 7)).ToArray(),
                BackingFile = backing.Length == 0 ? null : backing,
            };
            h.BackingFormat = backing.Length == 0 ? null : "raw";
            h.Extensions.AddRange(unknown);
            byte[] cluster = h.EncodeCluster();
            Qcow2Header back = Qcow2Header.Parse(cluster, cluster.Length);
            Assert.Equal(h.Size, back.Size);
            Assert.Equal(h.L1TableOffset, back.L1TableOffset);
            Assert.Equal(h.IncompatibleFeatures, back.IncompatibleFeatures);
            Assert.Equal(h.AutoclearFeatures, back.AutoclearFeatures);
            Assert.Equal(h.RefcountOrder, back.RefcountOrder);
            Assert.Equal(h.HeaderLength, back.HeaderLength);
            Assert.Equal(h.CompressionType, back.CompressionType);
            Assert.Equal(h.TrailingFields, back.TrailingFields);
            Assert.Equal(h.BackingFile, back.BackingFile);
            Assert.Equal(h.BackingFormat, back.BackingFormat);
            Assert.Equal(h.Extensions.Count, back.Extensions.Count);
            for (int i = 0; i < h.Extensions.Count; i++)
            {
                Assert.Equal(h.Extensions[i].Type, back.Extensions[i].Type);
                Assert.Equal(h.Extensions[i].Data, back.Extensions[i].Data);
            }
            Assert.Equal(cluster, back.EncodeCluster());
        });
    }

    [Fact]
    public void Snapshot_entries_round_trip_with_unknown_extra_data()
    {
        Gen.Select(Gen.String[0, 40], Gen.String[0, 300], Gen.Byte.Array[0, 100], Gen.ULong, Gen.Long).Sample((id, name, unknown, vmState, icount) =>
        {
            var e = new SnapshotEntry
            {
                L1TableOffset = 0x50000, L1Size = 12, Id = id, Name = name, DateSeconds = 1_700_000_000, DateNanoseconds = 123,
                VmClockNanoseconds = 987_654_321, VmStateSize32 = (uint)vmState, VmStateSizeLarge = vmState, DiskSize = 1 << 30,
                Icount = icount, UnknownExtraData = unknown,
            };
            byte[] bytes = new byte[e.EncodedLength];
            Assert.Equal(bytes.Length, e.Write(bytes));
            Assert.Equal(0, bytes.Length % 8);
            SnapshotEntry back = SnapshotEntry.Read(bytes, 0, 0, out int length);
            Assert.Equal(bytes.Length, length);
            Assert.Equal((e.Id, e.Name, e.L1TableOffset, e.L1Size, e.VmStateSize, e.DiskSize, e.Icount, e.VmClockNanoseconds),
                (back.Id, back.Name, back.L1TableOffset, back.L1Size, back.VmStateSize, back.DiskSize, back.Icount, back.VmClockNanoseconds));
            Assert.Equal(unknown, back.UnknownExtraData);
            byte[] again = new byte[back.EncodedLength];
            back.Write(again);
            Assert.Equal(bytes, again);
        });
    }

    [QemuFact]
    public void Snapshot_tables_qemu_writes_read_like_qemu_img_info_shows_them()
    {
        using var dir = new TempDir();
        string image = dir.File("snaps.qcow2");
        Qemu.Create(image, 64 << 20);
        Qemu.Io(image, "write -P 1 0 64k");
        Tool.QemuImg("snapshot", "-c", "first", image);
        Qemu.Io(image, "write -P 2 1M 64k");
        Tool.QemuImg("snapshot", "-c", "a much longer snapshot name, with spaces", image);
        Tool.QemuImg("snapshot", "-c", "third", image);
        Tool.QemuImg("snapshot", "-d", "first", image);
        JsonElement[] qemu = Qemu.Info(image).GetProperty("snapshots").EnumerateArray().ToArray();
        using var img = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true });
        List<SnapshotEntry> ours = img.Engine.State.Snapshots.Entries;
        Assert.Equal(qemu.Length, ours.Count);
        Assert.Equal(2, img.Info.SnapshotCount);
        for (int i = 0; i < ours.Count; i++)
        {
            Assert.Equal(qemu[i].GetProperty("id").GetString(), ours[i].Id);
            Assert.Equal(qemu[i].GetProperty("name").GetString(), ours[i].Name);
            Assert.Equal(qemu[i].GetProperty("vm-state-size").GetInt64(), ours[i].VmStateSize);
            Assert.Equal(qemu[i].GetProperty("date-sec").GetInt64(), ours[i].DateSeconds);
            Assert.Equal(qemu[i].GetProperty("date-nsec").GetInt64(), ours[i].DateNanoseconds);
            Assert.Equal(qemu[i].GetProperty("vm-clock-sec").GetInt64() * 1_000_000_000 + qemu[i].GetProperty("vm-clock-nsec").GetInt64(), (long)ours[i].VmClockNanoseconds);
            Assert.Equal((ulong)(64 << 20), ours[i].DiskSize);
            Assert.Equal(img.Engine.State.ActiveL1.Size, (int)ours[i].L1Size);
        }
        // Re-encoding the table gives QEMU's bytes back.
        Qcow2Header h = img.Engine.State.Header;
        byte[] onDisk = Qemu.ReadRaw(image, (long)h.SnapshotsOffset, (int)img.Engine.State.Snapshots.TableBytes);
        Assert.Equal(onDisk, SnapshotTable.Encode(ours));
    }

    [QemuFact]
    public void Rewriting_the_header_keeps_unknown_extensions_and_header_fields()
    {
        using var dir = new TempDir();
        string image = dir.File("u.qcow2");
        Qemu.Create(image, 64 << 20);
        Qemu.Io(image, "write -P 3 0 100k");
        // Give the image fields past QEMU's header and an extension nobody knows, as a newer QEMU might.
        Qcow2Header h = Qemu.Header(image);
        h.HeaderLength = 128;
        h.TrailingFields = [0, 0, 0, 0, 0, 0, 0, .. Enumerable.Range(1, 16).Select(i => (byte)i)];
        var unknown = new HeaderExtension(0x1badcafe, [1, 2, 3, 4, 5]);
        h.Extensions.Insert(0, unknown);
        Qemu.WriteRaw(image, 0, h.EncodeCluster());
        QemuImgCheck.AssertClean(image);   // QEMU opens it

        using (var img = Qcow2Image.Open(image))
        {
            img.Write(new byte[] { 9 }, 5);
            img.Engine.RewriteHeader();
        }
        Qcow2Header back = Qemu.Header(image);
        Assert.Equal(128, back.HeaderLength);
        Assert.Equal(h.TrailingFields, back.TrailingFields);
        HeaderExtension kept = Assert.Single(back.Extensions, e => e.Type == unknown.Type);
        Assert.Equal(unknown.Data, kept.Data);
        Assert.NotNull(back.FindExtension(HeaderExtension.FeatureNameTable));
        QemuImgCheck.AssertClean(image);
    }

    [Fact]
    public void Images_work_on_any_block_device()
    {
        var device = new MemoryBlockDevice();
        using (var img = Qcow2Image.Create(device, "memory", 8 << 20, new Qcow2CreateOptions { ClusterSize = 4096, ExtendedL2 = false }))
        {
            img.Write([1, 2, 3], 4095);
            Assert.True(img.Check().IsClean);
        }
        using var again = Qcow2Image.Open(new MemoryBlockDevice(device.ToArray()), "copy", new Qcow2OpenOptions { ReadOnly = true });
        byte[] b = new byte[3];
        again.Read(b, 4095);
        Assert.Equal(new byte[] { 1, 2, 3 }, b);
    }
}
