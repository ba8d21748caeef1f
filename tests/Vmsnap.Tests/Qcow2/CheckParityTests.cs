using System.Text.Json;
using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Qcow2;

/// <summary>
/// vmsnap's check and repair against qemu-img check's, on copies of the same damaged image (every
/// kind in <see cref="CheckParityImages"/>), in each mode: the same exit code and the same figures
/// field by field (or, where qemu-img's check fails, a vmsnap check that fails too); a plain check
/// changes no byte; after a repair qemu-img check finds the same in both images, and both files hold
/// the same bytes in every cluster either of them uses (so the same data, tables and header).
/// </summary>
[Trait("Category", "Interop")]
public class CheckParityTests(CheckParityTests.Originals originals) : IClassFixture<CheckParityTests.Originals>
{
    /// <summary>Each damaged image, made once per QEMU version by that version's qemu-img and qemu-io, shared by the three modes (which check copies).</summary>
    public sealed class Originals : IDisposable
    {
        private readonly TempDir _dir = new();
        private readonly System.Collections.Concurrent.ConcurrentDictionary<(string Version, string Kind), Lazy<string>> _made = new();

        internal string Get(string version, string kind) => _made.GetOrAdd((version, kind), key => new Lazy<string>(() =>
        {
            using var qemuScope = QemuInstall.Use(key.Version);
            string image = _dir.File($"{key.Kind}-{key.Version}.qcow2");
            CheckParityImages.Kinds[key.Kind](image);
            return image;
        })).Value;

        public void Dispose() => _dir.Dispose();
    }

    private static readonly string[] Fields =
    [
        "check-errors", "corruptions", "leaks", "corruptions-fixed", "leaks-fixed", "image-end-offset",
        "total-clusters", "allocated-clusters", "fragmented-clusters", "compressed-clusters",
    ];

    public static TheoryData<string, string> Cases()
    {
        var data = new TheoryData<string, string>();
        foreach (string kind in CheckParityImages.Kinds.Keys)
            foreach (string mode in new[] { "none", "leaks", "all" })
                data.Add(kind, mode);
        return data;
    }

    [QemuTheory]
    [MemberData(nameof(Cases))]
    public void Check_and_repair_match_qemu_img(string kind, string mode)
    {
        string version = QemuInstall.Current.Version;
        using var dir = new TempDir();
        AssertMatchesQemu(dir, originals.Get(version, kind), mode);
    }

    /// <summary>A few damages in other layouts: small clusters and narrow or wide refcounts, version 2, extended L2.</summary>
    [QemuTheory]
    [InlineData("cluster_size=512,refcount_bits=1")]
    [InlineData("cluster_size=4k,refcount_bits=64")]
    [InlineData("cluster_size=2M")]
    [InlineData("compat=0.10")]
    [InlineData("extended_l2=on")]
    public void Damage_in_other_layouts_matches_qemu_img(string options)
    {
        using var dir = new TempDir();
        var damages = new Dictionary<string, Action<string>>
        {
            ["preallocated-zero-unaligned"] = f =>
            {
                CheckParityImages.Populated(f, options);
                long at = CheckParityImages.L2EntryOffset(f, 0);
                bool extended = options.Contains("extended_l2");
                Qemu.WriteBE64(f, at, (Qemu.ReadBE64(f, at) | (extended ? 0 : L2Entry.ZeroFlag)) + 0x200);
                if (extended) Qemu.WriteBE64(f, at + 8, 0);
            },
            ["refcount-zero-for-data"] = f =>
            {
                CheckParityImages.Populated(f, options);
                long cluster = L1Entry.L2Offset(Qemu.ReadBE64(f, CheckParityImages.L2EntryOffset(f, 1 << 20))) / Qemu.Header(f).ClusterSize;
                CheckParityImages.SetRefcount(f, cluster, 0);
            },
            ["snapshot-entry-incomplete"] = f =>
            {
                CheckParityImages.Populated(f, options);
                if (!options.Contains("refcount_bits=1")) CheckParityImages.Snapshot(f, "s1");
                if (Qemu.Header(f).SnapshotCount > 0) CheckParityImages.SetExtraDataSize(f, 0, 8);
            },
        };
        foreach ((string name, Action<string> build) in damages)
        {
            string original = dir.File(name + ".qcow2");
            build(original);
            foreach (string mode in new[] { "none", "all" }) AssertMatchesQemu(dir, original, mode);
        }
    }

