using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Qcow2.Snapshots;

/// <summary>Snapshots vmsnap makes, deletes and applies, judged by qemu-img (list, info, check, convert).</summary>
[Trait("Category", "Unit")]
public class SnapshotInteropTests
{
    public static TheoryData<string> Configurations() =>
        ["v3-64k", "v2-512", "v3-4k-rc2", "v3-512-rc64", "extl2-16k", "v3-64k-rc4-lazy", "v3-4k-rc32"];

    private static byte[] Pattern(int length, int seed)
    {
        byte[] b = new byte[length];
        new Random(seed).NextBytes(b);
        return b;
    }

    [QemuTheory]
    [MemberData(nameof(Configurations))]
    public void Create_delete_apply_agree_with_qemu(string name)
    {
        OptionSet o = Qemu.Set(name);
        long size = Math.Min(o.VirtualSize, 8L << 20);
        int cs = o.ClusterSize;
        using var dir = new TempDir();
        string image = dir.File("s.qcow2");
        Qemu.Create(image, size, o.QemuOptions);
        byte[] model = new byte[size];
        void Write(Qcow2Image img, long offset, byte[] data)
        {
            img.Write(data, offset);
            data.CopyTo(model, offset);
        }

        byte[] first, second;
        using (var img = Qcow2Image.Open(image))
        {
            Write(img, 0, Pattern(3 * cs + 17, 1));
            Write(img, size / 2 + 5, Pattern(cs, 2));
            Qcow2Snapshot a = img.CreateSnapshot("first");
            Assert.Equal("1", a.Id);
            first = (byte[])model.Clone();
            Write(img, cs / 2, Pattern(cs, 3));                 // copy-on-write of shared data
            Write(img, size - cs - 3, Pattern(cs + 3, 4));
            img.WriteZeroes(2L * cs, cs);
            Array.Clear(model, 2 * cs, cs);
            Qcow2Snapshot b = img.CreateSnapshot("second", new Qcow2SnapshotCreateOptions { VmClock = 1_500_000_000 });
            Assert.Equal("2", b.Id);
            second = (byte[])model.Clone();
            Write(img, 7, Pattern(100, 5));
        }
        SnapshotKit.AssertEqualBytes(first, SnapshotKit.QemuSnapshotContent(image, "first", dir), "snapshot first");
        SnapshotKit.AssertEqualBytes(second, SnapshotKit.QemuSnapshotContent(image, "second", dir), "snapshot second");
        SnapshotKit.AssertEqualBytes(model, SnapshotKit.QemuActiveContent(image, dir), "active disk");
        QemuImgCheck.AssertClean(image);
        using (var img = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }))
            SnapshotKit.AssertSameAsQemuInfo(img.Snapshots, image);

        using (var img = Qcow2Image.Open(image))
        {
            img.ApplySnapshot("first");
            model = (byte[])first.Clone();
            Write(img, cs + 1, Pattern(2 * cs, 6));
        }
        QemuImgCheck.AssertClean(image);
        SnapshotKit.AssertEqualBytes(model, SnapshotKit.QemuActiveContent(image, dir), "active disk after apply");
        SnapshotKit.AssertEqualBytes(first, SnapshotKit.QemuSnapshotContent(image, "first", dir), "snapshot first after apply");

        using (var img = Qcow2Image.Open(image))
            Assert.Equal("first", img.DeleteSnapshot("1").Name);
        QemuImgCheck.AssertClean(image);
        SnapshotKit.AssertEqualBytes(second, SnapshotKit.QemuSnapshotContent(image, "second", dir), "snapshot second after delete");
        SnapshotKit.AssertEqualBytes(model, SnapshotKit.QemuActiveContent(image, dir), "active disk after delete");
        using (var img = Qcow2Image.Open(image))
        {
            Assert.Equal("3", img.CreateSnapshot("third").Id);
            img.DeleteSnapshot("second");
            img.DeleteSnapshot("third");
            Assert.Empty(img.Snapshots);
        }
        QemuImgCheck.AssertClean(image);
        SnapshotKit.AssertEqualBytes(model, SnapshotKit.QemuActiveContent(image, dir), "active disk at the end");
    }

    [QemuFact]
    public void Snapshots_of_an_overlay_and_of_compressed_clusters_agree_with_qemu()
    {
        using var dir = new TempDir();
        string raw = dir.File("source.raw");
        byte[] source = new byte[4 << 20];
        for (int i = 0; i < source.Length; i += 4096) source.AsSpan(i, 2048).Fill((byte)(i >> 12));   // compressible
        File.WriteAllBytes(raw, source);
        string compressed = dir.File("c.qcow2");
        Tool.QemuImg("convert", "-c", "-O", "qcow2", raw, compressed);
        string overlay = dir.File("o.qcow2");
        Qemu.Create(overlay, 4 << 20, backing: "c.qcow2");
        Tool.QemuImg("snapshot", "-c", "q", compressed);

        foreach (string image in new[] { compressed, overlay })
        {
            byte[] before = SnapshotKit.QemuActiveContent(image, dir);
            using (var img = Qcow2Image.Open(image))
            {
                img.CreateSnapshot("v");
                img.Write(Pattern(70_000, 9), 100_000);   // copy-on-write of compressed or backing data
            }
            QemuImgCheck.AssertClean(image);
            SnapshotKit.AssertEqualBytes(before, SnapshotKit.QemuSnapshotContent(image, "v", dir), $"{Path.GetFileName(image)}: snapshot v");
            using (var img = Qcow2Image.Open(image)) img.ApplySnapshot("v");
            SnapshotKit.AssertEqualBytes(before, SnapshotKit.QemuActiveContent(image, dir), $"{Path.GetFileName(image)}: after apply");
            using (var img = Qcow2Image.Open(image)) img.DeleteSnapshot("v");
            QemuImgCheck.AssertClean(image);
            SnapshotKit.AssertEqualBytes(before, SnapshotKit.QemuActiveContent(image, dir), $"{Path.GetFileName(image)}: after delete");
        }
        using (var img = Qcow2Image.Open(compressed)) img.DeleteSnapshot("q");
        QemuImgCheck.AssertClean(compressed);
    }

    [QemuFact]
    public void Extra_data_vmsnap_does_not_know_survives_table_rewrites_by_vmsnap_and_qemu()
    {
        using var dir = new TempDir();
        string image = dir.File("x.qcow2");
        Qemu.Create(image, 4 << 20);
        Tool.QemuImg("snapshot", "-c", "a", image);
        byte[] unknown = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
        using (var img = Qcow2Image.Open(image))
        {
            img.Engine.State.Snapshots.Entries[0].UnknownExtraData = unknown;   // as if a newer QEMU had written it
            img.CreateSnapshot("b");                              // vmsnap rewrites the table
        }
        QemuImgCheck.AssertClean(image);
        Tool.QemuImg("snapshot", "-c", "c", image);              // QEMU rewrites it too
        Tool.QemuImg("snapshot", "-d", "b", image);
        using (var img = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }))
        {
            Assert.Equal(["a", "c"], img.Snapshots.Select(s => s.Name));
            Assert.Equal(unknown, img.Engine.State.Snapshots.Entries[0].UnknownExtraData);
            Assert.Equal(4 << 20, img.Snapshots[0].DiskSize);
        }
        QemuImgCheck.AssertClean(image);
    }
}
