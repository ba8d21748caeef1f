using System.Text.Json;
using Vmsnap.Qcow2;
using Vmsnap.Storage;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Qcow2;

/// <summary>Images damaged on purpose: vmsnap's check counts what qemu-img check counts, and its repair leaves qemu-img check clean.</summary>
[Trait("Category", "Unit")]
public class CheckAndRepairTests
{
    /// <summary>Where a cluster's refcount lives, found by walking the refcount table.</summary>
    private static (long BlockOffset, long Index, int Order) RefcountEntry(string image, long cluster)
    {
        Qcow2Header h = Qemu.Header(image);
        var g = new ClusterGeometry(h.ClusterBits, h.HasExtendedL2, h.RefcountOrder);
        long table = (long)h.RefcountTableOffset;
        long block = (long)Qemu.ReadBE64(image, table + (cluster >> g.RefcountBlockBits) * 8);
        Assert.NotEqual(0, block);
        return (block, cluster & (g.RefcountBlockEntries - 1), h.RefcountOrder);
    }

    private static void SetRefcount(string image, long cluster, ulong value)
    {
        (long block, long index, int order) = RefcountEntry(image, cluster);
        int cs = Qemu.Header(image).ClusterSize;
        byte[] data = Qemu.ReadRaw(image, block, cs);
        RefcountBlock.Set(data, index, order, value);
        Qemu.WriteRaw(image, block, data);
    }

    /// <summary>Host offset of the L2 entry for a guest offset (standard L2 entries).</summary>
    private static long L2EntryOffset(string image, long guest)
    {
        Qcow2Header h = Qemu.Header(image);
        var g = new ClusterGeometry(h.ClusterBits, h.HasExtendedL2, h.RefcountOrder);
        long l2 = (long)(Qemu.ReadBE64(image, (long)h.L1TableOffset + g.L1Index(guest) * 8) & L1Entry.OffsetMask);
        Assert.NotEqual(0, l2);
        return l2 + (long)g.L2Index(guest) * g.L2EntrySize;
    }

    private static long HostCluster(string image, long guest) =>
        (long)(Qemu.ReadBE64(image, L2EntryOffset(image, guest)) & L2Entry.OffsetMask);

    private static void AssertSameCounts(string image, Qcow2CheckResult ours)
    {
        (JsonElement json, int exit) = QemuImgCheck.Of(image);
        string why = $"qemu: {json}\nvmsnap: {string.Join("\n", ours.Messages)}";
        Assert.True(QemuImgCheck.Field(json, "corruptions") == ours.Corruptions, why);
        Assert.True(QemuImgCheck.Field(json, "leaks") == ours.Leaks, why);
        Assert.True(QemuImgCheck.Field(json, "check-errors") == ours.CheckErrors, why);
        Assert.Equal(exit, ours.Corruptions > 0 ? 2 : ours.Leaks > 0 ? 3 : 0);
    }

    private static Qcow2CheckResult VmsnapCheck(string image, Qcow2RepairMode mode = Qcow2RepairMode.None)
    {
        return CheckParityTests.VmsnapCheck(image, mode);   // opened as vmsnap check opens
    }

    private static string Populated(TempDir dir, string name, string options = "", bool snapshot = false)
    {
        string image = dir.File(name);
        Qemu.Create(image, 64 << 20, options);
        Qemu.Io(image, "write -P 0x11 0 256k", "write -P 0x22 1M 64k", "write -z 2M 64k", "write -P 0x33 3M 100k");
        if (snapshot)
        {
            Tool.QemuImg("snapshot", "-c", "s1", image);
            Qemu.Io(image, "write -P 0x44 64k 64k");
        }
        return image;
    }

    public static TheoryData<string> Damages() => new()
    {
        "leaked-free-cluster", "data-refcount-too-high", "data-refcount-zero", "shared-refcount-too-low",
        "l2-refcount-too-high", "two-entries-one-cluster", "entry-past-end-of-file", "copied-flag-missing",
        "refcount-block-past-file-system-limit", "refcount-block-past-countable-clusters",
    };

