using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Qcow2;

/// <summary>Images QEMU made and filled: vmsnap must read exactly what qemu-img convert -O raw gives.</summary>
[Trait("Category", "Unit")]
public class QemuWrittenImageTests
{
    /// <summary>qemu-io commands for one option set: aligned, unaligned, across an L2 boundary, zero writes, discards, subcluster-sized.</summary>
    internal static List<(string Command, long Offset, long Length)> Pattern(OptionSet o)
    {
        long cs = o.ClusterSize, sc = o.SubclusterSize, l2 = o.BytesPerL2, size = o.VirtualSize;
        var w = new List<(string, long, long)>();
        void Write(string how, long offset, long length) => w.Add(($"write {how} {offset} {length}", offset, length));
        Write("-P 0x11", 0, cs);                                   // one aligned cluster
        Write("-P 0x22", cs + 512, 3 * cs - 1024);                 // sector-aligned, several clusters
        Write("-P 0x33", 5 * cs + 123, 2 * cs + 77);               // unaligned both ends
        Write("-P 0x44", l2 - cs / 2 - 100, cs + 200);            // across the boundary between two L2 tables
        Write("-P 0x55", cs / 2 + 7, 100);                         // overwrite inside existing data
        Write("-z", 2 * cs + 100, 3 * cs);                         // zero write: partial and whole clusters
        Write("-P 0x66", 12 * cs, 4 * cs);
        Write("-z", 13 * cs, 2 * cs);                              // whole clusters become zero clusters
        w.Add(($"discard {14 * cs} {cs}", 14 * cs, cs));          // and unallocated
        Write("-P 0x77", 20 * cs + sc, sc);                        // one subcluster (extended L2) / partial cluster
        Write("-P 0x78", 21 * cs + 3 * sc + 5, 2 * sc);            // unaligned subclusters
        Write("-P 0x79", l2 + 30 * cs + 1, 1);                     // a single byte in the second L2 table
        Write("-P 0x7a", size - cs - 7, cs + 7);                   // up to the last byte of the disk
        return w;
    }

    [QemuTheory]
    [MemberData(nameof(Qemu.MatrixNames), MemberType = typeof(Qemu))]
    public void Vmsnap_reads_what_qemu_wrote(string name)
    {
        OptionSet o = Qemu.Set(name);
        using var dir = new TempDir();
        string image = dir.File("q.qcow2");
        Qemu.Create(image, o.VirtualSize, o.QemuOptions);
        var pattern = Pattern(o);
        Qemu.Io(image, pattern.Select(p => p.Command).ToArray());
        string raw = Qemu.ToRaw(image, dir);
        using var img = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true });
        Assert.Equal(o.VirtualSize, img.VirtualSize);
        Assert.Equal(o.ClusterSize, img.ClusterSize);
        Qemu.AssertReadsLike(img, raw, pattern.Select(p => (p.Offset, p.Length)));
        // Unaligned small reads across cluster and L2 boundaries, one byte at a time at the edges.
        using var file = File.OpenRead(raw);
        foreach ((long offset, int length) in new[] { (o.BytesPerL2 - 1, 2), (o.ClusterSize - 3, 7), (5L * o.ClusterSize + 122, 3), (o.VirtualSize - 1, 1) })
        {
            byte[] expected = new byte[length], actual = new byte[length];
            file.Position = offset;
            file.ReadExactly(expected);
            img.Read(actual, offset);
            Assert.Equal(expected, actual);
        }
    }

    [QemuFact]
    public void Check_of_a_clean_qemu_image_matches_qemu_img_check()
    {
        using var dir = new TempDir();
        foreach (string name in new[] { "v3-64k", "v3-512-rc1", "extl2-16k", "v2-512" })
        {
            OptionSet o = Qemu.Set(name);
            string image = dir.File(name + ".qcow2");
            Qemu.Create(image, o.VirtualSize, o.QemuOptions);
            Qemu.Io(image, Pattern(o).Select(p => p.Command).ToArray());
            (var json, int exit) = QemuImgCheck.Of(image);
            Assert.Equal(0, exit);
            using var img = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true });
            Qcow2CheckResult r = img.Check();
            Assert.True(r.IsClean, string.Join("\n", r.Messages));
            Assert.Equal(QemuImgCheck.Field(json, "total-clusters"), r.TotalClusters);
            Assert.Equal(QemuImgCheck.Field(json, "allocated-clusters"), r.AllocatedClusters);
            Assert.Equal(QemuImgCheck.Field(json, "fragmented-clusters"), r.FragmentedClusters);
            Assert.Equal(QemuImgCheck.Field(json, "compressed-clusters"), r.CompressedClusters);
            Assert.Equal(QemuImgCheck.Field(json, "image-end-offset"), r.ImageEndOffset);
        }
    }
}
