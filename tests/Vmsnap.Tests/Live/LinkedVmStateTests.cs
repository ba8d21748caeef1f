using System.Security.Cryptography;
using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Live;

/// <summary>
/// Linking a VM-state area written into the image file outside the engine (what a live save does once
/// QEMU released the image), checked with qemu-img; and where the live save puts that area.
/// </summary>
[Trait("Category", "Unit")]
public class LinkedVmStateTests
{
    private static byte[] Random(int length, int seed)
    {
        var data = new byte[length];
        new Random(seed).NextBytes(data);
        return data;
    }

    private static void WriteAt(string path, long offset, byte[] data)
    {
        using var f = new FileStream(path, FileMode.Open, FileAccess.Write);
        f.Position = offset;
        f.Write(data);
    }

    private static string Hash(string path) => Convert.ToHexString(SHA256.HashData(File.ReadAllBytes(path)));

    [QemuTheory]
    [InlineData(65536, 16, false)]
    [InlineData(512, 16, false)]      // small clusters: the region lies beyond the refcount table's reach, which must grow past it
    [InlineData(2 << 20, 64, false)]
    [InlineData(65536, 16, true)]     // extended L2 entries
    public void A_region_written_past_the_used_end_becomes_a_snapshots_VM_state(int clusterSize, int refcountBits, bool extendedL2)
    {
        using var dir = new TempDir();
        string image = dir.File("a.qcow2");
        Tool.QemuImg("create", "-q", "-f", "qcow2", "-o", $"cluster_size={clusterSize},refcount_bits={refcountBits},extended_l2={(extendedL2 ? "on" : "off")}", image, "64M");
        Tool.QemuIo("-c", "write -P 0x11 0 3M", image);
        Tool.QemuImg("snapshot", "-c", "older", image);
        Tool.QemuIo("-c", "write -P 0x22 1M 1M", image);
        byte[] state = Random(5 << 20 | 123, 7);   // not a whole number of clusters
        long offset;
        using (Qcow2Image img = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }))
            offset = (img.UsedEnd() + (40L << 20)) / clusterSize * clusterSize + clusterSize;
        WriteAt(image, offset, state);

        using (Qcow2Image img = Qcow2Image.Open(image))
        {
            long reserve = DetachedVmStatePlan.ReserveBelow(state.Length, clusterSize, refcountBits);
            Assert.Null(DetachedVmStateArea.Check(img, offset, state.Length, reserve));
            DetachedVmStateArea.Attach(img, offset, state.Length, reserve);
            img.CreateSnapshot("live", new Qcow2SnapshotCreateOptions { VmStateSize = state.Length, VmClock = 12345 });
        }
        QemuImgCheck.AssertClean(image);
        string listed = Tool.QemuImg("snapshot", "-l", image);
        Assert.Contains("older", listed);
        Assert.Contains("live", listed);

        using (Qcow2Image img = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }))
        {
            Qcow2Snapshot s = img.FindSnapshot("live")!;
            Assert.Equal(state.Length, s.VmStateSize);
            Assert.Equal(12345, s.VmClock);
            using Qcow2VmStateArea area = img.OpenVmStateAreaForReading(s);
            byte[] back = new byte[state.Length];
            Assert.Equal(state.Length, area.Read(back, 0));
            Assert.Equal(state, back);
        }
        // The disk of both snapshots and of the active layer is as QEMU wrote it.
        Tool.QemuIo("-c", "read -P 0x22 1M 1M", image);
        Tool.QemuImg("snapshot", "-a", "older", image);
        Tool.QemuIo("-c", "read -P 0x11 0 3M", image);
        QemuImgCheck.AssertClean(image);
    }

    [QemuFact]
    public void A_region_the_image_uses_or_that_is_cut_short_is_refused_with_nothing_changed()
    {
        using var dir = new TempDir();
        string image = dir.File("a.qcow2");
        Tool.QemuImg("create", "-q", "-f", "qcow2", image, "64M");
        Tool.QemuIo("-c", "write -P 0x11 0 4M", image);
        long used;
        using (Qcow2Image img = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true })) used = img.UsedEnd();
        long offset = used + (8L << 20);
        WriteAt(image, offset, Random(1 << 20, 3));
        string before = Hash(image);

        using (Qcow2Image img = Qcow2Image.Open(image))
        {
            // Overlapping the used clusters.
            string? problem = DetachedVmStateArea.Check(img, used - 65536, 1 << 20, 0);
            Assert.NotNull(problem);
            Assert.Contains("refcount", problem);
            var e = Assert.Throws<OperationRefusedException>(() => DetachedVmStateArea.Attach(img, used - 65536, 1 << 20, 0));
            Assert.Contains("cannot be linked", e.Message);
            // Room needed below it for refcount blocks reaches into the used clusters.
            Assert.NotNull(DetachedVmStateArea.Check(img, offset, 1 << 20, offset - used + 65536));
            // Longer than what the file holds.
            Assert.Contains("truncated", DetachedVmStateArea.Check(img, offset, 2 << 20, 0));
            // Not aligned to a cluster.
            Assert.NotNull(DetachedVmStateArea.Check(img, offset + 512, 4096, 0));
        }
        Assert.Equal(before, Hash(image));
    }

    [QemuFact]
    public void Linking_drops_what_the_active_table_mapped_past_the_disk_before()
    {
        using var dir = new TempDir();
        string image = dir.File("a.qcow2");
        Tool.QemuImg("create", "-q", "-f", "qcow2", image, "64M");
        using (Qcow2Image img = Qcow2Image.Open(image))
        {
            // A save that never made its snapshot: its VM state stays mapped in the active L1 table.
            using Qcow2VmStateArea area = img.OpenVmStateAreaForWriting();
            area.Write(Random(3 << 20, 5), 0);
            area.Flush();
        }
        long offset;
        using (Qcow2Image img = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true })) offset = img.UsedEnd() + (4L << 20);
        byte[] state = Random(2 << 20, 9);
        WriteAt(image, offset, state);
        using (Qcow2Image img = Qcow2Image.Open(image))
        {
            DetachedVmStateArea.Attach(img, offset, state.Length, 4 << 16);
            img.CreateSnapshot("s", new Qcow2SnapshotCreateOptions { VmStateSize = state.Length });
            using Qcow2VmStateArea area = img.OpenVmStateAreaForReading("s");
            byte[] back = new byte[state.Length];
            area.Read(back, 0);
            Assert.Equal(state, back);
        }
        QemuImgCheck.AssertClean(image);
    }

    [QemuFact]
    public void A_linked_area_no_snapshot_took_is_dropped_and_its_space_given_back()
    {
        using var dir = new TempDir();
        string image = dir.File("a.qcow2");
        Tool.QemuImg("create", "-q", "-f", "qcow2", image, "64M");
        Tool.QemuIo("-c", "write -P 0x11 0 1M", image);
        long length = new FileInfo(image).Length;
        long offset = length + (4L << 20);
        WriteAt(image, offset, Random(3 << 20, 1));
        using (Qcow2Image img = Qcow2Image.Open(image))
        {
            DetachedVmStateArea.Attach(img, offset, 3 << 20, 4 << 16);
            DetachedVmStateArea.Discard(img);
        }
        // The VM state's 3 MiB are gone; what linking allocated for its tables (a larger L1 table, a
        // refcount block) may stay, in use and counted.
        Assert.True(new FileInfo(image).Length <= length + (1 << 20), $"{new FileInfo(image).Length} > {length} + 1 MiB");
        QemuImgCheck.AssertClean(image);
        Tool.QemuIo("-c", "read -P 0x11 0 1M", image);

        // A region written but never linked goes with a trim.
        long linkedLength = new FileInfo(image).Length;
        WriteAt(image, linkedLength + (8L << 20), Random(1 << 20, 2));
        using (Qcow2Image img = Qcow2Image.Open(image)) DetachedVmStateArea.Discard(img);
        Assert.True(new FileInfo(image).Length <= linkedLength);
    }
}

