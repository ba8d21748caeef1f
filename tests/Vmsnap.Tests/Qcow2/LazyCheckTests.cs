using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Qcow2;

/// <summary>
/// Writable opens check as QEMU does: a clean image is trusted, a dirty one repaired, and each
/// active L2 table validated when a write first uses it; corruption found refuses writes from then
/// on, with the file untouched. No walk of every table on open, so images of any size (more
/// clusters than an array can count) are writable.
/// </summary>
[Trait("Category", "Unit")]
public sealed class LazyCheckTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    private static long L2Offset(string image, int l1Index) =>
        (long)(Qemu.ReadBE64(image, (long)Qemu.Header(image).L1TableOffset + l1Index * 8L) & L1Entry.OffsetMask);

    [QemuFact]
    public void A_write_into_a_table_where_two_entries_claim_one_cluster_alone_is_refused_without_a_prior_check()
    {
        string image = _dir.File("shared.qcow2");
        Qemu.Create(image, 64 << 20);
        Qemu.Io(image, "write -P 0x11 0 128k", "write -P 0x22 3M 64k");
        long l2 = L2Offset(image, 0);
        Qemu.WriteBE64(image, l2 + 48 * 8, Qemu.ReadBE64(image, l2));   // guest cluster 48 gets cluster 0's host cluster (COPIED, refcount 1)
        Assert.True(QemuImgCheck.Field(QemuImgCheck.Of(image).Json, "corruptions") > 0);
        string hash = Qemu.Hash(image);
        using (var img = Qcow2Image.Open(image))
        {
            var e = Assert.Throws<Qcow2FormatException>(() => img.Write([1, 2, 3], 100));
            Assert.Contains("COPIED", e.Message);
            Assert.True(e.RepairNeeded, e.Message);   // the CLI then says: run 'vmsnap check --repair all' (CliErrorTests)
            // Found once, every later change is refused too.
            Assert.True(Assert.Throws<Qcow2FormatException>(() => img.Write([1], 40L << 20)).RepairNeeded);
            Assert.Throws<Qcow2FormatException>(() => img.CreateSnapshot("s"));
            Assert.Throws<Qcow2FormatException>(() => img.OpenVmStateAreaForWriting());
        }
        Assert.Equal(hash, Qemu.Hash(image));
    }

    [QemuFact]
    public void A_corrupt_table_no_write_uses_does_not_stop_writes_elsewhere_as_in_QEMU_and_is_refused_once_used()
    {
        // 4 KiB clusters: 2 MiB per L2 table. Table 5's entry for guest cluster 1 points past the end of the file.
        string image = _dir.File("lazy.qcow2");
        Qemu.Create(image, 64 << 20, "cluster_size=4k");
        Qemu.Io(image, "write -P 0x11 0 8k", "write -P 0x22 10M 8k");
        long l2 = L2Offset(image, 5);
        Qemu.WriteBE64(image, l2 + 8, L2Entry.Copied | (1UL << 40));
        string qemuCopy = _dir.File("qemu.qcow2");
        File.Copy(image, qemuCopy);
        Qemu.Io(qemuCopy, "write -P 0x33 0 4k");   // QEMU writes the healthy table without a murmur

        string hash = Qemu.Hash(image);
        using (var img = Qcow2Image.Open(image))
        {
            img.Write(Enumerable.Repeat((byte)0x33, 4096).ToArray(), 0);
            img.Flush();
            var e = Assert.Throws<Qcow2FormatException>(() => img.Write([1], 10L << 20));
            Assert.Contains("beyond the end of the file", e.Message);
            Assert.Throws<Qcow2FormatException>(() => img.Write([1], 0));   // found: refused everywhere now
        }
        Assert.NotEqual(hash, Qemu.Hash(image));
        foreach (string written in new[] { image, qemuCopy }) Qemu.Io(written, "read -P 0x33 0 4k", "read -P 0x11 4k 4k");
    }

    [QemuFact]
    public void An_image_with_more_clusters_than_an_array_can_hold_is_writable_and_QEMU_reads_what_was_written()
    {
        // 512-byte clusters, 2-bit refcounts, a sparse file of 1.1 TiB: more than 2^31 host clusters.
        // (qemu-img check refuses such an image: "File too large"; qemu-io reads it.)
        string image = _dir.File("huge.qcow2");
        Qemu.Create(image, 1L << 30, "cluster_size=512,refcount_bits=2");
        Qemu.Io(image, "write -P 0x33 0 64k");
        using (var f = new FileStream(image, FileMode.Open, FileAccess.Write)) f.SetLength(1100L << 30);
        Assert.True(new FileInfo(image).Length / 512 > Array.MaxLength);
        using (var img = Qcow2Image.Open(image))
        {
            img.Write(Enumerable.Repeat((byte)0x44, 65536).ToArray(), 1 << 20);
            img.CreateSnapshot("s");
            img.Write(Enumerable.Repeat((byte)0x55, 512).ToArray(), 100 << 10);
            byte[] back = new byte[65536];
            img.Read(back, 1 << 20);
            Assert.All(back, b => Assert.Equal(0x44, b));
        }
        Qemu.Io(image, "read -P 0x44 1M 64k", "read -P 0x33 0 64k", "read -P 0x55 100k 512");
        Assert.Contains("s", Tool.QemuImg("snapshot", "-l", image));
    }
}
