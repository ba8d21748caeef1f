using Vmsnap.Qcow2;
using Vmsnap.Storage;
using Vmsnap.Tests.Interop;
using Vmsnap.VmState;

namespace Vmsnap.Tests.Qcow2.Snapshots;

/// <summary>
/// The image the failure tests start from, made once per QEMU version by that version's qemu-img and qemu-io
/// (and vmsnap), with what qemu-img reads from it.
/// </summary>
public sealed class SnapshotFailureTemplates : IDisposable
{
    private readonly TempDir _dir = new();
    private readonly System.Collections.Concurrent.ConcurrentDictionary<string, Lazy<Template>> _byVersion = new();

    internal sealed record Template(string Path, byte[] Active, byte[] Old1, byte[] Old2, byte[] Old2State);

    internal Template For(string version) => _byVersion.GetOrAdd(version, v => new Lazy<Template>(() => Make(v))).Value;

    private Template Make(string version)
    {
        // 4 KiB clusters, 2 MiB per L2 table: a 6 MiB disk has three L2 tables.
        string template = _dir.File($"template-{version}.qcow2");
        Qemu.Create(template, 6 << 20, "cluster_size=4k");
        Qemu.Io(template, "write -P 0x11 0 1M", "write -P 0x12 2M 300k", "write -P 0x13 5M 64k");
        Tool.QemuImg("snapshot", "-c", "old1", template);
        // Holes in the middle (discarded clusters only the active disk used), and old2's VM state
        // last in the file: deleting old2 frees the file's tail, which new metadata must not need.
        Qemu.Io(template, "write -P 0x21 512k 1M", "write -z 5M 8k", "write -P 0x31 4M 100k", "discard 1M 512k");
        byte[] old2State = new byte[300_001];
        new Random(7).NextBytes(old2State);
        using (var img = Qcow2Image.Open(template))
        {
            using Qcow2VmStateArea area = img.OpenVmStateAreaForWriting();
            area.Write(old2State, 0);
            area.Flush();
            img.CreateSnapshot("old2", new Qcow2SnapshotCreateOptions { VmStateSize = old2State.Length });
        }
        // Written since the last snapshot, in two of the three L2 tables: a create must clear their
        // COPIED flags (in place, through an intermediate generation), a delete or apply deal with them.
        Qemu.Io(template, "write -P 0x41 1M 4k", "write -P 0x42 4M 8k");
        QemuImgCheck.AssertClean(template);
        return new Template(template, SnapshotKit.QemuActiveContent(template, _dir),
            SnapshotKit.QemuSnapshotContent(template, "old1", _dir), SnapshotKit.QemuSnapshotContent(template, "old2", _dir), old2State);
    }

    public void Dispose() => _dir.Dispose();
}

/// <summary>
/// Write errors injected into every write of a snapshot create, delete and apply, and into a
/// VM-state save: qemu-img check finds no error, the older snapshots are intact, and the image is
/// either as before or as after the operation, on each QEMU version.
/// </summary>
[Trait("Category", "Unit")]
public sealed class SnapshotFailureTests(SnapshotFailureTemplates templates) : IClassFixture<SnapshotFailureTemplates>, IDisposable
{
    private readonly TempDir _dir = new();
    private string _template = "";
    private byte[] _active = [], _old1 = [], _old2 = [], _old2State = [];

    /// <summary>Takes the template of <paramref name="version"/> (this test's QEMU).</summary>
    private void TakeTemplate(string version)
    {
        SnapshotFailureTemplates.Template t = templates.For(version);
        (_template, _active, _old1, _old2, _old2State) = (t.Path, t.Active, t.Old1, t.Old2, t.Old2State);
    }

    public void Dispose() => _dir.Dispose();

    /// <summary>old1 was made by qemu-img, old2 (with VM state) by vmsnap: their tables differ in COPIED flags.</summary>
    public static TheoryData<string> Operations() => ["create", "delete old1", "delete old2", "apply old1", "apply old2"];