    private static string Damage(TempDir dir, string damage, string options = "")
    {
        bool snapshot = damage == "shared-refcount-too-low";
        string image = Populated(dir, damage + ".qcow2", options, snapshot);
        int cs = Qemu.Header(image).ClusterSize;
        switch (damage)
        {
            case "leaked-free-cluster":
                long end = new FileInfo(image).Length;
                long cluster = (end + cs - 1) / cs;
                using (var f = new FileStream(image, FileMode.Open)) f.SetLength((cluster + 1) * cs);
                SetRefcount(image, cluster, 1);
                break;
            case "data-refcount-too-high":
                SetRefcount(image, HostCluster(image, 0) / cs, 2);
                break;
            case "data-refcount-zero":
                SetRefcount(image, HostCluster(image, 1 << 20) / cs, 0);
                break;
            case "shared-refcount-too-low":
                SetRefcount(image, HostCluster(image, 0) / cs, 1);
                break;
            case "l2-refcount-too-high":
                long l2 = L2EntryOffset(image, 0) & ~(long)(cs - 1);
                SetRefcount(image, l2 / cs, 3);
                break;
            case "two-entries-one-cluster":
                Qemu.WriteBE64(image, L2EntryOffset(image, 3 << 20), Qemu.ReadBE64(image, L2EntryOffset(image, 0)));
                break;
            case "entry-past-end-of-file":
                Qemu.WriteBE64(image, L2EntryOffset(image, 1 << 20), L2Entry.Copied | (1UL << 40));
                break;
            // A repair grows the file to reach the block, as QEMU's does; here the file system (ext4: 16 TiB)
            // or the in-memory counts refuse, and the refcount structure is rebuilt instead.
            case "refcount-block-past-file-system-limit":
                Qemu.WriteBE64(image, (long)Qemu.Header(image).RefcountTableOffset + 8, 1UL << 45);
                break;
            case "refcount-block-past-countable-clusters":
                Qemu.WriteBE64(image, (long)Qemu.Header(image).RefcountTableOffset + 8, 1UL << 50);
                break;
            case "copied-flag-missing":
                long at = L2EntryOffset(image, cs);
                Qemu.WriteBE64(image, at, Qemu.ReadBE64(image, at) & ~L2Entry.Copied);
                break;
        }
        return image;
    }

    [QemuTheory]
    [MemberData(nameof(Damages))]
    public void Damage_is_counted_and_repaired_like_qemu_img_check(string damage)
    {
        using var dir = new TempDir();
        string image = Damage(dir, damage);
        Qcow2CheckResult found = VmsnapCheck(image);
        Assert.False(found.IsClean);
        AssertSameCounts(image, found);

        AssertRepairsLikeQemu(dir, image, Qcow2RepairMode.All);
    }

    /// <summary>
    /// Repairs a copy with qemu-img check -r and the image with vmsnap: the same numbers fixed and
    /// left, the same guest content, and clean per qemu-img whenever qemu's own repair gets there.
    /// </summary>
    private static void AssertRepairsLikeQemu(TempDir dir, string image, Qcow2RepairMode mode)
    {
        string theirs = dir.File("theirs-" + Path.GetFileName(image));
        File.Copy(image, theirs, overwrite: true);
        QemuImgCheck q = QemuImgCheck.Of(theirs, "-r", mode == Qcow2RepairMode.All ? "all" : "leaks");
        JsonElement qemu = q.Json;
        Qcow2CheckResult ours = VmsnapCheck(image, mode);
        string why = $"qemu: {qemu}\nvmsnap: {string.Join("\n", ours.Messages)}";
        Assert.True(QemuImgCheck.Field(qemu, "corruptions") == ours.Corruptions, why);
        Assert.True(QemuImgCheck.Field(qemu, "leaks") == ours.Leaks, why);
        Assert.True(QemuImgCheck.Field(qemu, "corruptions-fixed") + QemuImgCheck.Field(qemu, "leaks-fixed") == ours.CorruptionsFixed + ours.LeaksFixed, why);
        if (q.ExitCode == 0)
        {
            Assert.True(ours.IsClean, why);
            QemuImgCheck.AssertClean(image);
        }
        AssertSameCounts(image, VmsnapCheck(image));
        Qemu.AssertSameContent(image, theirs, "qcow2");
    }

