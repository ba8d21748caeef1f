using System.Diagnostics;
using System.Text.Json;
using System.Text.RegularExpressions;
using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;
using Vmsnap.Tests.Qcow2;
using Vmsnap.Tests.Snapshots;

namespace Vmsnap.Tests.Cli;

/// <summary>
/// <c>vmsnap info|check|snapshot list --json</c> against real <c>qemu-img info|check --output=json</c>
/// on the same images, key by key: every key qemu-img prints is there with the same nesting, JSON
/// type and value; a key qemu-img leaves out is left out; the only other keys are vmsnap's own,
/// listed here. Both tools run in the images' folder on relative names, so the file names (and
/// QEMU's full-backing-filename built from them) must agree too.
/// </summary>
[Trait("Category", "Unit")]
public partial class QemuImgJsonTests
{
    /// <summary>vmsnap's own keys, by object: anything else vmsnap prints must be qemu-img's.</summary>
    private static readonly Dictionary<string, string[]> OwnKeys = new()
    {
        // children: QEMU 10.0's qemu-img prints it (and the test compares it there); 7.2's does not.
        ["info"] = ["file-length", "l1-size", "children"],
        ["snapshot"] = ["date", "disk-size", "l1-table-offset", "l1-size"],
        ["check"] = ["messages"],
    };

    [GeneratedRegex("^[a-z0-9]+(-[a-z0-9]+)*$")]
    private static partial Regex KebabCase();

