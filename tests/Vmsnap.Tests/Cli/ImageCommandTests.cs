using System.Text.Json;
using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;
using Vmsnap.Tests.Qcow2;

namespace Vmsnap.Tests.Cli;

/// <summary>The vmsnap image commands, run as the real tool: exit codes, output, JSON shape, one-line errors.</summary>
[Trait("Category", "Unit")]
public class ImageCommandTests
{
    private static Tool.Result Vmsnap(params string[] args) =>
        VmsnapCli.Run([.. args], TimeSpan.FromMinutes(2));

    private static void AssertOneLineError(Tool.Result r, int exitCode, params string[] words)
    {
        Assert.Equal(exitCode, r.ExitCode);
        string[] lines = r.Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.True(lines.Length == 1, $"stderr should be one line: {r.Stderr}");
        Assert.StartsWith("vmsnap: ", lines[0]);
        foreach (string w in words) Assert.Contains(w, lines[0], StringComparison.OrdinalIgnoreCase);
    }

    [QemuFact]
    public void Create_makes_the_image_asked_for()
    {
        using var dir = new TempDir();
        string image = dir.File("a.qcow2");
        Tool.Result r = Vmsnap("create", image, "64M", "--cluster-size", "4k", "--refcount-bits", "8", "--lazy-refcounts", "--json");
        Assert.Equal(0, r.ExitCode);
        JsonElement json = JsonDocument.Parse(r.Stdout).RootElement;
        Assert.Equal(67108864, json.GetProperty("virtual-size").GetInt64());
        Assert.Equal(4096, json.GetProperty("cluster-size").GetInt32());
        JsonElement ours = json.GetProperty("format-specific").GetProperty("data");
        Assert.Equal(8, ours.GetProperty("refcount-bits").GetInt32());
        Assert.True(ours.GetProperty("lazy-refcounts").GetBoolean());
        Assert.Equal("1.1", ours.GetProperty("compat").GetString());
        JsonElement q = Qemu.Info(image).GetProperty("format-specific").GetProperty("data");
        Assert.Equal(8, q.GetProperty("refcount-bits").GetInt32());
        Assert.True(q.GetProperty("lazy-refcounts").GetBoolean());
        Assert.Equal(4096, Qemu.Info(image).GetProperty("cluster-size").GetInt32());

        string v2 = dir.File("b.qcow2");
        r = Vmsnap("create", v2, "1G", "--compat", "0.10");
        Assert.Equal(0, r.ExitCode);
        Assert.Contains("Formatting", r.Stdout);
        Assert.Equal("0.10", Qemu.Info(v2).GetProperty("format-specific").GetProperty("data").GetProperty("compat").GetString());

        string ext = dir.File("c.qcow2");
        Assert.Equal(0, Vmsnap("create", ext, "64M", "--extended-l2", "--cluster-size", "16384", "--backing", "a.qcow2", "--backing-format", "qcow2").ExitCode);
        JsonElement info = Qemu.Info(ext);
        Assert.True(info.GetProperty("format-specific").GetProperty("data").GetProperty("extended-l2").GetBoolean());
        Assert.Equal("a.qcow2", info.GetProperty("backing-filename").GetString());
        QemuImgCheck.AssertClean(ext);
    }

    [QemuFact]
    public void Create_refuses_bad_options_in_one_line()
    {
        using var dir = new TempDir();
        AssertOneLineError(Vmsnap("create", dir.File("x.qcow2"), "12345"), 1, "multiple of 512");
        AssertOneLineError(Vmsnap("create", dir.File("x.qcow2"), "64M", "--cluster-size", "1000"), 1, "power of two");
        AssertOneLineError(Vmsnap("create", dir.File("x.qcow2"), "64M", "--refcount-bits", "3"), 1, "refcount");
        AssertOneLineError(Vmsnap("create", dir.File("x.qcow2"), "64M", "--extended-l2", "--cluster-size", "4k"), 1, "16384");
        AssertOneLineError(Vmsnap("create", dir.File("x.qcow2"), "64M", "--backing", "base.raw"), 1, "--backing-format");
        AssertOneLineError(Vmsnap("create", dir.File("x.qcow2"), "64Q"), 1, "size");
        AssertOneLineError(Vmsnap("create", dir.File("x.qcow2"), "64M", "--cluster-size", "4G"), 1, "'4G'", "at most");
        AssertOneLineError(Vmsnap("create", dir.File("x.qcow2"), "79228162514264337593543950335T"), 1, "within range");
        Assert.Equal(2, Vmsnap("create", dir.File("x.qcow2"), "64M", "--compat", "2.0").ExitCode);   // usage error
        Assert.False(File.Exists(dir.File("x.qcow2")));
        AssertOneLineError(Vmsnap("create", dir.File("y.qcow2"), "64M", "--backing", "nope.qcow2", "--backing-format", "qcow2"), 1, "nope.qcow2", "does not exist");
        Assert.False(File.Exists(dir.File("y.qcow2")));

        // A refused create leaves an existing file alone.
        string keep = dir.File("keep.qcow2");
        Qemu.Create(keep, 1 << 20);
        string hash = Qemu.Hash(keep);
        AssertOneLineError(Vmsnap("create", keep, "1000"), 1);
        Assert.Equal(hash, Qemu.Hash(keep));
    }