    private static readonly byte[] SaveState = MakeSaveState();

    private static byte[] MakeSaveState()
    {
        byte[] b = new byte[200_003];
        new Random(9).NextBytes(b);
        return b;
    }

    private static void Run(Qcow2Image img, string operation)
    {
        string[] words = operation.Split(' ');
        switch (words[0])
        {
            case "create": img.CreateSnapshot("new"); break;
            case "delete": img.DeleteSnapshot(words[1]); break;
            case "apply": img.ApplySnapshot(words[1]); break;
            case "save":
                using (Qcow2VmStateArea area = img.OpenVmStateAreaForWriting())
                {
                    area.Write(SaveState, 0);
                    area.Flush();
                    img.CreateSnapshot("new", new Qcow2SnapshotCreateOptions { VmStateSize = SaveState.Length });
                }
                break;
        }
    }

    /// <summary>Runs the operation on a copy of the template, failing write <paramref name="failAt"/> (from the open on); returns the writes counted and whether it threw.</summary>
    private (int Writes, bool Threw) Attempt(string copy, string operation, int failAt, bool failAfter)
    {
        File.Copy(_template, copy, overwrite: true);
        var device = new CountingDevice(FileBlockDevice.Open(copy, new FileBlockDeviceOptions { Writable = true })) { FailAt = failAt, FailAfter = failAfter };
        bool threw = false;
        try
        {
            using var img = Qcow2Image.Open(device, copy);
            Run(img, operation);
        }
        catch (VmsnapException)
        {
            threw = true;
        }
        finally
        {
            device.Dispose();
        }
        return (device.Writes, threw);
    }

