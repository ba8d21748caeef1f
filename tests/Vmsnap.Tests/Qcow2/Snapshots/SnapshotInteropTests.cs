using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Qcow2.Snapshots;

/// <summary>Snapshots vmsnap makes, deletes and applies, judged by qemu-img (list, info, check, convert).</summary>
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

    [Theory]
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
        Qemu.AssertClean(image);
        using (var img = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }))
            SnapshotKit.AssertSameAsQemuInfo(img.Snapshots, image);

        using (var img = Qcow2Image.Open(image))
        {
            img.ApplySnapshot("first");
            model = (byte[])first.Clone();
            Write(img, cs + 1, Pattern(2 * cs, 6));
        }
        Qemu.AssertClean(image);
        SnapshotKit.AssertEqualBytes(model, SnapshotKit.QemuActiveContent(image, dir), "active disk after apply");
        SnapshotKit.AssertEqualBytes(first, SnapshotKit.QemuSnapshotContent(image, "first", dir), "snapshot first after apply");

        using (var img = Qcow2Image.Open(image))
            Assert.Equal("first", img.DeleteSnapshot("1").Name);
        Qemu.AssertClean(image);
        SnapshotKit.AssertEqualBytes(second, SnapshotKit.QemuSnapshotContent(image, "second", dir), "snapshot second after delete");
        SnapshotKit.AssertEqualBytes(model, SnapshotKit.QemuActiveContent(image, dir), "active disk after delete");
        using (var img = Qcow2Image.Open(image))
        {
            Assert.Equal("3", img.CreateSnapshot("third").Id);
            img.DeleteSnapshot("second");
            img.DeleteSnapshot("third");
            Assert.Empty(img.Snapshots);
        }
        Qemu.AssertClean(image);
        SnapshotKit.AssertEqualBytes(model, SnapshotKit.QemuActiveContent(image, dir), "active disk at the end");
    }
}