    private static Tool.Result Run(string cwd, string program, params string[] args)
    {
        var psi = new ProcessStartInfo(Path.IsPathRooted(program) ? program : Tool.Find(program))
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
            WorkingDirectory = cwd,
        };
        foreach (string a in args) psi.ArgumentList.Add(a);
        using var p = Tool.Start(psi);
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(TimeSpan.FromMinutes(2)))
        {
            p.Kill(entireProcessTree: true);
            throw new TimeoutException($"{program} {string.Join(' ', args)} did not finish in time");
        }
        p.WaitForExit();
        return new Tool.Result(p.ExitCode, stdout.Result, stderr.Result);
    }

    private static Tool.Result Vmsnap(string cwd, params string[] args) => Run(cwd, VmsnapCli.Command[0], [.. VmsnapCli.Command.Skip(1), .. args]);

    private static JsonElement Parse(Tool.Result r, string what)
    {
        Assert.True(r.Stdout.TrimStart().StartsWith('{'), $"{what} printed no JSON (exit {r.ExitCode}): {r.Stderr}{r.Stdout}");
        return JsonDocument.Parse(r.Stdout).RootElement.Clone();
    }

    /// <summary>
    /// <paramref name="ours"/> has every key of <paramref name="theirs"/>, nested the same, with the same
    /// JSON type and value; its other keys are in <paramref name="ownKeys"/>(path); every key is kebab-case.
    /// </summary>
    internal static void AssertLikeQemu(JsonElement theirs, JsonElement ours, string path, Func<string, string[]> ownKeys)
    {
        Assert.True(Kind(theirs) == Kind(ours), $"{path}: qemu-img prints {theirs.ValueKind} {theirs}, vmsnap {ours.ValueKind} {ours}");
        switch (theirs.ValueKind)
        {
            case JsonValueKind.Object:
                foreach (JsonProperty p in theirs.EnumerateObject())
                {
                    Assert.True(ours.TryGetProperty(p.Name, out JsonElement mine), $"{path}: vmsnap lacks qemu-img's key '{p.Name}' ({p.Value})");
                    AssertLikeQemu(p.Value, mine, $"{path}.{p.Name}", ownKeys);
                }
                foreach (JsonProperty p in ours.EnumerateObject())
                {
                    Assert.Matches(KebabCase(), p.Name);
                    if (!theirs.TryGetProperty(p.Name, out _))
                        Assert.True(ownKeys(path).Contains(p.Name), $"{path}: vmsnap prints '{p.Name}' ({p.Value}), which qemu-img leaves out here and which is not one of vmsnap's own keys");
                }
                break;
            case JsonValueKind.Array:
                Assert.True(theirs.GetArrayLength() == ours.GetArrayLength(), $"{path}: qemu-img lists {theirs.GetArrayLength()} items, vmsnap {ours.GetArrayLength()}");
                for (int i = 0; i < theirs.GetArrayLength(); i++) AssertLikeQemu(theirs[i], ours[i], $"{path}[{i}]", ownKeys);
                break;
            case JsonValueKind.String:
                Assert.True(theirs.GetString() == ours.GetString(), $"{path}: qemu-img '{theirs.GetString()}', vmsnap '{ours.GetString()}'");
                break;
            case JsonValueKind.Number:
                Assert.True(theirs.GetRawText() == ours.GetRawText(), $"{path}: qemu-img {theirs.GetRawText()}, vmsnap {ours.GetRawText()}");
                break;
            default:
                Assert.True(theirs.ValueKind == ours.ValueKind, $"{path}: qemu-img {theirs}, vmsnap {ours}");
                break;
        }
    }

    private static JsonValueKind Kind(JsonElement e) => e.ValueKind == JsonValueKind.False ? JsonValueKind.True : e.ValueKind;

    private static string[] InfoOwnKeys(string path) =>
        path == "info" ? OwnKeys["info"] : Regex.IsMatch(path, @"^info\.snapshots\[\d+\]$") ? OwnKeys["snapshot"] : [];

    /// <summary>
    /// Top-level keys of <c>qemu-img info</c> that a QEMU version prints and vmsnap, which prints 7.2's keys, does
    /// not (measured; docs/qemu-versions.md): QEMU 10.0 adds <c>children</c>, the block graph below the image.
    /// </summary>
    private static readonly Dictionary<string, string[]> NewerInfoKeys = new() { ["10.0"] = ["children"] };

    /// <summary>qemu-img's info without the keys of <see cref="NewerInfoKeys"/> that vmsnap leaves out; each must be there.</summary>
    private static JsonElement WithoutNewerKeys(JsonElement theirs, JsonElement ours, string image)
    {
        if (!NewerInfoKeys.TryGetValue(QemuInstall.Current.Version, out string[]? keys)) return theirs;
        var node = System.Text.Json.Nodes.JsonNode.Parse(theirs.GetRawText())!.AsObject();
        foreach (string key in keys)
        {
            Assert.True(node.ContainsKey(key), $"{QemuInstall.Current}'s qemu-img info {image} no longer prints '{key}': {theirs}");
            if (!ours.TryGetProperty(key, out _)) node.Remove(key);
        }
        return JsonDocument.Parse(node.ToJsonString()).RootElement.Clone();
    }

    /// <summary>info (qemu-img info) and snapshot list (qemu-img info's filename and snapshots) of one image.</summary>
    private static void AssertInfoLikeQemu(string cwd, string image)
    {
        JsonElement theirs = Parse(Run(cwd, "qemu-img", "info", "--output=json", image), $"qemu-img info {image}");
        JsonElement ours = Parse(Vmsnap(cwd, "info", image, "--output=json"), $"vmsnap info {image}");
        theirs = WithoutNewerKeys(theirs, ours, image);
        AssertLikeQemu(theirs, ours, "info", InfoOwnKeys);
        Assert.Equal(ours.ToString(), Parse(Vmsnap(cwd, "info", image, "--json"), "vmsnap info --json").ToString());

        JsonElement list = Parse(Vmsnap(cwd, "snapshot", "list", image, "--json"), $"vmsnap snapshot list {image}");
        Assert.Equal(["filename", "snapshots"], list.EnumerateObject().Select(p => p.Name));
        Assert.Equal(theirs.GetProperty("filename").GetString(), list.GetProperty("filename").GetString());
        JsonElement listed = list.GetProperty("snapshots");
        if (theirs.TryGetProperty("snapshots", out JsonElement snapshots))
            AssertLikeQemu(snapshots, listed, "info.snapshots", InfoOwnKeys);
        else
            Assert.Equal(0, listed.GetArrayLength());   // qemu-img info leaves the key out; the list is empty
    }

    /// <summary>check of one image by both tools (on two identical copies when repairing): the same JSON and exit code.</summary>
    private static JsonElement AssertCheckLikeQemu(string cwd, string image, params string[] repair)
    {
        string copy = image + ".copy";
        File.Copy(Path.Combine(cwd, image), Path.Combine(cwd, copy), overwrite: true);
        Tool.Result q = Run(cwd, "qemu-img", ["check", "--output=json", .. repair, copy]);
        Tool.Result v = Vmsnap(cwd, ["check", "--output=json", .. repair, image]);
        Assert.True(q.ExitCode == v.ExitCode, $"check {image} {string.Join(' ', repair)}: qemu-img exits {q.ExitCode}, vmsnap {v.ExitCode}: {v.Stderr}");
        // The copy's name differs by its suffix only: compare under the image's name.
        JsonElement theirs = JsonDocument.Parse(q.Stdout.Replace($"\"{copy}\"", $"\"{image}\"")).RootElement;
        JsonElement ours = Parse(v, $"vmsnap check {image}");
        AssertLikeQemu(theirs, ours, "check", path => path == "check" ? OwnKeys["check"] : []);
        // A repaired image is as qemu-img left its copy.
        if (repair.Length > 0) Qemu.AssertSameContent(Path.Combine(cwd, image), Path.Combine(cwd, copy), "qcow2");
        File.Delete(Path.Combine(cwd, copy));
        return ours;
    }

    [QemuFact]
    public void Info_and_snapshot_list_print_qemu_img_infos_json_for_every_kind_of_image()
    {
        using var dir = new TempDir();
        string cwd = dir.Path;
        Directory.CreateDirectory(dir.File("sub"));

        // Version 2, with data and a disk-only snapshot.
        Tool.QemuImg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", dir.File("v2.qcow2"), "64M");
        Qemu.Io(dir.File("v2.qcow2"), "write -P 1 0 300k");
        Tool.QemuImg("snapshot", "-c", "by-qemu-img", dir.File("v2.qcow2"));

        // Version 3 with QEMU's savevm (VM state, no icount), qemu-img's snapshot (icount 0) and one of
        // vmsnap's with every field set to something unusual.
        string v3 = dir.File("v3.qcow2");
        Tool.QemuImg("create", "-q", "-f", "qcow2", v3, "256M");
        Qemu.Io(v3, "write -P 2 1M 1M");
        string ram = dir.File("guest.ram");
        GuestRam.Create(ram, 16 << 20, seed: 12);
        VmKit.QemuSavevm(QemuVm.MachineNone(ram, 16 << 20), v3, "savevm-tag");
        Tool.QemuImg("snapshot", "-c", "disk-only", v3);
        using (var img = Qcow2Image.Open(v3))
        {
            img.CreateSnapshot("ünïcödé name", new Qcow2SnapshotCreateOptions
            {
                VmStateSize = 0, Date = new DateTimeOffset(2001, 2, 3, 4, 5, 6, TimeSpan.Zero).AddTicks(1_234_567),
                VmClock = 3_723_000_000_123, Icount = 987_654_321,
            });
        }
        // vmsnap's own save: a snapshot with VM state written by vmsnap.
        VmKit.VmsnapJson("save", v3, "--name", "by-vmsnap", "--machine", "none", "--ram", $"ram0={ram}", "--json");

        // Lazy refcounts left dirty by a writer that died (QEMU's own way: qemu-io's sigraise 9).
        string dirty = dir.File("dirty.qcow2");
        Tool.QemuImg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", dirty, "64M");
        Tool.Run("qemu-io", ["-c", "write -P 3 0 256k", "-c", "sigraise 9", dirty]);
        Assert.True(Qemu.Info(dirty).GetProperty("dirty-flag").GetBoolean());

        // Extended L2, 16k clusters, zstd, 64-bit refcounts; a snapshot.
        string ext = dir.File("ext.qcow2");
        Tool.QemuImg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=16k,compression_type=zstd,refcount_bits=64", ext, "32M");
        Qemu.Io(ext, "write -P 4 4k 8k");
        Tool.QemuImg("snapshot", "-c", "s", ext);

        // Backing files: relative (to a folder above), absolute, raw; the image named through a folder.
        Tool.QemuImg("create", "-q", "-f", "qcow2", dir.File("base.qcow2"), "64M");
        Tool.QemuImg("create", "-q", "-f", "raw", dir.File("base.raw"), "64M");
        Tool.QemuImg("create", "-q", "-f", "qcow2", "-b", "../base.qcow2", "-F", "qcow2", dir.File("sub/relative.qcow2"), "64M");
        Tool.QemuImg("create", "-q", "-f", "qcow2", "-b", dir.File("base.qcow2"), "-F", "qcow2", dir.File("sub/absolute.qcow2"), "64M");
        Tool.QemuImg("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", dir.File("on-raw.qcow2"), "64M");

        // Persistent bitmaps: one auto, one disabled, then both in use (a writer died with them loaded).
        string bitmaps = dir.File("bitmaps.qcow2");
        Tool.QemuImg("create", "-q", "-f", "qcow2", bitmaps, "64M");
        Tool.QemuImg("bitmap", "--add", bitmaps, "b1");
        Tool.QemuImg("bitmap", "--add", "-g", "128k", "--disable", bitmaps, "b2");
        string inUse = dir.File("in-use.qcow2");
        File.Copy(bitmaps, inUse);
        Tool.Run("qemu-io", ["-c", "write 0 64k", "-c", "sigraise 9", inUse]);

        // The corrupt bit set.
        string corrupt = dir.File("corrupt.qcow2");
        Tool.QemuImg("create", "-q", "-f", "qcow2", corrupt, "64M");
        Qemu.WriteBE64(corrupt, 72, 1UL << 1);
        Assert.True(Qemu.Info(corrupt).GetProperty("format-specific").GetProperty("data").GetProperty("corrupt").GetBoolean());

        // Made by vmsnap.
        Assert.Equal(0, Vmsnap(cwd, "create", "made-by-vmsnap.qcow2", "100M", "--cluster-size", "4k", "--refcount-bits", "8", "--lazy-refcounts").ExitCode);

        foreach (string image in new[]
        {
            "v2.qcow2", "v3.qcow2", "dirty.qcow2", "ext.qcow2", "sub/relative.qcow2", "./sub/absolute.qcow2", "on-raw.qcow2",
            "bitmaps.qcow2", "in-use.qcow2", "corrupt.qcow2", "made-by-vmsnap.qcow2", dir.File("sub/relative.qcow2"),
        })
            AssertInfoLikeQemu(cwd, image);

        // What the comparison saw really has the cases it is meant to cover.
        JsonElement info = Qemu.Info(v3);
        JsonElement[] listed = info.GetProperty("snapshots").EnumerateArray().ToArray();
        Assert.True(listed[0].GetProperty("vm-state-size").GetInt64() > 0);
        Assert.False(listed[0].TryGetProperty("icount", out _));
        Assert.Equal(0, listed[1].GetProperty("icount").GetInt64());
        Assert.Equal(3723, listed[2].GetProperty("vm-clock-sec").GetInt64());
        Assert.Equal(123_456_000, listed[2].GetProperty("date-nsec").GetInt64());   // vmsnap keeps microseconds, as QEMU does
        Assert.True(listed[3].GetProperty("vm-state-size").GetInt64() > 0);
        Assert.Equal("sub/../base.qcow2", JsonDocument.Parse(Vmsnap(cwd, "info", "sub/relative.qcow2", "--json").Stdout).RootElement.GetProperty("full-backing-filename").GetString());
        Assert.Equal(["in-use", "auto"], Qemu.Info(inUse).GetProperty("format-specific").GetProperty("data").GetProperty("bitmaps")[0]
            .GetProperty("flags").EnumerateArray().Select(f => f.GetString()));
    }

    [QemuFact]
    public void A_snapshots_date_and_clock_are_printed_as_stored_whatever_the_bits()
    {
        using var dir = new TempDir();
        string image = dir.File("odd.qcow2");
        Tool.QemuImg("create", "-q", "-f", "qcow2", image, "16M");
        Tool.QemuImg("snapshot", "-c", "odd", image);
        // Patch the entry's date_nsec to a value that is no whole number of 100 ns, and the VM clock to one with bit 63 set.
        long entry = (long)Qemu.Header(image).SnapshotsOffset;
        Qemu.WriteBE32(image, entry + 20, 123_456_789);
        Qemu.WriteBE64(image, entry + 24, 0x8000_0000_0000_1234UL);
        AssertInfoLikeQemu(dir.Path, "odd.qcow2");
        JsonElement s = Qemu.Info(image).GetProperty("snapshots")[0];
        Assert.Equal(123_456_789, s.GetProperty("date-nsec").GetInt64());
        Assert.Equal((long)(0x8000_0000_0000_1234UL / 1_000_000_000), s.GetProperty("vm-clock-sec").GetInt64());
    }

    [QemuFact]
    public void Check_prints_qemu_img_checks_json_and_exit_code_clean_damaged_and_repaired()
    {
        string version = QemuInstall.Current.Version;
        using var dir = new TempDir();
        string cwd = dir.Path;

        // Clean: empty; with data, fragmented (written out of order) and compressed clusters; version 2; extended L2.
        Tool.QemuImg("create", "-q", "-f", "qcow2", dir.File("empty.qcow2"), "64M");
        string data = dir.File("data.qcow2");
        Tool.QemuImg("create", "-q", "-f", "qcow2", data, "64M");
        Qemu.Io(data, "write -P 1 10M 128k", "write -P 2 0 64k", "write -P 3 5M 64k");
        Tool.QemuImg("snapshot", "-c", "s", data);
        Tool.QemuImg("convert", "-c", "-O", "qcow2", data, dir.File("compressed.qcow2"));
        Qemu.Io(dir.File("compressed.qcow2"), "write -P 4 20M 64k");
        Tool.QemuImg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", dir.File("v2.qcow2"), "64M");
        Qemu.Io(dir.File("v2.qcow2"), "write -P 5 0 100k");
        Tool.QemuImg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=32k", dir.File("ext.qcow2"), "64M");
        Qemu.Io(dir.File("ext.qcow2"), "write -P 6 4k 4k");
        foreach (string image in new[] { "empty.qcow2", "data.qcow2", "compressed.qcow2", "v2.qcow2", "ext.qcow2" })
            AssertCheckLikeQemu(cwd, image);
        Assert.True(AssertCheckLikeQemu(cwd, "compressed.qcow2").TryGetProperty("compressed-clusters", out _));
        Assert.True(AssertCheckLikeQemu(cwd, "data.qcow2").TryGetProperty("fragmented-clusters", out _));

        // A leaked cluster (exit 3), then repaired.
        string leaky = dir.File("leaky.qcow2");
        File.Copy(data, leaky);
        using (var f = new FileStream(leaky, FileMode.Open)) f.SetLength(f.Length + 65536 * 2);
        Qcow2Header h = Qemu.Header(leaky);
        long block = (long)Qemu.ReadBE64(leaky, (long)h.RefcountTableOffset);
        Qemu.WriteRaw(leaky, block + (new FileInfo(leaky).Length / 65536 - 1) * 2, new byte[] { 0, 1 });
        Assert.True(AssertCheckLikeQemu(cwd, "leaky.qcow2").TryGetProperty("leaks", out _));
        string leakyBefore = Qemu.Hash(leaky);
        Assert.True(AssertCheckLikeQemu(cwd, "leaky.qcow2", "-r", "leaks").TryGetProperty("leaks-fixed", out _));
        Assert.NotEqual(leakyBefore, Qemu.Hash(leaky));

        // A refcount too low (exit 2), then repaired.
        string corrupt = dir.File("corrupt.qcow2");
        File.Copy(data, corrupt);
        long l2 = (long)(Qemu.ReadBE64(corrupt, (long)h.L1TableOffset) & L1Entry.OffsetMask);
        long cluster = (long)(Qemu.ReadBE64(corrupt, l2 + 8 * ((10 << 20) / 65536)) & L2Entry.OffsetMask) / 65536;
        Qemu.WriteRaw(corrupt, block + cluster * 2, new byte[] { 0, 0 });
        Assert.True(AssertCheckLikeQemu(cwd, "corrupt.qcow2").TryGetProperty("corruptions", out _));
        Assert.True(AssertCheckLikeQemu(cwd, "corrupt.qcow2", "-r", "all").TryGetProperty("corruptions-fixed", out _));

        // Dirty lazy refcounts: refcounts not yet written are corruptions for a read-only check.
        string dirty = dir.File("dirty.qcow2");
        Tool.QemuImg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", dirty, "64M");
        Tool.Run("qemu-io", ["-c", "write -P 3 0 256k", "-c", "sigraise 9", dirty]);
        AssertCheckLikeQemu(cwd, "dirty.qcow2");
    }
}