    [QemuTheory]
    [InlineData("leaked-free-cluster")]
    [InlineData("data-refcount-too-high")]
    [InlineData("l2-refcount-too-high")]
    public void Repairing_leaks_only_frees_leaked_clusters_like_qemu(string damage)
    {
        using var dir = new TempDir();
        string image = Damage(dir, damage);
        AssertRepairsLikeQemu(dir, image, Qcow2RepairMode.Leaks);
    }

    [QemuTheory]
    [InlineData("cluster_size=512,refcount_bits=1")]
    [InlineData("cluster_size=4k,refcount_bits=64")]
    [InlineData("extended_l2=on")]
    [InlineData("compat=0.10")]
    public void Damage_counts_match_for_other_layouts(string options)
    {
        using var dir = new TempDir();
        foreach (string damage in new[] { "leaked-free-cluster", "data-refcount-zero", "two-entries-one-cluster" })
        {
            if (options.Contains("extended_l2") && damage == "two-entries-one-cluster") continue;   // 16-byte entries: covered above
            string image = Damage(dir, damage, options);
            AssertSameCounts(image, VmsnapCheck(image));
            AssertRepairsLikeQemu(dir, image, Qcow2RepairMode.All);
        }
    }

    [QemuFact]
    public void A_dirty_lazy_refcounts_image_left_by_a_killed_qemu_is_repaired_before_writing()
    {
        using var dir = new TempDir();
        string image = dir.File("dirty.qcow2");
        Qemu.Create(image, 64 << 20, "lazy_refcounts=on");
        Tool.Result r = Tool.Run("qemu-io", ["-c", "write -P 0x5a 0 512", "-c", "write -P 0x5b 1M 70k", "-c", "sigraise 9", image]);
        Assert.NotEqual(0, r.ExitCode);
        Assert.True(Qemu.Info(image).GetProperty("dirty-flag").GetBoolean());
        (JsonElement before, _) = QemuImgCheck.Of(image);
        Assert.True(QemuImgCheck.Field(before, "corruptions") > 0);
        string expected = Qemu.ToRaw(image, dir);

        // Read-only: reads work, nothing is repaired or written.
        string hash = Qemu.Hash(image);
        using (var ro = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }))
        {
            Assert.True(ro.Info.Dirty);
            Qemu.AssertReadsLike(ro, expected, []);
            AssertSameCounts(image, ro.Check());
        }
        Assert.Equal(hash, Qemu.Hash(image));

        // Writable: the repair comes with the first change (not with the open: a refused change leaves the file as it was).
        using (var rw = Qcow2Image.Open(image))
        {
            Assert.True(rw.Info.Dirty);
            Assert.Equal(hash, Qemu.Hash(image));
            rw.Write(new byte[] { 9, 9, 9 }, 4096);
            Assert.False(rw.Info.Dirty);
        }
        Qemu.WriteRaw(expected, 4096, new byte[] { 9, 9, 9 });
        Assert.False(Qemu.Info(image).GetProperty("dirty-flag").GetBoolean());
        QemuImgCheck.AssertClean(image);
        Qemu.AssertSameContent(image, expected);
    }

    [QemuFact]
    public void Bitmaps_are_counted_like_qemu_and_block_writes()
    {
        using var dir = new TempDir();
        string image = Populated(dir, "bm.qcow2");
        Tool.QemuImg("bitmap", "--add", image, "b0");
        Qemu.Io(image, "write -P 0x71 5M 1M");
        (JsonElement json, int exit) = QemuImgCheck.Of(image);
        Assert.Equal(0, exit);
        Qcow2CheckResult r = VmsnapCheck(image);
        Assert.True(r.IsClean, string.Join("\n", r.Messages));
        Assert.Equal(QemuImgCheck.Field(json, "image-end-offset"), r.ImageEndOffset);
        string hash = Qemu.Hash(image);
        using (var img = Qcow2Image.Open(image))
        {
            var e = Assert.Throws<Qcow2FormatException>(() => img.Write(new byte[1], 0));
            Assert.Contains("bitmap", e.Message);
        }
        Assert.Equal(hash, Qemu.Hash(image));
    }
}
