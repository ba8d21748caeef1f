using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Qcow2;

/// <summary>Clusters shared with internal snapshots (made by qemu-img snapshot -c) are copied on write.</summary>
[Trait("Category", "Unit")]
public class SnapshotCowTests
{
    [QemuTheory]
    [InlineData("v3-64k")]
    [InlineData("v2-512")]
    [InlineData("v3-4k-rc2")]
    [InlineData("v3-512-rc64")]
    [InlineData("extl2-16k")]
    [InlineData("extl2-64k")]
    public void Writes_after_a_qemu_snapshot_copy_shared_clusters_and_leave_the_snapshot_intact(string name)
    {
        OptionSet o = Qemu.Set(name);
        using var dir = new TempDir();
        string image = dir.File("s.qcow2");
        Qemu.Create(image, o.VirtualSize, o.QemuOptions);
        Qemu.Io(image, QemuWrittenImageTests.Pattern(o).Select(p => p.Command).ToArray());
        Tool.QemuImg("snapshot", "-c", "before", image);
        Qemu.Io(image, $"write -P 0x5c {3 * o.ClusterSize + 17} {2 * o.ClusterSize}");
        Tool.QemuImg("snapshot", "-c", "middle", image);
        string before = Qemu.ToRaw(image, dir, "before");
        string middle = Qemu.ToRaw(image, dir, "middle");
        string expected = Qemu.ToRaw(image, dir);   // the active disk, to be changed like the image

        using (var img = Qcow2Image.Open(image))
        {
            Qcow2Engine e = img.Engine;
            Assert.Equal(["before", "middle"], e.State.Snapshots.Entries.Select(s => s.Name));
            Assert.Equal(["1", "2"], e.State.Snapshots.Entries.Select(s => s.Id));
            VmsnapWrittenImageTests.RandomWrites(img, expected, o, seed: 11, count: 24);
            // Whole-cluster, partial-cluster and subcluster writes over data both snapshots share.
            byte[] data = new byte[o.ClusterSize + 1];
            new Random(3).NextBytes(data);
            img.Write(data, o.ClusterSize / 2);
            Qemu.WriteRaw(expected, o.ClusterSize / 2, data);
            img.Write(data.AsSpan(0, 5), 3L * o.ClusterSize + 11);
            Qemu.WriteRaw(expected, 3L * o.ClusterSize + 11, data.AsSpan(0, 5));
            img.Flush();

            // vmsnap reads each snapshot through its own L1 table.
            foreach ((SnapshotEntry sn, string raw) in new[] { (e.State.Snapshots.Entries[0], before), (e.State.Snapshots.Entries[1], middle) })
            {
                L1Table l1 = e.Mapping.ReadL1Table(sn.L1TableOffset, sn.L1Size, "snapshot L1 table");
                byte[] want = Qemu.ReadRaw(raw, 0, (int)Math.Min(o.VirtualSize, 32 << 20));
                byte[] got = new byte[want.Length];
                e.ReadGuest(got, 0, l1);
                Assert.True(want.AsSpan().SequenceEqual(got), $"snapshot {sn.Name} reads differently through vmsnap");
            }
        }
        QemuImgCheck.AssertClean(image);
        Qemu.AssertSameContent(image, expected);
        File.Move(before, dir.File("before-copy.raw"));
        File.Move(middle, dir.File("middle-copy.raw"));
        Qemu.AssertSameRaw(dir.File("before-copy.raw"), Qemu.ToRaw(image, dir, "before"));
        Qemu.AssertSameRaw(dir.File("middle-copy.raw"), Qemu.ToRaw(image, dir, "middle"));
        // Deleting the snapshots with QEMU afterwards leaves no leak: vmsnap's refcounts were exact.
        Tool.QemuImg("snapshot", "-d", "before", image);
        Tool.QemuImg("snapshot", "-d", "middle", image);
        QemuImgCheck.AssertClean(image);
        Qemu.AssertSameContent(image, expected);
    }

    [QemuFact]
    public void Zeroing_and_discarding_shared_clusters_keeps_the_snapshot()
    {
        OptionSet o = Qemu.Set("v3-64k");
        using var dir = new TempDir();
        string image = dir.File("z.qcow2");
        Qemu.Create(image, 64 << 20);
        Qemu.Io(image, "write -P 0x21 0 1M");
        Tool.QemuImg("snapshot", "-c", "s", image);
        string snap = Qemu.ToRaw(image, dir, "s");
        string expected = Qemu.ToRaw(image, dir);
        using (var img = Qcow2Image.Open(image))
        {
            img.WriteZeroes(65536, 3 * 65536 + 100);
            Qemu.WriteRaw(expected, 65536, new byte[3 * 65536 + 100]);
            img.Discard(5 * 65536, 2 * 65536);
            Qemu.WriteRaw(expected, 5 * 65536, new byte[2 * 65536]);
        }
        QemuImgCheck.AssertClean(image);
        Qemu.AssertSameContent(image, expected);
        Assert.Equal(Qemu.Hash(snap), Qemu.Hash(Qemu.ToRaw(image, dir, "s")));
    }
}