    private void AssertIntactOldOrNew(string image, string operation, string what, bool allowLeaks = false)
    {
        (long corruptions, long leaks, long errors, _, string text) = QemuImgCheck.Of(image);
        Assert.True(corruptions == 0 && errors == 0, $"{what}: qemu-img check: {text}");
        // The switch to new metadata is one header write, so even a cut operation leaks nothing.
        Assert.True(allowLeaks || leaks == 0, $"{what}: {leaks} leaked clusters: {text}");

        string[] tags = SnapshotKit.QemuList(image).Select(r => r.Tag).ToArray();
        byte[] active = SnapshotKit.QemuActiveContent(image, _dir);
        bool done = operation switch
        {
            "create" or "save" => tags.SequenceEqual(["old1", "old2", "new"]),
            "delete old1" => tags.SequenceEqual(["old2"]),
            "delete old2" => tags.SequenceEqual(["old1"]),
            "apply old1" => active.AsSpan().SequenceEqual(_old1),
            "apply old2" => active.AsSpan().SequenceEqual(_old2),
            _ => false,
        };
        if (!done)
        {
            Assert.Equal(["old1", "old2"], tags);
            SnapshotKit.AssertEqualBytes(_active, active, $"{what}: active disk as before");
        }
        else if (operation.StartsWith("apply", StringComparison.Ordinal))
        {
            Assert.Equal(["old1", "old2"], tags);
        }
        else
        {
            SnapshotKit.AssertEqualBytes(_active, active, $"{what}: active disk");
        }
        if (tags.Contains("old1")) SnapshotKit.AssertEqualBytes(_old1, SnapshotKit.QemuSnapshotContent(image, "old1", _dir), $"{what}: old1");
        if (tags.Contains("new")) SnapshotKit.AssertEqualBytes(_active, SnapshotKit.QemuSnapshotContent(image, "new", _dir), $"{what}: new");
        using var img = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true });
        if (operation == "save" && done)
        {
            using Qcow2VmStateArea saved = img.OpenVmStateAreaForReading("new");
            byte[] back = new byte[saved.Length];
            saved.Read(back, 0);
            Assert.True(SaveState.AsSpan().SequenceEqual(back), $"{what}: VM state of new");
        }
        if (!tags.Contains("old2")) return;
        SnapshotKit.AssertEqualBytes(_old2, SnapshotKit.QemuSnapshotContent(image, "old2", _dir), $"{what}: old2");
        using Qcow2VmStateArea area = img.OpenVmStateAreaForReading("old2");
        byte[] state = new byte[area.Length];
        area.Read(state, 0);
        Assert.True(_old2State.AsSpan().SequenceEqual(state), $"{what}: VM state of old2");
    }

    [QemuTheory]
    [MemberData(nameof(Operations))]
    public void A_write_error_anywhere_in_a_snapshot_operation_leaves_a_consistent_image(string operation)
    {
        string version = QemuInstall.Current.Version;
        TakeTemplate(version);
        string copy = _dir.File($"{operation}.qcow2");
        (int total, bool threw) = Attempt(copy, operation, int.MaxValue, false);
        Assert.False(threw);
        Assert.InRange(total, 4, 200);
        AssertIntactOldOrNew(copy, operation, "without failure");
        for (int k = 0; k < total; k++)
        {
            foreach (bool failAfter in new[] { true, false })
            {
                (_, threw) = Attempt(copy, operation, k, failAfter);
                Assert.True(threw, $"failing write {k} of {total} ({(failAfter ? "and all later" : "alone")}) was not reported");
                AssertIntactOldOrNew(copy, operation, $"write {k} of {total} failed{(failAfter ? " with all later ones" : "")}");
            }
        }
    }

    public static TheoryData<string> CrashCases() => ["create", "delete old1", "delete old2", "apply old1", "apply old2", "save"];

    [QemuTheory]
    [MemberData(nameof(CrashCases))]
    public void A_crash_anywhere_in_a_snapshot_operation_leaves_a_consistent_image(string operation)
    {
        string version = QemuInstall.Current.Version;
        TakeTemplate(version);
        byte[] template = File.ReadAllBytes(_template);
        var dry = new CrashDevice(template);
        using (var img = Qcow2Image.Open(dry, "dry")) Run(img, operation);
        int total = dry.Operations;
        Assert.InRange(total, 4, 400);
        string copy = _dir.File("crashed.qcow2");
        var random = new Random(operation.GetHashCode(StringComparison.Ordinal));
        for (int k = 0; k < total; k++)
        {
            var device = new CrashDevice(template) { CrashAt = k };
            Assert.Throws<StorageException>(() =>
            {
                using var img = Qcow2Image.Open(device, copy);
                Run(img, operation);
            });
            Assert.True(device.Crashed);
            // Unflushed writes may be lost or kept, each on its own: every combination of a few,
            // else none, all and two random mixes. Identical outcomes are judged once.
            int pending = device.PendingCount;
            var survivors = new List<(string Label, Func<int, bool> Keep)>();
            if (pending <= 3)
            {
                for (int mask = 0; mask < 1 << pending; mask++)
                {
                    int m = mask;
                    survivors.Add(($"unflushed writes kept: mask {m:b} of {pending}", i => (m >> i & 1) != 0));
                }
            }
            else
            {
                int seed1 = random.Next(), seed2 = random.Next();
                survivors.Add(($"none of {pending} unflushed writes kept", _ => false));
                survivors.Add(($"all {pending} unflushed writes kept", _ => true));
                survivors.Add(("some unflushed writes kept", i => new Random(seed1 + i).Next(2) == 0));
                survivors.Add(("others kept", i => new Random(seed2 + i).Next(2) == 0));
            }
            var judged = new HashSet<string>();
            foreach ((string label, Func<int, bool> keep) in survivors)
            {
                byte[] bytes = device.AfterCrash(keep);
                if (!judged.Add(Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(bytes)))) continue;
                File.WriteAllBytes(copy, bytes);
                // A save is cut before its snapshot exists: what it had allocated may leak (a repairable
                // waste); snapshot operations switch in one header write and leak nothing.
                AssertIntactOldOrNew(copy, operation, $"crash at operation {k} of {total}, {label}", allowLeaks: operation == "save");
            }
        }
    }

    /// <summary>A save as <c>VmSnapshots</c> does it (stream, flush, snapshot; on failure discard the area), with flush <paramref name="failFlushAt"/> failing once.</summary>
    private static (int Flushes, bool Threw) AttemptSave(string template, string copy, int failFlushAt)
    {
        File.Copy(template, copy, overwrite: true);
        var device = new CountingDevice(FileBlockDevice.Open(copy, new FileBlockDeviceOptions { Writable = true })) { FailFlushAt = failFlushAt };
        bool threw = false;
        try
        {
            using var img = Qcow2Image.Open(device, copy);
            using Qcow2VmStateArea area = img.OpenVmStateAreaForWriting();
            try
            {
                area.Write(SaveState, 0);
                area.Flush();
                img.CreateSnapshot("new", new Qcow2SnapshotCreateOptions { VmStateSize = SaveState.Length });
            }
            catch (VmsnapException)
            {
                threw = true;
                try
                {
                    area.Discard(0, area.Length);
                    img.Flush();
                }
                catch (VmsnapException)
                {
                    // As the save's failure path: what cannot be freed is at worst a leak.
                }
            }
        }
        catch (VmsnapException)
        {
            threw = true;
        }
        finally
        {
            device.Dispose();
        }
        return (device.Flushes, threw);
    }

    [QemuFact]
    public void A_flush_failing_once_anywhere_in_a_save_then_its_discard_leaves_a_consistent_image()
    {
        string version = QemuInstall.Current.Version;
        TakeTemplate(version);
        string copy = _dir.File("flaky.qcow2");
        (int total, bool threw) = AttemptSave(_template, copy, int.MaxValue);
        Assert.False(threw);
        Assert.InRange(total, 3, 100);
        for (int k = 0; k < total; k++)
        {
            (_, threw) = AttemptSave(_template, copy, k);
            Assert.True(threw, $"failing flush {k} of {total} was not reported");
            AssertIntactOldOrNew(copy, "save", $"flush {k} of {total} failed once", allowLeaks: true);
        }
    }

    [QemuTheory]
    [InlineData(false)]
    [InlineData(true)]
    public void A_failed_save_discarded_leaves_no_leak_and_the_snapshots_intact(bool diskDies)
    {
        string version = QemuInstall.Current.Version;
        TakeTemplate(version);
        byte[] stream = new byte[(3 << 20) + 5];
        new Random(8).NextBytes(stream);
        foreach (int failingDataWrite in new[] { 0, 1, 3 })
        {
            string copy = _dir.File($"save-{failingDataWrite}.qcow2");
            File.Copy(_template, copy, overwrite: true);
            var device = new CountingDevice(FileBlockDevice.Open(copy, new FileBlockDeviceOptions { Writable = true }));
            bool discarded = false;
            try
            {
                using var img = Qcow2Image.Open(device, copy);
                using Qcow2VmStateArea area = img.OpenVmStateAreaForWriting();
                device.FailAt = device.Writes + failingDataWrite;
                device.FailAfter = diskDies;
                var writer = new VmStateWriter(VmStateBackend.ForBlockDevice(area), new VmStateWriterOptions { BufferCount = 4, BufferSize = 1 << 20 });
                writer.PutBuffer(stream);
                var error = Assert.Throws<VmStateException>(writer.Close);
                Assert.Contains("injected failure", error.Message);
                writer.Dispose();
                area.Discard(0, area.Length);   // the save's failure path: no metadata to undo
                discarded = true;
            }
            catch (VmsnapException) when (diskDies)
            {
                // The dead disk may fail the trim of the file's tail, or the image's final flush.
            }
            finally
            {
                device.Dispose();
            }
            Assert.True(discarded || diskDies);
            // Nothing was counted before the snapshot: nothing is left behind, even when the disk died.
            AssertIntactOldOrNew(copy, "none", $"save failing at data write {failingDataWrite}");
        }
    }
}
