using System.Text.Json;
using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;
using Vmsnap.Tests.Qcow2;
using Vmsnap.Tests.Qcow2.Snapshots;

namespace Vmsnap.Tests.Cli;

/// <summary>
/// <c>vmsnap snapshot list|create|delete|apply</c> run as the real tool: the listing is what
/// <c>qemu-img snapshot -l</c> prints for the same image (byte for byte on QEMU 7.2, whose table vmsnap
/// prints; row for row and value for value on 10.0, whose table is laid out otherwise); errors are one
/// line; a running QEMU's image is refused for changes and, without --force-share, for inspection too.
/// </summary>
[Trait("Category", "Unit")]
public class SnapshotCommandTests
{
    private static Tool.Result Vmsnap(params string[] args) =>
        VmsnapCli.Run([.. args], TimeSpan.FromMinutes(2));

    private static void AssertOneLineError(Tool.Result r, params string[] words)
    {
        Assert.Equal(1, r.ExitCode);
        string[] lines = r.Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.True(lines.Length == 1, $"stderr should be one line: {r.Stderr}");
        Assert.StartsWith("vmsnap: ", lines[0]);
        foreach (string w in words) Assert.Contains(w, lines[0], StringComparison.OrdinalIgnoreCase);
    }

    [QemuFact]
    public void List_prints_what_qemu_img_snapshot_l_prints_for_every_kind_of_value()
    {
        using var dir = new TempDir();
        string image = dir.File("l.qcow2");
        Qemu.Create(image, 16 << 20);
        Tool.QemuImg("snapshot", "-c", "by-qemu", image);
        // VM-state sizes around every unit switch and rounding case of QEMU's size_to_str
        // ("%0.3g" of binary units, switching at 1000), dates and clocks of every width, icount or not.
        long[] sizes = [0, 1, 999, 1000, 1023, 1024, 1152, 1536, 10_239, 102_400, 1_023_999, 1_048_575, 1 << 20,
            123_456_789, 1_500_000_000, 4L << 30, (1L << 40) + 1, 999_999_999_999_999, 1L << 62, long.MaxValue];
        var dates = new[]
        {
            DateTimeOffset.FromUnixTimeSeconds(0), new DateTimeOffset(2001, 2, 3, 4, 5, 6, 789, TimeSpan.Zero),
            new DateTimeOffset(2024, 7, 1, 23, 59, 59, TimeSpan.Zero), new DateTimeOffset(2106, 2, 7, 6, 28, 15, TimeSpan.Zero),
        };
        long[] clocks = [0, 1_500_000_000, 3_599_999_999_999, 360_000_000_000_000, 5_000_000_000_000_123, long.MaxValue];
        long[] icounts = [-1, 0, 123_456_789_012];
        using (var img = Qcow2Image.Open(image))
        {
            for (int i = 0; i < sizes.Length; i++)
            {
                img.CreateSnapshot($"s{i}", new Qcow2SnapshotCreateOptions
                {
                    VmStateSize = sizes[i], Date = dates[i % dates.Length], VmClock = clocks[i % clocks.Length], Icount = icounts[i % icounts.Length],
                });
            }
            img.CreateSnapshot("ünïcödé-näme");
            img.CreateSnapshot("a-name-longer-than-sixteen-bytes");
        }
        Tool.QemuImg("snapshot", "-c", "by-qemu-too", image);
        Tool.Result ours = Vmsnap("snapshot", "list", image);
        Assert.Equal(0, ours.ExitCode);
        string theirs = Tool.QemuImg("snapshot", "-l", image);
        SnapshotKit.AssertSameListing(theirs, ours.Stdout);

        // The parsed columns are the values vmsnap stored (sizes cut at QEMU's widths aside).
        List<SnapshotRow> rows = SnapshotKit.ParseList(string.Join('\n', theirs.Split('\n').Where(l => !l.Contains("-name") && !l.Contains("nïc"))));
        Assert.Equal(sizes.Length + 2, rows.Count);
        Assert.Equal("1e+03 KiB", rows[1 + Array.IndexOf(sizes, 1_023_999L)].VmSize);   // QEMU's own rounding, reproduced
        Assert.Equal("1.12 KiB", rows[1 + Array.IndexOf(sizes, 1152L)].VmSize);          // 1.125 rounds to even
        Assert.Equal("", rows[1].Icount);
        Assert.Equal("0", rows[0].Icount);
        Assert.Equal(SnapshotKit.ListedClock("00:00:01.500"), rows[2].VmClock);

        JsonElement json = JsonDocument.Parse(Vmsnap("snapshot", "list", image, "--json").Stdout).RootElement;
        JsonElement[] list = json.GetProperty("snapshots").EnumerateArray().ToArray();
        Assert.Equal(sizes.Length + 4, list.Length);
        Assert.Equal(long.MaxValue, list[sizes.Length].GetProperty("vm-state-size").GetInt64());
        Assert.Equal(789_000_000, list[2].GetProperty("date-nsec").GetInt64());
        Assert.False(list[1].TryGetProperty("icount", out _));   // no icount: left out
        Assert.Equal(16 << 20, list[1].GetProperty("disk-size").GetInt64());
        using (var img = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true })) SnapshotKit.AssertSameAsQemuInfo(img.Snapshots, image);

        // No snapshots: qemu-img prints nothing, and so does vmsnap.
        string empty = dir.File("e.qcow2");
        Qemu.Create(empty, 1 << 20);
        Assert.Equal("", Vmsnap("snapshot", "list", empty).Stdout);
        Assert.Equal(Tool.QemuImg("snapshot", "-l", empty), Vmsnap("snapshot", "list", empty).Stdout);
    }

    [QemuFact]
    public void Create_delete_apply_change_the_image_like_qemu_img_snapshot()
    {
        using var dir = new TempDir();
        string image = dir.File("c.qcow2");
        Qemu.Create(image, 8 << 20);
        Qemu.Io(image, "write -P 0x61 0 1M");
        Tool.Result r = Vmsnap("snapshot", "create", image, "one", "--json");
        Assert.Equal(0, r.ExitCode);
        JsonElement created = JsonDocument.Parse(r.Stdout).RootElement;
        Assert.Equal("created", created.GetProperty("action").GetString());
        Assert.Equal("1", created.GetProperty("snapshot").GetProperty("id").GetString());
        string one = Qemu.ToRaw(image, dir, "one");
        Qemu.Io(image, "write -P 0x62 512k 1M");
        r = Vmsnap("snapshot", "create", image, "two");
        Assert.Equal(0, r.ExitCode);
        Assert.Contains("created snapshot 2 'two'", r.Stdout);
        Assert.Equal(["1", "2"], SnapshotKit.QemuList(image).Select(x => x.Id));
        Assert.Equal(["0", "0"], SnapshotKit.QemuList(image).Select(x => x.Icount));   // like qemu-img snapshot -c

        r = Vmsnap("snapshot", "apply", image, "1");   // by ID
        Assert.Equal(0, r.ExitCode);
        Assert.Contains("applied snapshot 1 'one'", r.Stdout);
        QemuImgCheck.AssertClean(image);
        Qemu.AssertSameContent(image, one);

        r = Vmsnap("snapshot", "delete", image, "one", "--json");
        Assert.Equal(0, r.ExitCode);
        Assert.Equal("deleted", JsonDocument.Parse(r.Stdout).RootElement.GetProperty("action").GetString());
        Assert.Equal(["two"], SnapshotKit.QemuList(image).Select(x => x.Tag));
        QemuImgCheck.AssertClean(image);

        AssertOneLineError(Vmsnap("snapshot", "delete", image, "one"), "no snapshot with ID or name 'one'");
        AssertOneLineError(Vmsnap("snapshot", "apply", image, "nope"), "no snapshot");
        AssertOneLineError(Vmsnap("snapshot", "create", image, "two"), "already has a snapshot named 'two'");
        AssertOneLineError(Vmsnap("snapshot", "list", dir.File("missing.qcow2")), "missing.qcow2");
        Assert.Equal(2, Vmsnap("snapshot", "create", image).ExitCode);   // TAG missing: usage error
        Assert.Equal(2, Vmsnap("snapshot", "frobnicate", image).ExitCode);
    }

    [QemuFact]
    public void With_qemu_holding_the_image_changes_are_refused_and_inspection_needs_force_share()
    {
        using var dir = new TempDir();
        string image = dir.File("held.qcow2");
        Qemu.Create(image, 8 << 20);
        Qemu.Io(image, "write -P 0x71 0 64k");
        Tool.QemuImg("snapshot", "-c", "s", image);
        File.WriteAllBytes(dir.File("in.bin"), new byte[4096]);
        string listing = Tool.QemuImg("snapshot", "-l", image);
        using var vm = QemuVm.Start(["-machine", "none", "-drive", $"file={image},if=none,id=d0,format=qcow2"], paused: true);
        string hash = Qemu.Hash(image);

        foreach (string[] change in new[]
        {
            new[] { "write", image, "0", "--from", dir.File("in.bin") },
            ["snapshot", "create", image, "new"],
            ["snapshot", "delete", image, "s"],
            ["snapshot", "apply", image, "s"],
            ["check", image, "--repair", "all"],
            ["check", image, "--repair", "leaks"],
        })
        {
            AssertOneLineError(Vmsnap(change), "in use", "QEMU");
            Assert.True(hash == Qemu.Hash(image), $"{string.Join(' ', change)} changed the image");
        }

        // Inspection fails as qemu-img's does (the running QEMU holds the write permission)...
        Tool.Result qemu = Tool.Run("qemu-img", ["info", image]);
        Assert.NotEqual(0, qemu.ExitCode);
        Assert.Contains("lock", qemu.Stderr);
        foreach (string[] inspect in new[]
        {
            new[] { "info", image },
            ["check", image],
            ["read", image, "0", "4k", "--to", dir.File("out.bin")],
            ["snapshot", "list", image],
        })
            AssertOneLineError(Vmsnap(inspect), "in use");

        // ...and works with --force-share, like qemu-img -U.
        Assert.Equal(0, Vmsnap("info", image, "-U").ExitCode);
        Assert.Equal(0, Vmsnap("check", image, "--force-share").ExitCode);
        Assert.Equal(0, Vmsnap("read", image, "0", "4k", "--to", dir.File("out.bin"), "-U").ExitCode);
        Assert.All(File.ReadAllBytes(dir.File("out.bin")), b => Assert.Equal(0x71, b));
        Tool.Result list = Vmsnap("snapshot", "list", image, "-U");
        Assert.Equal(0, list.ExitCode);
        SnapshotKit.AssertSameListing(listing, list.Stdout);
        AssertOneLineError(Vmsnap("check", image, "-U", "--repair", "all"), "--force-share cannot be used with --repair");
        Assert.Equal(hash, Qemu.Hash(image));
        vm.Quit();
    }
}