/// <summary>Where a live save puts the VM state: past what QEMU may allocate, less the large free runs QEMU fills first.</summary>
[Trait("Category", "Unit")]
public class DetachedVmStatePlanTests
{
    private static Qcow2ImageInfo Image(long virtualSize, int clusterSize = 65536, int refcountBits = 16) => new()
    {
        Path = "x", Version = 3, VirtualSize = virtualSize, ClusterSize = clusterSize, RefcountBits = refcountBits, LazyRefcounts = false,
        ExtendedL2 = false, Corrupt = false, Dirty = false, CompressionType = Qcow2CompressionType.Zlib, L1Size = 1, SnapshotCount = 0,
        FileSize = 1 << 20, IncompatibleFeatures = 0, CompatibleFeatures = 0, AutoclearFeatures = 0,
    };

    [Fact]
    public void A_fresh_image_gets_its_region_past_the_whole_virtual_disk_and_its_metadata()
    {
        DetachedVmStatePlan p = DetachedVmStatePlan.For(Image(10L << 30), usedEnd: 1 << 20, refcountReach: 1L << 44, highestWrite: 3 << 20, dirtyBitmaps: [], freeRuns: []);
        Assert.Equal(3 << 20, p.Base);
        Assert.True(p.Bound >= 10L << 30, $"bound {p.Bound}");
        Assert.True(p.Offset >= p.Base + p.Bound + DetachedVmStatePlan.Margin);
        Assert.Equal(0, p.Offset % (1 << 20));
    }