    // ---- the comparison -----------------------------------------------------------------------------

    private static QemuImgCheck QemuCheck(string image, string mode) =>
        mode == "none" ? QemuImgCheck.Attempt(image) : QemuImgCheck.Attempt(image, "-r", mode);

    private static Qcow2RepairMode Mode(string mode) => mode switch
    {
        "leaks" => Qcow2RepairMode.Leaks,
        "all" => Qcow2RepairMode.All,
        _ => Qcow2RepairMode.None,
    };

    /// <summary>What <c>vmsnap check</c> does: open as qemu-img check opens, then check.</summary>
    internal static Qcow2CheckResult VmsnapCheck(string image, Qcow2RepairMode mode)
    {
        var options = mode == Qcow2RepairMode.None
            ? new Qcow2OpenOptions { ReadOnly = true, OpenBackingFile = false, ForCheck = true }
            : new Qcow2OpenOptions { OpenBackingFile = false, SkipDirtyRepair = true, ForCheck = true };
        using var img = Qcow2Image.Open(image, options);
        Qcow2CheckResult result = img.Check(mode);
        AssertKindsMatchTheWords(result);
        return result;
    }

    /// <summary>Each finding's kind is what its line says in qemu-img's words, which begin with the kind.</summary>
    private static void AssertKindsMatchTheWords(Qcow2CheckResult r)
    {
        foreach (Qcow2CheckFinding f in r.Findings)
        {
            Qcow2CheckFindingKind said = f.Text.StartsWith("ERROR", StringComparison.Ordinal) ? Qcow2CheckFindingKind.Error
                : f.Text.StartsWith("Leaked cluster", StringComparison.Ordinal) ? Qcow2CheckFindingKind.Leak
                : f.Text.StartsWith("Repairing", StringComparison.Ordinal) || f.Text.StartsWith("Discarding", StringComparison.Ordinal)
                  || f.Text.StartsWith("Rebuilding", StringComparison.Ordinal) ? Qcow2CheckFindingKind.Repair
                : f.Text.StartsWith("Check failed: ", StringComparison.Ordinal) ? Qcow2CheckFindingKind.Failure
                : Qcow2CheckFindingKind.Note;
            Assert.True(said == f.Kind, $"'{f.Text}' is reported as {f.Kind}");
        }
        Assert.Equal(r.Findings.Select(f => f.Text), r.Messages);
    }

    /// <summary>The exit code <c>vmsnap check</c> gives (qemu-img's: 1 check failed, 2 corruptions, 3 leaks only).</summary>
    private static int ExitCode(Qcow2CheckResult r) => r.CheckErrors > 0 ? 1 : r.Corruptions > 0 ? 2 : r.Leaks > 0 ? 3 : 0;

    private static long Field(Qcow2CheckResult r, string name) => name switch
    {
        "check-errors" => r.CheckErrors,
        "corruptions" => r.Corruptions,
        "leaks" => r.Leaks,
        "corruptions-fixed" => r.CorruptionsFixed,
        "leaks-fixed" => r.LeaksFixed,
        "image-end-offset" => r.ImageEndOffset,
        "total-clusters" => r.TotalClusters,
        "allocated-clusters" => r.AllocatedClusters,
        "fragmented-clusters" => r.FragmentedClusters,
        "compressed-clusters" => r.CompressedClusters,
        _ => throw new ArgumentOutOfRangeException(nameof(name)),
    };

    private static void AssertSameFindings(QemuImgCheck qemu, Qcow2CheckResult ours, string what)
    {
        string why = $"{what}\nqemu-img (exit {qemu.ExitCode}): {qemu.JsonOrNull?.ToString() ?? "no figures"}\n{Trim(qemu.Stderr)}\n" +
                     $"vmsnap (exit {ExitCode(ours)}): {Describe(ours)}";
        Assert.True(qemu.ExitCode == ExitCode(ours), why);
        if (qemu.JsonOrNull is JsonElement json)
        {
            foreach (string field in Fields)
                Assert.True(QemuImgCheck.Field(json, field) == Field(ours, field), $"{field} differs. {why}");
        }
        else
        {
            Assert.True(ours.Failure is not null, $"qemu-img's check failed, vmsnap's completed. {why}");
        }
    }