    [QemuFact]
    public void Info_shows_what_qemu_img_info_shows()
    {
        using var dir = new TempDir();
        string image = dir.File("i.qcow2");
        Qemu.Create(image, 64 << 20, "cluster_size=16k,extended_l2=on,compression_type=zstd");
        Tool.Result r = Vmsnap("info", image);
        Assert.Equal(0, r.ExitCode);
        Assert.Contains("virtual size: 64 MiB (67108864 bytes)", r.Stdout);
        Assert.Contains("cluster_size: 16384", r.Stdout);
        Assert.Contains("compression type: zstd", r.Stdout);
        Assert.Contains("extended l2: true", r.Stdout);

        // The JSON against qemu-img's, key by key, is QemuImgJsonTests' subject; here, the file's length of vmsnap's own.
        JsonElement ours = JsonDocument.Parse(Vmsnap("info", image, "--json").Stdout).RootElement;
        Assert.Equal(Qemu.Info(image).GetProperty("virtual-size").GetInt64(), ours.GetProperty("virtual-size").GetInt64());
        Assert.Equal(new FileInfo(image).Length, ours.GetProperty("file-length").GetInt64());

        AssertOneLineError(Vmsnap("info", dir.File("missing.qcow2")), 1, "missing.qcow2");
        File.WriteAllBytes(dir.File("junk.qcow2"), new byte[4096]);
        AssertOneLineError(Vmsnap("info", dir.File("junk.qcow2")), 1, "magic");
    }

    [QemuFact]
    public void Check_exit_codes_and_json_follow_qemu_img_check()
    {
        using var dir = new TempDir();
        string image = dir.File("k.qcow2");
        Qemu.Create(image, 64 << 20);
        Qemu.Io(image, "write -P 1 0 200k");
        Tool.Result r = Vmsnap("check", image);
        Assert.Equal(0, r.ExitCode);
        Assert.Contains("No errors were found on the image.", r.Stdout);

        // A leaked cluster: the refcount of an extra cluster at the end of the file set to 1.
        using (var f = new FileStream(image, FileMode.Open)) f.SetLength(f.Length + 65536 * 2);
        Vmsnap.Qcow2.Qcow2Header h = Qemu.Header(image);
        long block = (long)Qemu.ReadBE64(image, (long)h.RefcountTableOffset);
        long leaked = new FileInfo(image).Length / 65536 - 1;
        Qemu.WriteRaw(image, block + leaked * 2, new byte[] { 0, 1 });
        r = Vmsnap("check", image, "--json");
        Assert.Equal(3, r.ExitCode);
        JsonElement ours = JsonDocument.Parse(r.Stdout).RootElement;
        (JsonElement theirs, int qemuExit) = QemuImgCheck.Of(image);
        Assert.Equal(qemuExit, r.ExitCode);
        Assert.Equal(QemuImgCheck.Field(theirs, "leaks"), ours.GetProperty("leaks").GetInt64());
        Assert.Equal(QemuImgCheck.Field(theirs, "image-end-offset"), ours.GetProperty("image-end-offset").GetInt64());
        Assert.Equal(QemuImgCheck.Field(theirs, "allocated-clusters"), ours.GetProperty("allocated-clusters").GetInt64());
        Assert.Contains(ours.GetProperty("messages").EnumerateArray(), m => m.GetString()!.StartsWith("Leaked cluster"));

        // A refcount too low: a corruption.
        long dataCluster = (long)(Qemu.ReadBE64(image, (long)(Qemu.ReadBE64(image, (long)h.L1TableOffset) & 0x00ff_ffff_ffff_fe00)) & 0x00ff_ffff_ffff_fe00) / 65536;
        Qemu.WriteRaw(image, block + dataCluster * 2, new byte[] { 0, 0 });
        r = Vmsnap("check", image);
        Assert.Equal(2, r.ExitCode);
        Assert.Equal(2, QemuImgCheck.Of(image).ExitCode);
        Assert.Contains("errors were found on the image", r.Stdout);

        r = Vmsnap("check", image, "--repair", "all");
        Assert.Equal(0, r.ExitCode);
        Assert.Contains("The following inconsistencies were found and repaired", r.Stdout);
        QemuImgCheck.AssertClean(image);
        Assert.Equal(2, Vmsnap("check", image, "--repair", "everything").ExitCode);   // usage error
        AssertOneLineError(Vmsnap("check", dir.File("none.qcow2")), 1);
    }

