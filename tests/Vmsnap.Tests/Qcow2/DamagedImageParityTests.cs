using System.Buffers.Binary;
using System.Text.Json;
using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;
using Xunit.Abstractions;

namespace Vmsnap.Tests.Qcow2;

/// <summary>
/// Images whose metadata is already damaged, after the cases of QEMU's iotests 060 (overlapping
/// structures) and 080 (invalid tables), read and rewritten here: the same damaged image goes to QEMU
/// (qemu-io, qemu-img) and to vmsnap, and each does the same operation on its own copy. Where QEMU
/// refuses, vmsnap refuses too, with its copy byte for byte as it was, or marked corrupt exactly as
/// QEMU marks an image (the incompatible feature bit 1 set, nothing else changed) when QEMU marked
/// its own copy corrupt. Where QEMU succeeds, qemu-img check finds vmsnap's result no worse than
/// QEMU's, and both read the same. Three classes: writes into damaged metadata, missing refcount
/// structures, and refusals on dirty images.
/// </summary>
[Trait("Category", "Interop")]
public sealed class DamagedImageParityTests(ITestOutputHelper output) : IDisposable
{
    private const ulong Copied = 1UL << 63;
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    /// <summary>What QEMU does (on its copy) and what vmsnap does (on its copy) to the damaged image.</summary>
    private sealed record Case(Action<string> Damage, Func<string, Tool.Result> Qemu, Action<string> Vmsnap);

    private static readonly byte[] Pattern2a = Enumerable.Repeat((byte)0x2a, 512).ToArray();

    private static Tool.Result QemuIo(string image, params string[] commands) => QemuIoOpen(image, null, commands);

    /// <summary>qemu-io on <paramref name="image"/>, opened with <paramref name="openOptions"/> (e.g. "overlap-check=all") when given.</summary>
    private static Tool.Result QemuIoOpen(string image, string? openOptions, params string[] commands)
    {
        var args = new List<string>();
        if (openOptions is not null) args.AddRange(["-c", $"open -o {openOptions} {image}"]);
        foreach (string c in commands) args.AddRange(["-c", c]);
        if (openOptions is null) args.Add(image);
        return Tool.Run("qemu-io", args);
    }

    private static Action<string> VmsnapWrite(long offset, int length, Qcow2OverlapCheck check = Qcow2OverlapCheck.Cached) => image =>
    {
        using var img = Qcow2Image.Open(image, new Qcow2OpenOptions { OverlapCheck = check });
        img.Write(Enumerable.Repeat((byte)0x2a, length).ToArray(), offset);
    };

    // ---- the damaged images (offsets found through the header, as QEMU's test assumes them) ---------

    private static long RefcountTable(string image) => (long)Qemu.Header(image).RefcountTableOffset;
    private static long FirstRefcountBlock(string image) => (long)(Qemu.ReadBE64(image, RefcountTable(image)) & L1Entry.OffsetMask);
    private static long L1(string image) => (long)Qemu.Header(image).L1TableOffset;
    private static long ActiveL2(string image, int index = 0) => (long)(Qemu.ReadBE64(image, L1(image) + 8 * index) & L1Entry.OffsetMask);