    private static string Describe(Qcow2CheckResult r) =>
        string.Join(", ", Fields.Select(f => $"{f} {Field(r, f)}")) + (r.Failure is null ? "" : $", failed: {r.Failure}") +
        "\n" + Trim(string.Join("\n", r.Messages));

    private static string Trim(string text) => text.Length > 3000 ? text[..1500] + "\n...\n" + text[^1500..] : text;

    private static void AssertMatchesQemu(TempDir dir, string original, string mode)
    {
        string theirs = dir.File($"qemu-{mode}.qcow2"), ours = dir.File($"vmsnap-{mode}.qcow2");
        File.Copy(original, theirs, overwrite: true);
        File.Copy(original, ours, overwrite: true);
        QemuImgCheck qemu = QemuCheck(theirs, mode);
        string before = Qemu.Hash(ours);
        Qcow2CheckResult result = VmsnapCheck(ours, Mode(mode));
        AssertSameFindings(qemu, result, $"check {(mode == "none" ? "" : "-r " + mode)} of {Path.GetFileName(original)}");
        if (mode == "none")
        {
            Assert.Equal(before, Qemu.Hash(ours));   // a check without repair writes nothing
            return;
        }

        // The repaired images: qemu-img finds the same in both, and they hold the same bytes.
        QemuImgCheck qemuAfter = QemuCheck(theirs, "none"), oursAfter = QemuCheck(ours, "none");
        string after = $"qemu-img check after -r {mode}:\nqemu's image (exit {qemuAfter.ExitCode}): {qemuAfter.JsonOrNull}\n{Trim(qemuAfter.Stderr)}\n" +
                       $"vmsnap's image (exit {oursAfter.ExitCode}): {oursAfter.JsonOrNull}\n{Trim(oursAfter.Stderr)}";
        Assert.True(qemuAfter.ExitCode == oursAfter.ExitCode, after);
        if (qemuAfter.JsonOrNull is JsonElement q && oursAfter.JsonOrNull is JsonElement v)
            foreach (string field in Fields)
                Assert.True(QemuImgCheck.Field(q, field) == QemuImgCheck.Field(v, field), $"{field} differs. {after}");
        else
            Assert.True(qemuAfter.JsonOrNull is null && oursAfter.JsonOrNull is null, after);
        AssertSameUsedClusters(theirs, ours);
        Tool.Result compare = Tool.Run("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", theirs, ours]);
        // qemu-img cannot read some damaged images even after its repair (then not even compared
        // with themselves); their bytes were compared above.
        Assert.True(compare.ExitCode == 0 || Tool.Run("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", theirs, theirs]).ExitCode != 0,
            $"qemu-img compare: {compare.ExitCode} {compare.Stdout}{compare.Stderr}");
    }

    /// <summary>
    /// Both files have the same length and the same bytes in every cluster that either one's
    /// refcounts count as used, or where those refcounts cannot be read (free clusters may hold
    /// anything: QEMU punches holes where the file system lets it).
    /// </summary>
    private static void AssertSameUsedClusters(string theirs, string ours)
    {
        long length = new FileInfo(theirs).Length;
        Assert.True(length == new FileInfo(ours).Length, $"file sizes differ: qemu {length}, vmsnap {new FileInfo(ours).Length}");
        Func<long, bool> usedByQemu = UsedClusters(theirs), usedByUs = UsedClusters(ours);
        int clusterSize = Qemu.Header(theirs).ClusterSize;
        using var a = File.OpenRead(theirs);
        using var b = File.OpenRead(ours);
        byte[] x = new byte[clusterSize], y = new byte[clusterSize];
        for (long c = 0; c * clusterSize < length; c++)
        {
            int n = (int)Math.Min(clusterSize, length - c * clusterSize);
            a.Position = b.Position = c * clusterSize;
            a.ReadExactly(x, 0, n);
            b.ReadExactly(y, 0, n);
            if (!usedByQemu(c) && !usedByUs(c)) continue;
            if (!x.AsSpan(0, n).SequenceEqual(y.AsSpan(0, n)))
            {
                int at = x.AsSpan(0, n).CommonPrefixLength(y.AsSpan(0, n));
                Assert.Fail($"the repaired files differ at offset 0x{c * clusterSize + at:x} (cluster {c}): qemu 0x{x[at]:x2}, vmsnap 0x{y[at]:x2}");
            }
        }
    }

    /// <summary>Whether a cluster counts as used by the file's own refcount structure (read raw; true where it cannot be read).</summary>
    private static Func<long, bool> UsedClusters(string image)
    {
        Qcow2Header h = Qemu.Header(image);
        var g = new ClusterGeometry(h.ClusterBits, h.HasExtendedL2, h.RefcountOrder);
        long length = new FileInfo(image).Length;
        long tableOffset = (long)h.RefcountTableOffset;
        long tableEntries = (long)h.RefcountTableClusters * g.ClusterSize / 8;
        var blocks = new Dictionary<long, byte[]?>();
        return cluster =>
        {
            long index = cluster >> g.RefcountBlockBits;
            if (index >= tableEntries || tableOffset + index * 8 + 8 > length) return true;
            if (!blocks.TryGetValue(index, out byte[]? block))
            {
                ulong entry = Qemu.ReadBE64(image, tableOffset + index * 8);
                long offset = (long)(entry & RefcountTableEntry.OffsetMask);
                block = entry == 0 || (entry & RefcountTableEntry.ReservedMask) != 0 || (offset & (g.ClusterSize - 1)) != 0 || offset + g.ClusterSize > length
                    ? null
                    : Qemu.ReadRaw(image, offset, g.ClusterSize);
                blocks[index] = block;
            }
            return block is null || RefcountBlock.Get(block, cluster & (g.RefcountBlockEntries - 1), g.RefcountOrder) != 0;
        };
    }

    // ---- single behaviours --------------------------------------------------------------------------

    [QemuFact]
    public void An_invalid_snapshot_table_offset_is_reported_even_without_snapshots()
    {
        using var dir = new TempDir();
        string image = dir.File("a.qcow2");
        CheckParityImages.Kinds["snapshot-offset-unaligned-without-snapshots"](image);
        string hash = Qemu.Hash(image);

        // Like qemu-img info, a normal open refuses it, naming the header field and the offset.
        var e = Assert.Throws<Qcow2FormatException>(() => Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }).Dispose());
        Assert.Equal("header", e.Structure);
        Assert.Equal(Qcow2Header.SnapshotFieldsOffset, e.FileOffset);
        Assert.Contains("0x1234567890abcdef", e.Message);
        Assert.NotEqual(0, Tool.Run("qemu-img", ["info", image]).ExitCode);

        // vmsnap check: check failed (exit 1), like qemu-img check, with the reason; the file untouched, also by --repair all.
        foreach (string[] repair in new[] { Array.Empty<string>(), ["--repair", "all"] })
        {
            Tool.Result r = Vmsnap(["check", image, .. repair]);
            Assert.Equal(1, r.ExitCode);
            Assert.Contains("snapshot table offset invalid", r.Stdout + r.Stderr);
            Assert.Equal(1, Tool.Run("qemu-img", ["check", .. repair.Length > 0 ? new[] { "-r", "all" } : [], image]).ExitCode);
            Assert.Equal(hash, Qemu.Hash(image));
        }
    }

    private static Tool.Result Vmsnap(string[] args) =>
        VmsnapCli.Run([.. args], TimeSpan.FromMinutes(2));

    [QemuFact]
    public void Incomplete_snapshot_entries_are_completed_by_repair_all_as_qemu_completes_them()
    {
        using var dir = new TempDir();
        string ours = dir.File("ours.qcow2"), theirs = dir.File("theirs.qcow2");
        CheckParityImages.BotchedV3(ours);
        File.Copy(ours, theirs);
        Qcow2CheckResult found = VmsnapCheck(ours, Qcow2RepairMode.None);
        Assert.Contains("ERROR snapshot table entry 0 is incomplete", found.Messages);
        Assert.Contains("ERROR snapshot table entry 2 is incomplete", found.Messages);
        AssertSameFindings(QemuCheck(theirs, "none"), found, "check of the botched v3 image");
        AssertSameFindings(QemuCheck(theirs, "all"), VmsnapCheck(ours, Qcow2RepairMode.All), "check -r all of the botched v3 image");
        QemuImgCheck.AssertClean(theirs);
        QemuImgCheck.AssertClean(ours);
        Assert.Equal(SnapshotList(theirs), SnapshotList(ours));
        using var img = Qcow2Image.Open(ours, new Qcow2OpenOptions { ReadOnly = true });
        foreach (Qcow2Snapshot s in img.Snapshots)
        {
            SnapshotEntry e = img.Engine.State.Snapshots.Entries.Single(x => x.Id == s.Id);
            Assert.NotNull(e.Icount);
            // QEMU fills in the current disk size where there was none (sn1's 50 bytes of extra data held a 0).
            Assert.Equal(s.Name == "sn1" ? 0 : (ulong)img.VirtualSize, e.DiskSize);
        }
        foreach (string name in new[] { "sn0", "sn1", "sn2" })
            Qemu.AssertSameRaw(Qemu.ToRaw(theirs, dir, name), Qemu.ToRaw(ours, dir, name));
    }

    [QemuFact]
    public void Writes_go_on_in_an_image_whose_snapshot_entries_are_incomplete()
    {
        using var dir = new TempDir();
        string image = dir.File("a.qcow2");
        CheckParityImages.Kinds["snapshot-entry-incomplete"](image);
        using (var img = Qcow2Image.Open(image)) img.Write(new byte[] { 1, 2, 3 }, 4096);
        (JsonElement json, _) = QemuImgCheck.Of(image);
        Assert.Equal(1, QemuImgCheck.Field(json, "corruptions"));   // still only the incomplete entry, as after a QEMU write
        Assert.Equal(0, QemuImgCheck.Field(json, "leaks"));
    }

    /// <summary>
    /// An unknown autoclear bit: a repair clears it (as QEMU's writable open does) and keeps the
    /// snapshots. (QEMU 7.2's check -r leaks/all rewrites its whole header there, in check mode
    /// with no snapshot read, and so drops the snapshot table and frees its clusters; vmsnap does not follow.)
    /// </summary>
    [QemuFact]
    public void A_repair_clears_unknown_autoclear_bits_and_keeps_the_snapshots()
    {
        using var dir = new TempDir();
        string image = dir.File("a.qcow2");
        CheckParityImages.Populated(image);
        CheckParityImages.Snapshot(image, "s1");
        Qemu.Io(image, "write -P 0x55 0 64k");
        CheckParityImages.Snapshot(image, "s2");
        string before = SnapshotList(image);
        string s1 = Qemu.ToRaw(image, dir, "s1");
        Qemu.WriteBE64(image, Qcow2Header.AutoclearFeaturesOffset, 1UL << 48);
        foreach (Qcow2RepairMode mode in new[] { Qcow2RepairMode.Leaks, Qcow2RepairMode.All })
        {
            Qcow2CheckResult r = VmsnapCheck(image, mode);
            Assert.True(r.IsClean, Describe(r));
            Assert.Equal(0UL, Qemu.ReadBE64(image, Qcow2Header.AutoclearFeaturesOffset));
            QemuImgCheck.AssertClean(image);
            Assert.Equal(before, SnapshotList(image));
            Qemu.AssertSameRaw(s1, Qemu.ToRaw(image, dir, "s1"));
        }
    }

    private static string SnapshotList(string image) =>
        string.Join("\n", Tool.QemuImg("snapshot", "-l", image).Split('\n').Skip(2).Select(l => string.Join(' ', l.Split(' ', StringSplitOptions.RemoveEmptyEntries).Take(3))));

    // ---- snapshot delete --------------------------------------------------------------------------

    public static TheoryData<string, string> SnapshotSequences() => new()
    {
        { "plain", "c s1|w 2 0 64k|c s2|d s1|a s2|w 3 64k 64k|d s2" },
        { "plain", "c s1|c s2|c s3|d s2|w 4 0 1M|d s1|d s3" },
        { "botched-v3", "d sn0" },
        { "botched-v3", "d sn1" },
        { "botched-v3", "d sn2" },
        { "botched-v3", "d sn1|d sn0|c s4|d sn2" },
        { "incomplete", "d s2" },
        { "incomplete", "a s1|d s1|w 7 0 64k|c s3|d s2" },
        { "unknown-extra", "d s1" },
        { "vm-state", "c s2|d vm1|w 5 0 64k|d s2" },
        { "small-clusters", "c s1|w 2 0 64k|c s2|d s1|a s2|d s2" },
        { "refcount-bits-4", "c s1|c s2|w 2 0 64k|d s1|c s3|d s3|d s2" },
        { "extended-l2", "c s1|w 2 0 4k|c s2|d s1|a s2|d s2" },
        { "v2", "c s1|w 2 0 64k|c s2|d s1|a s2|d s2" },
    };

    /// <summary>
    /// The same snapshot operations through qemu-img and through vmsnap on copies of one image:
    /// where qemu-img check finds QEMU's image clean, it finds vmsnap's clean too, with the same
    /// snapshots (ID, name, VM-state size) and the same disk in the active image and in each snapshot.
    /// </summary>
    [QemuTheory]
    [MemberData(nameof(SnapshotSequences))]
    public void Snapshot_operations_leave_an_image_as_clean_as_qemus(string start, string sequence)
    {
        using var dir = new TempDir();
        string original = dir.File("original.qcow2");
        MakeStart(original, start);
        string theirs = dir.File("qemu.qcow2"), ours = dir.File("vmsnap.qcow2");
        File.Copy(original, theirs);
        File.Copy(original, ours);
        foreach (string op in sequence.Split('|'))
        {
            string[] p = op.Split(' ');
            switch (p[0])
            {
                case "c":
                    Tool.QemuImg("snapshot", "-c", p[1], theirs);
                    using (var img = Qcow2Image.Open(ours)) img.CreateSnapshot(p[1]);
                    break;
                case "d":
                    Tool.QemuImg("snapshot", "-d", p[1], theirs);
                    using (var img = Qcow2Image.Open(ours)) img.DeleteSnapshot(p[1]);
                    break;
                case "a":
                    Tool.QemuImg("snapshot", "-a", p[1], theirs);
                    using (var img = Qcow2Image.Open(ours)) img.ApplySnapshot(p[1]);
                    break;
                case "w":
                    Qemu.Io(theirs, $"write -P {p[1]} {p[2]} {p[3]}");
                    Qemu.Io(ours, $"write -P {p[1]} {p[2]} {p[3]}");
                    break;
            }
        }
        (JsonElement q, int qExit) = QemuImgCheck.Of(theirs);
        (JsonElement v, int vExit) = QemuImgCheck.Of(ours);
        string why = $"after {sequence} on {start}:\nqemu's image: {q}\n{Tool.Run("qemu-img", ["check", theirs]).Stderr}\nvmsnap's image: {v}\n{Tool.Run("qemu-img", ["check", ours]).Stderr}";
        if (qExit == 0) Assert.True(vExit == 0, why);
        foreach (string field in new[] { "corruptions", "leaks", "check-errors" })
            Assert.True(QemuImgCheck.Field(v, field) <= QemuImgCheck.Field(q, field), $"{field}: {why}");
        Assert.Equal(SnapshotList(theirs), SnapshotList(ours));
        Qemu.AssertSameContent(theirs, ours, "qcow2");
        using (var img = Qcow2Image.Open(ours, new Qcow2OpenOptions { ReadOnly = true }))
            foreach (Qcow2Snapshot s in img.Snapshots)
                Qemu.AssertSameRaw(Qemu.ToRaw(theirs, dir, s.Name), Qemu.ToRaw(ours, dir, s.Name));
    }

    private static void MakeStart(string image, string start)
    {
        switch (start)
        {
            case "plain":
                CheckParityImages.Populated(image);
                break;
            case "botched-v3":
                CheckParityImages.BotchedV3(image);
                break;
            case "incomplete":
                CheckParityImages.Kinds["snapshot-entry-incomplete"](image);
                break;
            case "unknown-extra":
                CheckParityImages.Kinds["snapshot-unknown-extra-data"](image);
                break;
            case "vm-state":
                CheckParityImages.Populated(image);
                using (var img = Qcow2Image.Open(image))
                {
                    byte[] state = new byte[300_000];
                    new Random(5).NextBytes(state);
                    using Qcow2VmStateArea area = img.OpenVmStateAreaForWriting();
                    area.Write(state, 0);
                    area.Flush();
                    img.CreateSnapshot("vm1", new Qcow2SnapshotCreateOptions { VmStateSize = state.Length });
                }
                break;
            case "small-clusters":
                CheckParityImages.Populated(image, "cluster_size=512");
                break;
            case "refcount-bits-4":
                CheckParityImages.Populated(image, "refcount_bits=4");
                break;
            case "extended-l2":
                CheckParityImages.Populated(image, "extended_l2=on");
                break;
            case "v2":
                CheckParityImages.Populated(image, "compat=0.10");
                break;
            default:
                throw new ArgumentOutOfRangeException(nameof(start), start, "no such start image");
        }
    }
}