    [QemuFact]
    public void Read_and_write_move_bytes_between_files_and_guest_offsets()
    {
        using var dir = new TempDir();
        string image = dir.File("rw.qcow2");
        Qemu.Create(image, 64 << 20, "cluster_size=4k");
        byte[] data = new byte[300_001];
        new Random(5).NextBytes(data);
        File.WriteAllBytes(dir.File("in.bin"), data);
        Tool.Result r = Vmsnap("write", image, "12345", "--from", dir.File("in.bin"));
        Assert.Equal(0, r.ExitCode);
        Assert.Contains("wrote 300001/300001 bytes at offset 12345", r.Stdout);
        QemuImgCheck.AssertClean(image);
        Assert.Equal(data, Qemu.ReadRaw(Qemu.ToRaw(image, dir), 12345, data.Length));

        r = Vmsnap("read", image, "12345", "300001", "--to", dir.File("out.bin"), "--json");
        Assert.Equal(0, r.ExitCode);
        Assert.Equal(300001, JsonDocument.Parse(r.Stdout).RootElement.GetProperty("bytes").GetInt64());
        Assert.Equal(data, File.ReadAllBytes(dir.File("out.bin")));

        Assert.Equal(0, Vmsnap("read", image, "1M", "4k", "--to", dir.File("zero.bin")).ExitCode);
        Assert.All(File.ReadAllBytes(dir.File("zero.bin")), b => Assert.Equal(0, b));

        AssertOneLineError(Vmsnap("read", image, "64M", "1", "--to", dir.File("x.bin")), 1, "beyond the virtual disk");
        AssertOneLineError(Vmsnap("write", image, "64M", "--from", dir.File("in.bin")), 1, "beyond the virtual disk");
        AssertOneLineError(Vmsnap("write", image, "0", "--from", dir.File("missing.bin")), 1);
        Assert.Equal(2, Vmsnap("read", image, "0", "1").ExitCode);   // --to is required

        // A read that fails halfway (a damaged L2 entry) leaves an existing target as it was, and no scratch file.
        long l2 = (long)(Qemu.ReadBE64(image, (long)Qemu.Header(image).L1TableOffset) & L1Entry.OffsetMask);
        Qemu.WriteBE64(image, l2 + 8 * 100, L2Entry.Copied | (1UL << 40));   // guest cluster 100 (400 KiB)
        AssertOneLineError(Vmsnap("read", image, "0", "1M", "--to", dir.File("out.bin")), 1, "beyond the end of the file");
        Assert.Equal(data, File.ReadAllBytes(dir.File("out.bin")));
        Assert.Equal(["in.bin", "out.bin", "rw.qcow2", "zero.bin"], Directory.GetFiles(dir.Path).Select(Path.GetFileName).Where(n => !n!.EndsWith(".raw")).Order());
    }

    [Fact]
    public void Demo_runs_without_arguments()
    {
        Tool.Result r = Vmsnap("demo", "--json");
        Assert.True(r.ExitCode == 0, r.Stderr);
        JsonElement json = JsonDocument.Parse(r.Stdout).RootElement;
        Assert.True(json.GetProperty("verified").GetBoolean());
        Assert.True(json.GetProperty("check-clean").GetBoolean());
        Assert.False(File.Exists(json.GetProperty("filename").GetString()));   // the temporary folder is gone
    }
}