    private static long SnapshotL1Entry(string image)
    {
        using var img = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true });
        return img.Snapshots[0].L1TableOffset;
    }

    /// <summary>Sets the refcount of cluster <paramref name="cluster"/> in the first refcount block (16-bit refcounts).</summary>
    private static void SetRefcount(string image, long cluster, ushort value)
    {
        byte[] b = new byte[2];
        BinaryPrimitives.WriteUInt16BigEndian(b, value);
        Qemu.WriteRaw(image, FirstRefcountBlock(image) + 2 * cluster, b);
    }

    private static void SetDirty(string image) =>
        Qemu.WriteBE64(image, Qcow2Header.IncompatibleFeaturesOffset, Qemu.ReadBE64(image, Qcow2Header.IncompatibleFeaturesOffset) | Qcow2Header.IncompatibleDirty);

    /// <summary>A lazy-refcounts image a QEMU was killed in while writing: dirty, refcounts behind.</summary>
    private static void KilledWhileWriting(string image)
    {
        Tool.Result r = Tool.Run("qemu-io", ["-c", "write -P 0x5a 0 512", "-c", "write -P 0x5b 1M 70k", "-c", "sigraise 9", image]);
        Assert.NotEqual(0, r.ExitCode);
    }

    /// <summary>
    /// An image with data and a snapshot 'test', one field of whose table entry (<paramref name="field"/>: 0 the L1
    /// table's offset, 8 its size) holds <paramref name="value"/>; QEMU's <c>qemu-img snapshot <paramref name="qemuOption"/> test</c>
    /// against vmsnap's <paramref name="vmsnap"/>.
    /// </summary>
    private static (string, Case) SnapshotDamaged(int field, ulong value, string qemuOption, Action<Qcow2Image> vmsnap) => ("", new(
        image =>
        {
            Qemu.Io(image, "write -P 1 0 512");
            Tool.QemuImg("snapshot", "-c", "test", image);
            long entry = (long)Qemu.Header(image).SnapshotsOffset + field;
            if (field == 0) Qemu.WriteBE64(image, entry, value);
            else Qemu.WriteBE32(image, entry, (uint)value);
        },
        image => Tool.Run("qemu-img", ["snapshot", qemuOption, "test", image]),
        image =>
        {
            using var img = Qcow2Image.Open(image);
            vmsnap(img);
        }));

    private static readonly Dictionary<string, (string Create, Case Case)> Cases = new()
    {
        // ---- writes into damaged metadata (060) ----
        ["an L1 entry points at the L1 table itself"] = ("", new(
            image => Qemu.WriteBE64(image, L1(image), Copied | (ulong)L1(image)),
            image => QemuIoOpen(image, "overlap-check=all", "write -P 0x2a 0 512"),
            VmsnapWrite(0, 512, Qcow2OverlapCheck.All))),
        ["a data cluster is the refcount block"] = ("", new(
            image =>
            {
                long l2 = L1(image) + 65536;   // the cluster after the L1 table, as QEMU's test places it
                using (var f = new FileStream(image, FileMode.Open)) f.SetLength(l2 + 65536);
                Qemu.WriteBE64(image, L1(image), Copied | (ulong)l2);
                SetRefcount(image, l2 / 65536, 1);
                Qemu.WriteBE64(image, l2, Copied | (ulong)FirstRefcountBlock(image));
            },
            image => QemuIo(image, "write -P 0x2a 0 512"),
            VmsnapWrite(0, 512))),
        ["a data cluster is a snapshot's L2 table"] = ("", new(
            image =>
            {
                Qemu.Io(image, "write -P 1 0 512");
                Tool.QemuImg("snapshot", "-c", "foo", image);
                Qemu.Io(image, "write -P 2 0 512");
                long inactive = (long)(Qemu.ReadBE64(image, SnapshotL1Entry(image)) & L1Entry.OffsetMask);
                Qemu.WriteBE64(image, ActiveL2(image), Copied | (ulong)inactive);
            },
            image => QemuIoOpen(image, "overlap-check=all", "write -P 0x2a 0 512"),
            VmsnapWrite(0, 512, Qcow2OverlapCheck.All))),
        ["an active L2 table is marked free"] = ("", new(
            image =>
            {
                Qemu.Io(image, "write 0 64k", "write 512M 64k");   // L2 table, data, second L2 table, data
                SetRefcount(image, ActiveL2(image, 1) / 65536, 0);
            },
            image => QemuIo(image, "write -P 0x2a 64k 64k"),
            VmsnapWrite(65536, 65536))),
        ["the header cluster is marked free"] = ("", new(
            image =>
            {
                Qemu.Io(image, "write 0 64k");
                SetRefcount(image, 0, 0);
            },
            image => QemuIo(image, "write -P 0x2a 64k 64k"),
            VmsnapWrite(65536, 65536))),
        ["a snapshot's L1 table is misaligned (overlap check all)"] = ("", new(
            image =>
            {
                Qemu.Io(image, "write 0 512");
                Tool.QemuImg("snapshot", "-c", "test", image);
                Qemu.WriteBE64(image, (long)Qemu.Header(image).SnapshotsOffset, 0x400200);
            },
            image => QemuIoOpen(image, "overlap-check=all", "write -P 0x2a 0 4k"),
            VmsnapWrite(0, 4096, Qcow2OverlapCheck.All))),
        ["an L2 entry points far past the end of the file (snapshot create)"] = ("", new(
            image =>
            {
                Qemu.Io(image, "write 0 512");
                Qemu.WriteBE64(image, ActiveL2(image), 0x8000_00ff_ffff_0000);
            },
            image => Tool.Run("qemu-img", ["snapshot", "-c", "test", image]),
            image =>
            {
                using var img = Qcow2Image.Open(image);
                img.CreateSnapshot("test");
            })),

        // ---- missing refcount structures (060) ----
        ["the refcount table is empty"] = ("", new(
            image => Qemu.WriteBE64(image, RefcountTable(image), 0),
            image => QemuIo(image, "write -P 0x2a 0 64k"),
            VmsnapWrite(0, 65536))),
        ["the refcount table is empty, the L1 and L2 tables are not"] = ("", new(
            image =>
            {
                Qemu.Io(image, "write 0 64k");
                Qemu.WriteBE64(image, RefcountTable(image), 0);
            },
            image => QemuIo(image, "write -P 0x2a 0 128k"),
            VmsnapWrite(0, 131072))),
        ["the first refcount block is empty"] = ("", new(
            image => Qemu.WriteBE64(image, FirstRefcountBlock(image), 0),
            image => QemuIo(image, "write -P 0x2a 0 64k"),
            VmsnapWrite(0, 65536))),
        ["the refcount table has no clusters"] = ("", new(
            image => Qemu.WriteBE32(image, Qcow2Header.RefcountTableFieldsOffset + 8, 0),
            image => QemuIo(image, "write -P 0x2a 0 64k"),
            VmsnapWrite(0, 65536))),
        ["the refcount table lies on the header"] = ("", new(
            image => Qemu.WriteBE64(image, Qcow2Header.RefcountTableFieldsOffset, 0),
            image => QemuIo(image, "write -P 0x2a 0 64k"),
            VmsnapWrite(0, 65536))),

        // ---- invalid tables met by a change (080) ----
        ["the refcount table is larger than QEMU allows; write"] = ("", new(
            image => Qemu.WriteBE32(image, Qcow2Header.RefcountTableFieldsOffset + 8, 0x0002_0001),
            image => QemuIo(image, "write -P 0x2a 0 512"),
            VmsnapWrite(0, 512))),
        ["the L1 table is larger than QEMU allows; write"] = ("", new(
            image => Qemu.WriteBE32(image, Qcow2Header.L1SizeOffset, 0x7fff_ffff),
            image => QemuIo(image, "write -P 0x2a 0 512"),
            VmsnapWrite(0, 512))),
        ["the snapshot table lies past the end of the file; snapshot create"] = ("", new(
            image =>
            {
                Qemu.WriteBE64(image, Qcow2Header.SnapshotFieldsOffset + 4, 16 << 20);
                Qemu.WriteBE32(image, Qcow2Header.SnapshotFieldsOffset, 0x1_0000);
            },
            image => Tool.Run("qemu-img", ["snapshot", "-c", "test", image]),
            image =>
            {
                using var img = Qcow2Image.Open(image);
                img.CreateSnapshot("test");
            })),
        ["a snapshot's L1 table is misaligned; apply it"] = SnapshotDamaged(0, 0x400200, "-a", img => img.ApplySnapshot("test")),
        ["a snapshot's L1 table is misaligned; delete it"] = SnapshotDamaged(0, 0x400200, "-d", img => img.DeleteSnapshot("test")),
        ["a snapshot's L1 table is larger than QEMU allows; apply it"] = SnapshotDamaged(8, 0x1000_0000, "-a", img => img.ApplySnapshot("test")),
        ["a snapshot's L1 table is larger than QEMU allows; delete it"] = SnapshotDamaged(8, 0x1000_0000, "-d", img => img.DeleteSnapshot("test")),

        // ---- dirty images (the refusals leave every byte; a repair only for a change that goes ahead) ----
        ["dirty, a refcount block far past the end; delete a snapshot that does not exist"] = ("lazy_refcounts=on", new(
            image =>
            {
                Qemu.Io(image, "write 0 64k");
                Tool.QemuImg("snapshot", "-c", "s1", image);
                Qemu.WriteBE64(image, RefcountTable(image) + 8, 0x00ff_ffff_0000_0000);
                SetDirty(image);
            },
            image => Tool.Run("qemu-img", ["snapshot", "-d", "nosuchname", image]),
            image =>
            {
                using var img = Qcow2Image.Open(image);
                img.DeleteSnapshot("nosuchname");
            })),
        ["dirty, a refcount block misaligned; write"] = ("", new(
            image =>
            {
                Qemu.WriteBE64(image, RefcountTable(image), 0xffff_2a00);
                SetDirty(image);
            },
            image => QemuIo(image, "write -P 0x2a 0 512"),
            VmsnapWrite(0, 512))),
        ["dirty after a killed QEMU; apply a snapshot that does not exist"] = ("lazy_refcounts=on", new(
            image =>
            {
                Tool.QemuImg("snapshot", "-c", "s1", image);
                KilledWhileWriting(image);
            },
            image => Tool.Run("qemu-img", ["snapshot", "-a", "nosuchname", image]),
            image =>
            {
                using var img = Qcow2Image.Open(image);
                img.ApplySnapshot("nosuchname");
            })),
        ["dirty after a killed QEMU; write"] = ("lazy_refcounts=on", new(
            KilledWhileWriting,
            image => QemuIo(image, "write -P 0x2a 4k 512"),
            VmsnapWrite(4096, 512))),
    };

    public static TheoryData<string> CaseNames()
    {
        var data = new TheoryData<string>();
        foreach (string name in Cases.Keys) data.Add(name);
        return data;
    }

    [QemuTheory]
    [MemberData(nameof(CaseNames))]
    public void Vmsnap_does_what_qemu_does_with_a_damaged_image(string name)
    {
        (string create, Case c) = Cases[name];
        string original = _dir.File("original.qcow2");
        Qemu.Create(original, 1L << 30, create);
        c.Damage(original);
        string forQemu = _dir.File("qemu.qcow2"), forVmsnap = _dir.File("vmsnap.qcow2");
        File.Copy(original, forQemu);
        File.Copy(original, forVmsnap);
        byte[] before = File.ReadAllBytes(original);

        Tool.Result q = c.Qemu(forQemu);
        string qemuSays = q.Stdout + q.Stderr;
        bool qemuRefused = q.ExitCode != 0 || qemuSays.Contains("failed", StringComparison.OrdinalIgnoreCase)
            || qemuSays.Contains("can't open", StringComparison.OrdinalIgnoreCase) || qemuSays.Contains("Could not", StringComparison.Ordinal);
        Exception? refused = Record.Exception(() => c.Vmsnap(forVmsnap));
        output.WriteLine($"QEMU {(qemuRefused ? "refuses" : "goes ahead")}: {qemuSays.Trim()}");
        output.WriteLine($"vmsnap {(refused is null ? "goes ahead" : $"refuses: {refused.Message}")}");

        if (qemuRefused)
        {
            Assert.True(refused is VmsnapException, $"QEMU refuses ({qemuSays.Trim()}); vmsnap: {(refused is null ? "succeeded" : refused.ToString())}");
            byte[] after = File.ReadAllBytes(forVmsnap);
            bool qemuMarked = (Qemu.ReadBE64(forQemu, Qcow2Header.IncompatibleFeaturesOffset) & Qcow2Header.IncompatibleCorrupt) != 0;
            output.WriteLine($"QEMU's copy {(qemuMarked ? "marked corrupt" : File.ReadAllBytes(forQemu).AsSpan().SequenceEqual(before) ? "unchanged" : "changed")}; vmsnap's {(after.AsSpan().SequenceEqual(before) ? "unchanged" : "changed")}");
            if (after.AsSpan().SequenceEqual(before)) return;
            // Else only the corrupt bit, and only where QEMU marks its copy corrupt too.
            Assert.True(qemuMarked,
                $"vmsnap refused ({refused!.Message}) but changed the file, and QEMU did not mark its copy corrupt ({qemuSays.Trim()})");
            byte[] marked = (byte[])before.Clone();
            ulong features = BinaryPrimitives.ReadUInt64BigEndian(marked.AsSpan(Qcow2Header.IncompatibleFeaturesOffset)) | Qcow2Header.IncompatibleCorrupt;
            BinaryPrimitives.WriteUInt64BigEndian(marked.AsSpan(Qcow2Header.IncompatibleFeaturesOffset), features);
            Assert.True(after.AsSpan().SequenceEqual(marked), $"vmsnap refused ({refused.Message}) and changed more than the corrupt bit");
            return;
        }

        // QEMU went ahead: vmsnap's result checks no worse than QEMU's, and reads the same.
        (JsonElement ours, _) = QemuImgCheck.Of(forVmsnap);
        (JsonElement theirs, _) = QemuImgCheck.Of(forQemu);
        foreach (string field in new[] { "corruptions", "leaks", "check-errors" })
            Assert.True(QemuImgCheck.Field(ours, field) <= QemuImgCheck.Field(theirs, field),
                $"{field}: vmsnap's result {ours}, QEMU's {theirs}; vmsnap: {(refused is null ? "succeeded" : refused.Message)}");
        Assert.Null(refused);
        Tool.Result compare = Tool.Run("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", forVmsnap, forQemu]);
        Assert.True(compare.ExitCode == 0, $"vmsnap's and QEMU's results read differently: {compare.Stdout}{compare.Stderr}");
    }
}