    [Fact]
    public void Persistent_bitmaps_and_a_refcount_table_that_must_grow_widen_the_bound()
    {
        var plain = DetachedVmStatePlan.For(Image(1L << 30), 1 << 20, 1L << 44, 0, [], []);
        var bitmaps = DetachedVmStatePlan.For(Image(1L << 30), 1 << 20, 1L << 44, 0, [(512, true)], []);
        var volatileOnly = DetachedVmStatePlan.For(Image(1L << 30), 1 << 20, 1L << 44, 0, [(512, false)], []);
        var growing = DetachedVmStatePlan.For(Image(1L << 30), 1 << 20, 4L << 20, 0, [], []);
        Assert.True(bitmaps.Bound >= plain.Bound + ((1L << 30) / 512 / 8), "a persistent bitmap of 512-byte granularity: 256 KiB per GiB");
        Assert.Equal(plain.Bound, volatileOnly.Bound);
        Assert.True(growing.Bound > plain.Bound + (2L << 30), "a refcount table move lands at the next refcount-block boundary (2 GiB here)");
    }

    [Fact]
    public void Large_free_runs_below_the_used_end_count_small_ones_do_not()
    {
        Qcow2ImageInfo image = Image(1L << 30);
        long used = 4L << 30;
        DetachedVmStatePlan none = DetachedVmStatePlan.For(image, used, 1L << 44, 0, dirtyBitmaps: [], freeRuns: []);
        DetachedVmStatePlan small = DetachedVmStatePlan.For(image, used, 1L << 44, 0, dirtyBitmaps: [], freeRuns: [(1L << 30, DetachedVmStatePlan.RunMinimum - 65536)]);
        DetachedVmStatePlan big = DetachedVmStatePlan.For(image, used, 1L << 44, 0, dirtyBitmaps: [], freeRuns: [(1L << 30, 600L << 20)]);
        DetachedVmStatePlan huge = DetachedVmStatePlan.For(image, used, 1L << 44, 0, dirtyBitmaps: [], freeRuns: [(1L << 30, 3L << 30)]);
        Assert.Equal(none.Offset, small.Offset);
        Assert.Equal(none.Offset - (600L << 20) + DetachedVmStatePlan.RunSlack, big.Offset);
        Assert.Equal(used + DetachedVmStatePlan.MinimumGap, huge.Offset);   // never closer than the minimum gap
    }
}
