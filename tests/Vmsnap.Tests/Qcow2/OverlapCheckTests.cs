using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Qcow2;

/// <summary>
/// The metadata overlap check around the refused write: what the image handle does afterwards,
/// what the settings (QEMU's overlap-check) let through, that normal work never trips the strictest
/// setting, and that a dirty image is repaired only for a change that goes ahead.
/// </summary>
[Trait("Category", "Interop")]
public sealed class OverlapCheckTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    /// <summary>A 64 MiB image made by qemu-img whose first L1 entry points at the L1 table itself (COPIED set), as in QEMU's iotest 060.</summary>
    private string L1PointingAtItself(string name)
    {
        string image = _dir.File(name);
        Qemu.Create(image, 64 << 20);
        long l1 = (long)Qemu.Header(image).L1TableOffset;
        Qemu.WriteBE64(image, l1, L2Entry.Copied | (ulong)l1);
        return image;
    }

    private static byte[] WithCorruptBit(byte[] image)
    {
        byte[] b = (byte[])image.Clone();
        b[Qcow2Header.IncompatibleFeaturesOffset + 7] |= (byte)Qcow2Header.IncompatibleCorrupt;
        return b;
    }

    [QemuFact]
    public void After_a_refused_write_the_open_image_refuses_every_change_still_reads_and_closes_with_only_the_corrupt_bit_set()
    {
        string image = L1PointingAtItself("refused.qcow2");
        byte[] before = File.ReadAllBytes(image);
        using (var img = Qcow2Image.Open(image))
        {
            var e = Assert.Throws<Qcow2FormatException>(() => img.Write(new byte[512], 0));
            Assert.Equal("active L1 table", e.Structure);
            Assert.Equal((long)Qemu.Header(image).L1TableOffset, e.FileOffset);
            Assert.True(img.Info.Corrupt);
            Assert.Throws<Qcow2FormatException>(() => img.Write(new byte[512], 1 << 20));
            Assert.Throws<Qcow2FormatException>(() => img.WriteZeroes(0, 65536));
            Assert.Throws<Qcow2FormatException>(() => img.CreateSnapshot("s"));
            Assert.Throws<Qcow2FormatException>(() => img.OpenVmStateAreaForWriting());
            byte[] read = new byte[512];
            img.Read(read, 32 << 20);   // an unmapped range: zeroes, from the tables on disk
            Assert.All(read, b => Assert.Equal(0, b));
            img.Flush();
        }
        Assert.Equal(WithCorruptBit(before), File.ReadAllBytes(image));
        Assert.True(Corrupt(image));
    }

    private static bool Corrupt(string image) => Qemu.Info(image).GetProperty("format-specific").GetProperty("data").GetProperty("corrupt").GetBoolean();

    [QemuFact]
    public void Overlap_check_none_lets_the_write_through_as_qemu_does()
    {
        string ours = L1PointingAtItself("ours.qcow2"), theirs = _dir.File("theirs.qcow2");
        File.Copy(ours, theirs);
        byte[] data = Enumerable.Repeat((byte)0x2a, 512).ToArray();
        using (var img = Qcow2Image.Open(ours, new Qcow2OpenOptions { OverlapCheck = Qcow2OverlapCheck.None }))
            img.Write(data, 0);
        string said = Tool.QemuIo("-c", $"open -o overlap-check=none {theirs}", "-c", "write -P 0x2a 0 512");
        Assert.DoesNotContain("failed", said, StringComparison.Ordinal);
        // Both overwrote their L1 table with the guest's bytes, the same way.
        Assert.Equal(Qemu.Hash(theirs), Qemu.Hash(ours));
    }

    [QemuFact]
    public void Overlap_check_constant_does_not_look_at_refcount_blocks_cached_does_and_a_repair_clears_the_corrupt_bit_as_qemu_img_does()
    {
        // A data cluster that is the refcount block (iotest 060): only the cached set knows the blocks.
        string image = _dir.File("refblock.qcow2");
        Qemu.Create(image, 64 << 20);
        Qemu.Io(image, "write -P 1 0 64k");
        long l1 = (long)Qemu.Header(image).L1TableOffset;
        long l2 = (long)(Qemu.ReadBE64(image, l1) & L1Entry.OffsetMask);
        long block = (long)(Qemu.ReadBE64(image, (long)Qemu.Header(image).RefcountTableOffset) & L1Entry.OffsetMask);
        long data = (long)(Qemu.ReadBE64(image, l2) & L1Entry.OffsetMask);
        Qemu.WriteBE64(image, l2, L2Entry.Copied | (ulong)block);
        Qemu.WriteRaw(image, block + 2 * (data >> 16), new byte[2]);   // the old data cluster is free now, the block counted once
        string copy = _dir.File("constant.qcow2");
        File.Copy(image, copy);

        byte[] before = File.ReadAllBytes(image);
        using (var img = Qcow2Image.Open(image))
            Assert.Equal("refcount block", Assert.Throws<Qcow2FormatException>(() => img.Write(new byte[512], 0)).Structure);
        Assert.Equal(WithCorruptBit(before), File.ReadAllBytes(image));

        // Marked corrupt, it is repaired as qemu-img check -r all repairs it (iotest 060): the bit goes, the image is clean, writes work.
        string theirs = _dir.File("theirs.qcow2");
        File.Copy(image, theirs);
        Tool.Run("qemu-img", ["check", "-r", "all", theirs]);
        Qcow2CheckResult repaired = Qcow2Image.Check(image, Qcow2RepairMode.All);
        Assert.Equal(Corrupt(theirs), Corrupt(image));
        Assert.False(Corrupt(image));
        Assert.True(repaired.IsClean, string.Join("\n", repaired.Messages));
        using (var img = Qcow2Image.Open(image)) img.Write(new byte[512], 0);
        QemuImgCheck.AssertClean(image);

        using (var img = Qcow2Image.Open(copy, new Qcow2OpenOptions { OverlapCheck = Qcow2OverlapCheck.Constant }))
            img.Write(Enumerable.Repeat((byte)0x2a, 512).ToArray(), 0);
        Assert.Equal(0x2a, Qemu.ReadRaw(copy, block, 1)[0]);   // written through, as QEMU's constant set lets it
    }

    [QemuFact]
    public void Normal_work_never_trips_the_strictest_check()
    {
        string image = _dir.File("all.qcow2");
        Qemu.Create(image, 64 << 20, "cluster_size=4k");
        Qemu.Io(image, "write -P 0x11 0 1M");
        Tool.QemuImg("snapshot", "-c", "qemu", image);
        var all = new Qcow2OpenOptions { OverlapCheck = Qcow2OverlapCheck.All };
        var rng = new Random(7);
        using (var img = Qcow2Image.Open(image, all))
        {
            for (int round = 0; round < 4; round++)
            {
                for (int i = 0; i < 40; i++)
                {
                    byte[] chunk = new byte[rng.Next(1, 200_000)];
                    rng.NextBytes(chunk);
                    img.Write(chunk, rng.NextInt64(0, img.VirtualSize - chunk.Length));
                }
                img.Discard(rng.NextInt64(0, 32) << 20, 1 << 20);
                using (Qcow2VmStateArea area = img.OpenVmStateAreaForWriting())
                {
                    byte[] state = new byte[300_000];
                    rng.NextBytes(state);
                    area.Write(state, 0);
                    area.Flush();
                    img.CreateSnapshot($"s{round}", new Qcow2SnapshotCreateOptions { VmStateSize = state.Length });
                }
                if (round == 2) img.ApplySnapshot("qemu");
                if (round == 3) img.DeleteSnapshot("s1");
            }
        }
        Assert.False(Qemu.Info(image).GetProperty("format-specific").GetProperty("data").GetProperty("corrupt").GetBoolean());
        QemuImgCheck.AssertClean(image);
    }

    /// <summary>A lazy-refcounts image QEMU was killed in while writing (dirty, refcounts behind), with a snapshot.</summary>
    private string Dirty(string name)
    {
        string image = _dir.File(name);
        Qemu.Create(image, 64 << 20, "lazy_refcounts=on");
        Tool.QemuImg("snapshot", "-c", "s1", image);
        Tool.Result r = Tool.Run("qemu-io", ["-c", "write -P 0x5a 0 512", "-c", "write -P 0x5b 1M 70k", "-c", "sigraise 9", image]);
        Assert.NotEqual(0, r.ExitCode);
        Assert.True(Qemu.Info(image).GetProperty("dirty-flag").GetBoolean());
        return image;
    }

    private static readonly (string What, Action<Qcow2Image> Refused)[] RefusedOnTheirOwn =
    [
        ("delete a snapshot that does not exist", i => i.DeleteSnapshot("nosuchname")),
        ("apply a snapshot that does not exist", i => i.ApplySnapshot("nosuchname")),
        ("create a snapshot whose name is taken", i => i.CreateSnapshot("s1")),
        ("create a snapshot with an empty name", i => i.CreateSnapshot("")),
        ("write past the disk", i => i.Write(new byte[1], 64 << 20)),
        ("open a snapshot's VM state that does not exist", i => i.OpenVmStateAreaForReading("nosuchname")),
    ];

    [QemuFact]
    public void A_dirty_image_is_not_repaired_for_a_refused_operation()
    {
        string image = Dirty("dirty.qcow2");
        string hash = Qemu.Hash(image);
        foreach ((string what, Action<Qcow2Image> refused) in RefusedOnTheirOwn)
        {
            using (var img = Qcow2Image.Open(image))
                Assert.ThrowsAny<Exception>(() => refused(img));
            Assert.True(hash == Qemu.Hash(image), $"{what}: refused, yet the dirty image was repaired");
        }
        // A change that goes ahead repairs it first, and leaves it clean.
        using (var img = Qcow2Image.Open(image)) img.CreateSnapshot("s2");
        Assert.False(Qemu.Info(image).GetProperty("dirty-flag").GetBoolean());
        QemuImgCheck.AssertClean(image);
    }

    [QemuFact]
    public void A_dirty_image_its_repair_would_not_leave_clean_refuses_every_change_untouched()
    {
        string image = Dirty("beyond.qcow2");
        // The first refcount block misaligned: QEMU's repair marks the image corrupt and fails the open (iotest 060).
        long table = (long)Qemu.Header(image).RefcountTableOffset;
        Qemu.WriteBE64(image, table, Qemu.ReadBE64(image, table) + 0x2a00);
        string hash = Qemu.Hash(image);
        foreach (Action<Qcow2Image> change in new Action<Qcow2Image>[]
        {
            i => i.Write(new byte[1], 0),
            i => i.WriteZeroes(0, 65536),
            i => i.CreateSnapshot("new"),
            i => i.DeleteSnapshot("s1"),
            i => i.ApplySnapshot("s1"),
            i => i.OpenVmStateAreaForWriting().Dispose(),
        })
        {
            using var img = Qcow2Image.Open(image);
            var e = Assert.Throws<Qcow2FormatException>(() => change(img));
            Assert.Contains("dirty", e.Message, StringComparison.Ordinal);
        }
        Assert.Equal(hash, Qemu.Hash(image));
        Assert.Contains("can't open", Tool.Run("qemu-io", ["-c", "write 0 512", image]).Stderr, StringComparison.Ordinal);
    }
}
