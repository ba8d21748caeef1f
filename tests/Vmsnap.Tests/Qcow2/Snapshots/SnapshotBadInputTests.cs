using System.Text;
using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Qcow2.Snapshots;

/// <summary>Damaged snapshot tables and snapshot L1 tables: clear errors that say what and where, and nothing written.</summary>
[Trait("Category", "Unit")]
public sealed class SnapshotBadInputTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    /// <summary>An image with two snapshots made by qemu-img ("first" ID 1, "second" ID 2), the second entry last in the file.</summary>
    private string Image(string name = "bad.qcow2")
    {
        string image = _dir.File(name);
        Qemu.Create(image, 16 << 20);
        Qemu.Io(image, "write -P 0x41 0 256k");
        Tool.QemuImg("snapshot", "-c", "first", image);
        Qemu.Io(image, "write -P 0x42 64k 64k");
        Tool.QemuImg("snapshot", "-c", "second", image);
        return image;
    }

    private static long TableOffset(string image) => (long)Qemu.ReadBE64(image, Qcow2Header.SnapshotFieldsOffset + 4);

    /// <summary>File offset of entry <paramref name="index"/> of the snapshot table.</summary>
    private static long EntryOffset(string image, int index)
    {
        long at = TableOffset(image);
        for (int i = 0; i < index; i++)
        {
            byte[] fixedPart = Qemu.ReadRaw(image, at, 40);
            int idLength = fixedPart[12] << 8 | fixedPart[13], nameLength = fixedPart[14] << 8 | fixedPart[15];
            int extra = (int)System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(fixedPart.AsSpan(36));
            at += (40 + extra + idLength + nameLength + 7) & ~7;
        }
        return at;
    }

    /// <summary>Runs every changing operation on the image and asserts each fails with <typeparamref name="T"/> mentioning <paramref name="words"/>, with the file's bytes unchanged.</summary>
    private static void AssertEveryChangeRefused<T>(string image, string target, params string[] words) where T : Exception
    {
        string hash = Qemu.Hash(image);
        var attempts = new (string What, Action<Qcow2Image> Run)[]
        {
            ("create", i => i.CreateSnapshot("third")),
            ("delete", i => i.DeleteSnapshot(target)),
            ("apply", i => i.ApplySnapshot(target)),
            ("find", i => i.FindSnapshot(target)),
            ("read VM state", i => i.OpenVmStateAreaForReading(target).Dispose()),
        };
        foreach ((string what, Action<Qcow2Image> run) in attempts)
        {
            using (var img = Qcow2Image.Open(image))
            {
                T e = Assert.Throws<T>(() => run(img));
                foreach (string w in words) Assert.True(e.Message.Contains(w, StringComparison.Ordinal), $"{what}: '{e.Message}' does not say '{w}'");
                Assert.Contains(image, e.Message);
            }
            Assert.True(hash == Qemu.Hash(image), $"{what} changed the file");
        }
    }

    [QemuFact]
    public void A_snapshot_table_past_the_end_of_the_file_is_refused_at_open()
    {
        string image = Image();
        Qemu.WriteBE64(image, Qcow2Header.SnapshotFieldsOffset + 4, (ulong)((new FileInfo(image).Length + (1 << 20)) & ~0xffffL));
        string hash = Qemu.Hash(image);
        var e = Assert.Throws<Qcow2FormatException>(() => Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }));
        Assert.Equal("snapshot table entry 0", e.Structure);
        Assert.Contains("beyond the end of the file", e.Message);
        Assert.Throws<Qcow2FormatException>(() => Qcow2Image.Open(image));
        Assert.Equal(hash, Qemu.Hash(image));
    }

    [QemuFact]
    public void Entries_whose_lengths_run_past_the_table_are_refused_at_open()
    {
        string image = Image();
        long second = EntryOffset(image, 1);
        // A name of 65535 bytes runs past the end of the file (the table is the last thing in it).
        Qemu.WriteRaw(image, second + 14, new byte[] { 0xff, 0xff });
        var e = Assert.Throws<Qcow2FormatException>(() => Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }));
        Assert.Equal("snapshot table entry 1", e.Structure);
        Assert.Equal(second + 40, e.FileOffset);
        Assert.Contains("beyond the end of the file", e.Message);

        string other = Image("extra.qcow2");
        Qemu.WriteBE32(other, EntryOffset(other, 0) + 36, 5000);   // extra data: at most 1024 bytes
        e = Assert.Throws<Qcow2FormatException>(() => Qcow2Image.Open(other, new Qcow2OpenOptions { ReadOnly = true }));
        Assert.Equal("snapshot table entry 0", e.Structure);
        Assert.Contains("extra data of 5000 bytes is too large", e.Message);

        string many = Image("count.qcow2");
        Qemu.WriteBE32(many, Qcow2Header.SnapshotFieldsOffset, 70_000);
        Assert.Contains("more than the 65536", Assert.Throws<Qcow2FormatException>(() => Qcow2Image.Open(many, new Qcow2OpenOptions { ReadOnly = true })).Message);
    }

    [QemuFact]
    public void Duplicate_ids_are_listed_but_no_snapshot_operation_runs()
    {
        string image = Image();
        long second = EntryOffset(image, 1);
        int extra = (int)System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(Qemu.ReadRaw(image, second + 36, 4));
        Assert.Equal("2", Encoding.ASCII.GetString(Qemu.ReadRaw(image, second + 40 + extra, 1)));
        Qemu.WriteRaw(image, second + 40 + extra, "1"u8);
        using (var img = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }))
            Assert.Equal(["1", "1"], img.Snapshots.Select(s => s.Id));
        AssertEveryChangeRefused<Qcow2FormatException>(image, "second", "snapshot table entry 1", "ID '1', the same as entry 0");
    }

    [QemuFact]
    public void A_snapshot_l1_table_outside_the_file_is_refused()
    {
        string image = Image();
        long first = EntryOffset(image, 0);
        Qemu.WriteBE64(image, first, (ulong)((new FileInfo(image).Length + (4 << 20)) & ~0xffffL));
        AssertEveryChangeRefused<Qcow2FormatException>(image, "first", "snapshot table entry 0", "snapshot 1 ('first')", "beyond the end of the file");
    }

    [QemuFact]
    public void A_snapshot_l1_entry_pointing_outside_the_file_is_refused()
    {
        string image = Image();
        long l1 = (long)Qemu.ReadBE64(image, EntryOffset(image, 0));
        Qemu.WriteBE64(image, l1, 0x7000_0000_0000UL);
        string hash = Qemu.Hash(image);
        foreach (Action<Qcow2Image> run in new Action<Qcow2Image>[] { i => i.DeleteSnapshot("first"), i => i.ApplySnapshot("first") })
        {
            using (var img = Qcow2Image.Open(image))
            {
                var e = Assert.Throws<Qcow2FormatException>(() => run(img));
                Assert.Equal("snapshot L1 table entry 0", e.Structure);
                Assert.Equal(l1, e.FileOffset);
                Assert.Contains("beyond the end of the file", e.Message);
            }
            Assert.Equal(hash, Qemu.Hash(image));
        }
    }

    [QemuFact]
    public void Bad_l1_sizes_and_offsets_are_refused()
    {
        string image = Image();
        Qemu.WriteBE32(image, EntryOffset(image, 1) + 8, 0x1000_0000);
        AssertEveryChangeRefused<Qcow2FormatException>(image, "second", "snapshot 2 ('second')", "larger than the 4194304 qcow2 allows");

        string unaligned = Image("unaligned.qcow2");
        long first = EntryOffset(unaligned, 0);
        Qemu.WriteBE64(unaligned, first, Qemu.ReadBE64(unaligned, first) + 512);
        AssertEveryChangeRefused<Qcow2FormatException>(unaligned, "first", "snapshot 1 ('first')", "not aligned to a cluster");
    }

    [QemuFact]
    public void Refcounts_too_narrow_to_share_a_cluster_refuse_a_snapshot_and_write_nothing()
    {
        string image = _dir.File("rc1.qcow2");
        Qemu.Create(image, 1 << 20, "refcount_bits=1");
        Qemu.Io(image, "write -P 1 0 64k");
        string hash = Qemu.Hash(image);
        using (var img = Qcow2Image.Open(image))
        {
            var e = Assert.Throws<Qcow2FormatException>(() => img.CreateSnapshot("x"));
            Assert.Contains("1-bit refcount", e.Message);
            Assert.Empty(img.Snapshots);
        }
        Assert.Equal(hash, Qemu.Hash(image));
        QemuImgCheck.AssertClean(image);
    }

    [QemuFact]
    public void Names_are_checked_and_lookups_go_by_id_first_then_name()
    {
        string image = _dir.File("names.qcow2");
        Qemu.Create(image, 1 << 20);
        using var img = Qcow2Image.Open(image);
        img.CreateSnapshot("a");
        img.CreateSnapshot("1");   // a name that is also an ID: the ID wins, as in QEMU
        Assert.Contains("already has a snapshot named 'a'", Assert.Throws<SnapshotExistsException>(() => img.CreateSnapshot("a")).Message);
        Assert.Throws<ArgumentException>(() => img.CreateSnapshot(""));
        Assert.Throws<ArgumentException>(() => img.CreateSnapshot(new string('x', 256)));
        Assert.Equal("a", img.FindSnapshot("1")!.Name);
        Assert.Equal("2", img.FindSnapshot("2")!.Id);
        Assert.Null(img.FindSnapshot("b"));
        var e = Assert.Throws<SnapshotNotFoundException>(() => img.DeleteSnapshot("b"));
        Assert.Equal("b", e.IdOrName);
        img.DeleteSnapshot("1");                   // ID 1: "a"
        Assert.Equal(["1"], img.Snapshots.Select(s => s.Name));
        Assert.Equal("3", img.CreateSnapshot("c").Id);   // highest ID + 1
    }

    [QemuFact]
    public void New_ids_follow_qemu_even_after_odd_ids()
    {
        Assert.Equal(0UL, SnapshotOperations.ParseIdLikeStrtoul("abc"));
        Assert.Equal(12UL, SnapshotOperations.ParseIdLikeStrtoul("  12abc"));
        Assert.Equal(7UL, SnapshotOperations.ParseIdLikeStrtoul("+7"));
        Assert.Equal(ulong.MaxValue, SnapshotOperations.ParseIdLikeStrtoul("99999999999999999999999"));
        Assert.Equal(ulong.MaxValue, SnapshotOperations.ParseIdLikeStrtoul("-1"));
        // An image whose only snapshot has the ID "4": vmsnap picks 5, then QEMU picks 6.
        string image = _dir.File("ids.qcow2");
        Qemu.Create(image, 1 << 20);
        Tool.QemuImg("snapshot", "-c", "q", image);
        long entry = TableOffset(image);
        Assert.Equal(1, Qemu.ReadRaw(image, entry + 13, 1)[0]);   // a one-byte ID
        int extra = (int)System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(Qemu.ReadRaw(image, entry + 36, 4));
        Qemu.WriteRaw(image, entry + 40 + extra, "4"u8);
        using (var img = Qcow2Image.Open(image)) Assert.Equal("5", img.CreateSnapshot("next").Id);
        Tool.QemuImg("snapshot", "-c", "byqemu", image);
        Assert.Equal(["4", "5", "6"], SnapshotKit.QemuList(image).Select(r => r.Id));
        QemuImgCheck.AssertClean(image);
    }
}
