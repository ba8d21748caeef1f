using Vmsnap.Migration;
using Vmsnap.Qcow2;
using Vmsnap.Snapshots;
using Vmsnap.Tests.Interop;
using Vmsnap.Tests.Migration;
using Vmsnap.Tests.Qcow2.Snapshots;

namespace Vmsnap.Tests.Qcow2;

/// <summary>
/// Every operation vmsnap refuses leaves the image byte for byte as it was: the image's SHA-256
/// before and after each refused snapshot create, delete and apply, VM-state open, save, import and
/// write, on images vmsnap refuses to change and with requests it refuses. (Refusals that come only
/// after a save's stream was written are undone by giving the area back: nothing the header
/// reaches had changed.)
/// </summary>
[Trait("Category", "Unit")]
public sealed class RefusalTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    /// <summary>An image with data, a snapshot made by qemu-img and one with VM state made by vmsnap; an unknown autoclear bit set (vmsnap clears those before its first change).</summary>
    private string Image(string name, string options = "cluster_size=4k")
    {
        string image = _dir.File(name);
        Qemu.Create(image, 8 << 20, options);
        Qemu.Io(image, "write -P 0x11 0 256k", "write -P 0x12 3M 64k");
        Tool.QemuImg("snapshot", "-c", "disk", image);
        Qemu.Io(image, "write -P 0x13 64k 64k");
        using (var img = Qcow2Image.Open(image))
        {
            using Qcow2VmStateArea area = img.OpenVmStateAreaForWriting();
            area.Write(Enumerable.Repeat((byte)0x5a, 100_000).ToArray(), 0);
            area.Flush();
            img.CreateSnapshot("state", new Qcow2SnapshotCreateOptions { VmStateSize = 100_000 });
        }
        if (!options.Contains("compat=0.10")) Qemu.WriteBE64(image, Qcow2Header.AutoclearFeaturesOffset, 1UL << 7);
        return image;
    }

    /// <summary>Runs <paramref name="refused"/> on a writable open of <paramref name="image"/>; it must throw <typeparamref name="T"/>, and the file keep its bytes.</summary>
    private static T AssertRefused<T>(string image, string what, Action<Qcow2Image> refused, Qcow2OpenOptions? options = null) where T : Exception
    {
        string hash = Qemu.Hash(image);
        T e;
        using (var img = Qcow2Image.Open(image, options))
            e = Assert.Throws<T>(() => refused(img));
        Assert.True(hash == Qemu.Hash(image), $"{what}: refused ({e.Message}), yet the file changed");
        return e;
    }

    private static readonly (string What, Action<Qcow2Image> Change)[] Changes =
    [
        ("write", i => i.Write([1], 100)),
        ("write zeroes", i => i.WriteZeroes(0, 65536)),
        ("discard", i => i.Discard(0, 65536)),
        ("snapshot create", i => i.CreateSnapshot("new")),
        ("snapshot delete", i => i.DeleteSnapshot("disk")),
        ("snapshot apply", i => i.ApplySnapshot("disk")),
        ("open the VM-state area for writing", i => i.OpenVmStateAreaForWriting().Dispose()),
    ];

    [QemuFact]
    public void Every_change_to_an_image_marked_corrupt_is_refused_without_a_byte_written()
    {
        string image = Image("corrupt.qcow2");
        Qemu.WriteBE64(image, Qcow2Header.IncompatibleFeaturesOffset, Qcow2Header.IncompatibleCorrupt);
        foreach ((string what, Action<Qcow2Image> change) in Changes)
        {
            Qcow2FormatException e = AssertRefused<Qcow2FormatException>(image, what, change);
            Assert.Contains("corrupt", e.Message);
            Assert.True(e.RepairNeeded, $"{what}: {e.Message}");
        }
    }

    [QemuFact]
    public void Every_change_to_an_image_with_persistent_bitmaps_is_refused_without_a_byte_written()
    {
        string image = Image("bitmaps.qcow2");
        Qemu.WriteBE64(image, Qcow2Header.AutoclearFeaturesOffset, 0);
        Tool.QemuImg("bitmap", "--add", image, "b0");
        foreach ((string what, Action<Qcow2Image> change) in Changes)
        {
            Qcow2FormatException e = AssertRefused<Qcow2FormatException>(image, what, change);
            Assert.Contains("bitmap", e.Message);
            Assert.False(e.RepairNeeded, $"{what}: a repair does not remove bitmaps: {e.Message}");
        }
    }

    [QemuFact]
    public void Every_change_to_an_overlay_whose_backing_file_was_not_opened_is_refused_without_a_byte_written()
    {
        string base_ = _dir.File("base.qcow2");
        Qemu.Create(base_, 8 << 20);
        Qemu.Io(base_, "write -P 0x21 0 1M");
        string overlay = _dir.File("overlay.qcow2");
        Qemu.Create(overlay, 8 << 20, "", "base.qcow2", "qcow2");
        Tool.QemuImg("snapshot", "-c", "disk", overlay);
        var options = new Qcow2OpenOptions { OpenBackingFile = false };
        foreach ((string what, Action<Qcow2Image> change) in Changes)
            Assert.Contains("backing file", AssertRefused<OperationRefusedException>(overlay, what, change, options).Message);
    }

    [QemuFact]
    public void Every_change_after_a_corruption_was_found_is_refused_without_a_byte_written()
    {
        string image = Image("found.qcow2");
        long l1 = (long)Qemu.Header(image).L1TableOffset;
        long l2 = (long)(Qemu.ReadBE64(image, l1) & L1Entry.OffsetMask);
        Qemu.WriteBE64(image, l2 + 8 * 8, L2Entry.Copied | (1UL << 40));   // guest cluster 8 points past the end of the file
        foreach ((string what, Action<Qcow2Image> change) in Changes)
        {
            AssertRefused<Qcow2FormatException>(image, what, img =>
            {
                Assert.Throws<Qcow2FormatException>(() => img.Read(new byte[1], 8 * 4096));   // found here
                change(img);
            });
        }
    }

    [QemuFact]
    public void Refused_snapshot_requests_write_nothing()
    {
        string image = Image("requests.qcow2");
        AssertRefused<ArgumentException>(image, "create without a name", i => i.CreateSnapshot(""));
        AssertRefused<ArgumentException>(image, "create with a name QEMU cannot keep", i => i.CreateSnapshot(new string('x', 256)));
        AssertRefused<ArgumentException>(image, "create with a NUL in the name", i => i.CreateSnapshot("a\0b"));
        AssertRefused<SnapshotExistsException>(image, "create with a name taken", i => i.CreateSnapshot("disk"));
        AssertRefused<ArgumentOutOfRangeException>(image, "create with a negative VM-state size", i => i.CreateSnapshot("n", new Qcow2SnapshotCreateOptions { VmStateSize = -1 }));
        AssertRefused<ArgumentOutOfRangeException>(image, "create with a date before 1970", i => i.CreateSnapshot("n", new Qcow2SnapshotCreateOptions { Date = new DateTimeOffset(1960, 1, 1, 0, 0, 0, TimeSpan.Zero) }));
        AssertRefused<SnapshotNotFoundException>(image, "delete of no snapshot", i => i.DeleteSnapshot("nosuch"));
        AssertRefused<SnapshotNotFoundException>(image, "apply of no snapshot", i => i.ApplySnapshot("nosuch"));
        AssertRefused<OperationRefusedException>(image, "delete of a snapshot whose VM state is open", i =>
        {
            using Qcow2VmStateArea reading = i.OpenVmStateAreaForReading("state");
            i.DeleteSnapshot("state");
        });
        AssertRefused<OperationRefusedException>(image, "apply while the VM-state area is open for writing", i =>
        {
            using Qcow2VmStateArea writing = i.OpenVmStateAreaForWriting();
            writing.Write(new byte[70_000], 0);
            i.ApplySnapshot("disk");
        });
        AssertRefused<OperationRefusedException>(image, "a second VM-state area open for writing", i =>
        {
            using Qcow2VmStateArea first = i.OpenVmStateAreaForWriting();
            first.Write(new byte[70_000], 0);
            i.OpenVmStateAreaForWriting();
        });
        AssertRefused<OperationRefusedException>(image, "a snapshot of another disk size", i =>
        {
            // A snapshot entry claiming another disk size (QEMU refuses to apply those too).
            i.Engine.State.Snapshots.Entries[0].DiskSize = 4 << 20;
            i.ApplySnapshot("disk");
        });
    }

    [QemuFact]
    public void A_snapshot_that_1_bit_refcounts_cannot_hold_is_refused_by_create_and_by_save_without_a_byte_written()
    {
        string image = _dir.File("rc1.qcow2");
        Qemu.Create(image, 1 << 20, "refcount_bits=1");
        Qemu.Io(image, "write -P 1 0 64k");
        Qemu.WriteBE64(image, Qcow2Header.AutoclearFeaturesOffset, 1UL << 7);
        AssertRefused<Qcow2FormatException>(image, "create", i => i.CreateSnapshot("x"));
        AssertRefused<Qcow2FormatException>(image, "a save through the area", i =>
        {
            using Qcow2VmStateArea area = i.OpenVmStateAreaForWriting();
            try
            {
                area.Write(new byte[3 << 20], 0);
                area.Flush();
                i.CreateSnapshot("x", new Qcow2SnapshotCreateOptions { VmStateSize = 3 << 20 });
            }
            catch
            {
                area.Discard(0, area.Length);
                throw;
            }
        });
        string hash = Qemu.Hash(image);
        string ram = _dir.File("ram");
        GuestRam.Create(ram, 4 << 20, seed: 5);
        using (var profile = MachineProfile.Create("none", [new("ram0", ram)]))
            Assert.Throws<Qcow2FormatException>(() => VmSnapshots.Save(image, "x", profile));
        Assert.Equal(hash, Qemu.Hash(image));
        QemuImgCheck.AssertClean(image);
    }

    [QemuFact]
    public void A_save_or_import_refused_after_its_stream_leaves_the_image_byte_for_byte_as_it_was()
    {
        string image = Image("save.qcow2");
        string hash = Qemu.Hash(image);
        string ram = _dir.File("ram");
        GuestRam.Create(ram, 4 << 20, seed: 6);
        string stream = _dir.File("s.mig");
        using (var profile = MachineProfile.Create("none", [new("ram0", ram)]))
        {
            // A name QEMU cannot keep is refused (before the stream is written).
            Assert.Contains("255", Assert.ThrowsAny<VmsnapException>(() => VmSnapshots.Save(image, new string('n', 300), profile)).Message);
            Assert.Equal(hash, Qemu.Hash(image));
            StreamFiles.WriteFile(stream, w => MigrationStream.Write(w, profile));
        }
        // A stream cut short is refused when its end is missing.
        byte[] bytes = File.ReadAllBytes(stream);
        string cut = _dir.File("cut.mig");
        File.WriteAllBytes(cut, bytes.AsSpan(0, bytes.Length * 2 / 3).ToArray());
        Assert.ThrowsAny<VmsnapException>(() => VmSnapshots.Import(cut, image, "cut"));
        Assert.Equal(hash, Qemu.Hash(image));
        Assert.Equal(["disk", "state"], SnapshotKit.QemuList(image).Select(r => r.Tag));
    }
}
