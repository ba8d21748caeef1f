using System.Diagnostics;
using System.Security.Cryptography;
using Vmsnap.Migration;
using Vmsnap.Qcow2;
using Vmsnap.Snapshots;
using Vmsnap.Tests.Interop;
using Vmsnap.Tests.Migration;
using Vmsnap.Tests.Qcow2.Snapshots;
using static Vmsnap.Tests.Snapshots.VmKit;

namespace Vmsnap.Tests.Snapshots;

/// <summary>Images, RAM files and a stream shared by the kill tests, made once (the images once per QEMU version).</summary>
public sealed class KillFixture : IDisposable
{
    public const long Ram = 16 << 20;

    public KillFixture()
    {
        Dir = new TempDir();
        Ram1 = Dir.File("ram1");
        Ram2 = Dir.File("ram2");
        Ram3 = Dir.File("ram3");
        GuestRam.Create(Ram1, Ram, seed: 71);
        GuestRam.Create(Ram2, Ram, seed: 72);
        GuestRam.Create(Ram3, Ram, seed: 73);
        Stream = Dir.File("import.mig");
        using (var profile = MachineProfile.Create("none", [new("ram0", Ram3)]))
            StreamFiles.WriteFile(Stream, w => MigrationStream.Write(w, profile));
    }

    /// <summary>The images of one QEMU version: the template and its leaky copy, made by that version's qemu-img and qemu-io.</summary>
    internal sealed record Images(string Template, string Leaky, string Old1State, string Old2State);

    private readonly System.Collections.Concurrent.ConcurrentDictionary<string, Lazy<Images>> _byVersion = new();

    internal Images For(string version) => _byVersion.GetOrAdd(version, v => new Lazy<Images>(() => Make(v))).Value;

    private Images Make(string version)
    {
        // A disk with data, a save, a disk-only snapshot by qemu-img, more data, another save.
        string template = Dir.File($"template-{version}.qcow2");
        Qcow2.Qemu.Create(template, 256 << 20);
        Qcow2.Qemu.Io(template, "write -P 0x11 0 2M", "write -P 0x12 100M 1M");
        using (var profile = MachineProfile.Create("none", [new("ram0", Ram1)])) VmSnapshots.Save(template, "old1", profile);
        Tool.QemuImg("snapshot", "-c", "disk1", template);
        Qcow2.Qemu.Io(template, "write -P 0x13 1M 2M");
        using (var profile = MachineProfile.Create("none", [new("ram0", Ram2)])) VmSnapshots.Save(template, "old2", profile);
        QemuImgCheck.AssertClean(template);
        string old1State = VmStateHash(template, "old1");
        string old2State = VmStateHash(template, "old2");

        // The same with leaks to repair: three clusters in use get a refcount one too high.
        string leaky = Dir.File($"leaky-{version}.qcow2");
        File.Copy(template, leaky);
        Qcow2Header h = Qcow2.Qemu.Header(leaky);
        long block = (long)(Qcow2.Qemu.ReadBE64(leaky, (long)h.RefcountTableOffset) & ~0x1ffUL);
        foreach (long cluster in new[] { (long)h.L1TableOffset >> h.ClusterBits, (long)h.SnapshotsOffset >> h.ClusterBits, 5L })
        {
            byte[] rc = Qcow2.Qemu.ReadRaw(leaky, block + cluster * 2, 2);
            Qcow2.Qemu.WriteRaw(leaky, block + cluster * 2, [rc[0], (byte)(rc[1] + 1)]);
        }
        Assert.Equal(3, QemuImgCheck.Field(QemuImgCheck.Of(leaky).Json, "leaks"));
        return new Images(template, leaky, old1State, old2State);
    }

    internal TempDir Dir { get; }
    public string Ram1 { get; }
    public string Ram2 { get; }
    public string Ram3 { get; }
    public string Stream { get; }

    /// <summary>SHA-256 of a snapshot's VM state as vmsnap reads it.</summary>
    public static string VmStateHash(string image, string snapshot)
    {
        using var img = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true });
        using Qcow2VmStateArea area = img.OpenVmStateAreaForReading(snapshot);
        byte[] state = new byte[area.Length];
        area.Read(state, 0);
        return Convert.ToHexString(SHA256.HashData(state));
    }

    public void Dispose() => Dir.Dispose();
}

/// <summary>
/// A real <c>vmsnap</c> process (the built tool, run as a child) killed with SIGKILL in the middle
/// of save, import, snapshot create, delete and apply, and check --repair. Kill points are exact:
/// the test's startup hook loaded into the tool (<c>DOTNET_STARTUP_HOOKS</c> and
/// <c>VMSNAP_TEST_HOOK_PAUSE_AT_IO</c>; see <c>KillHook.cs</c>) stops the process before its Nth write, flush or resize of the
/// image, and the test kills it there, for N spread over every such operation of the command.
/// After each kill: <c>qemu-img check</c> finds no error (leaks at most), the older snapshots keep
/// their VM state (read back by vmsnap at every point, loaded by QEMU's <c>-loadvm</c> at some),
/// and the next save reuses the space the killed command left.
/// </summary>
[Trait("Category", "Unit")]
public sealed class KillTests(KillFixture fixture) : IClassFixture<KillFixture>
{
    private const int MaxKillPoints = 10;

    public static TheoryData<string> Commands() => ["save", "import", "snapshot create", "snapshot delete", "snapshot apply", "check --repair all"];

    private string[] Arguments(string command, string image) => command switch
    {
        "save" => ["save", image, "--name", "new", "--machine", "none", "--ram", $"ram0={fixture.Ram3}"],
        "import" => ["import", fixture.Stream, image, "--name", "new"],
        "snapshot create" => ["snapshot", "create", image, "new"],
        "snapshot delete" => ["snapshot", "delete", image, "old2"],
        "snapshot apply" => ["snapshot", "apply", image, "old1"],
        "check --repair all" => ["check", image, "--repair", "all"],
        _ => throw new ArgumentException(command),
    };

    private sealed record Outcome(bool Killed, int ExitCode, string Stderr);

    /// <summary>Runs vmsnap with the hook set to <paramref name="pauseAt"/>; kills it once it says it paused there.</summary>
    private static Outcome RunVmsnap(string[] args, long pauseAt)
    {
        // The managed program whatever VMSNAP_BIN says: the pause comes from a startup hook.
        ProcessStartInfo psi = VmsnapCli.StartInfo(args, VmsnapCli.Managed);
        psi.RedirectStandardError = true;
        psi.RedirectStandardOutput = true;
        psi.Environment["DOTNET_STARTUP_HOOKS"] = typeof(StartupHook).Assembly.Location;
        psi.Environment[StartupHook.PauseVariable] = pauseAt.ToString(System.Globalization.CultureInfo.InvariantCulture);
        using var p = new Process { StartInfo = psi };
        var stderr = new System.Text.StringBuilder();
        using var paused = new ManualResetEventSlim();
        p.ErrorDataReceived += (_, e) =>
        {
            if (e.Data is null) return;
            lock (stderr) stderr.AppendLine(e.Data);
            if (e.Data.StartsWith("vmsnap test hook: paused", StringComparison.Ordinal)) paused.Set();
        };
        p.OutputDataReceived += (_, _) => { };
        Tool.Start(p);
        p.BeginErrorReadLine();
        p.BeginOutputReadLine();
        var exited = Task.Run(() => p.WaitForExit(TimeSpan.FromMinutes(2)));
        int which = WaitHandle.WaitAny([paused.WaitHandle, ((IAsyncResult)exited).AsyncWaitHandle], TimeSpan.FromMinutes(2));
        bool killed = false;
        if (which == 0)
        {
            p.Kill();   // SIGKILL
            killed = true;
        }
        else if (which == WaitHandle.WaitTimeout)
        {
            p.Kill();
            throw new TimeoutException($"vmsnap {string.Join(' ', args)} neither paused at I/O {pauseAt} nor ended");
        }
        p.WaitForExit();
        lock (stderr) return new Outcome(killed, p.ExitCode, stderr.ToString());
    }

    /// <summary>The number of image writes, flushes and resizes the command makes when nothing stops it.</summary>
    private int CountOperations(string command, string source)
    {
        string image = fixture.Dir.File($"count-{Guid.NewGuid():N}.qcow2");
        File.Copy(source, image);
        Outcome run = RunVmsnap(Arguments(command, image), 0);
        Assert.True(run.ExitCode == 0, $"vmsnap {command}: {run.Stderr}");
        string line = run.Stderr.Split('\n').Last(l => l.StartsWith("vmsnap test hook:", StringComparison.Ordinal));
        File.Delete(image);
        return int.Parse(line.Split(' ')[3], System.Globalization.CultureInfo.InvariantCulture);
    }

    [QemuTheory]
    [MemberData(nameof(Commands))]
    public void A_vmsnap_killed_anywhere_in_a_command_leaves_a_clean_image_whose_snapshots_load_and_whose_space_the_next_save_reuses(string command)
    {
        string version = QemuInstall.Current.Version;
        KillFixture.Images images = fixture.For(version);
        string source = command.StartsWith("check", StringComparison.Ordinal) ? images.Leaky : images.Template;
        long sourceLength = new FileInfo(source).Length;
        int total = CountOperations(command, source);
        Assert.InRange(total, 2, 10_000);
        var points = new SortedSet<long>();
        for (int i = 0; i < MaxKillPoints; i++) points.Add(1 + (long)i * (total - 1) / Math.Max(1, MaxKillPoints - 1));
        int qemuLoads = 0;
        long middle = points.ElementAt(points.Count / 2);
        foreach (long k in points)
        {
            string image = fixture.Dir.File($"kill-{version}-{command.Replace(' ', '-')}-{k}.qcow2");
            File.Copy(source, image, overwrite: true);
            Outcome run = RunVmsnap(Arguments(command, image), k);
            string what = $"vmsnap {command} killed before I/O {k} of {total}";
            Assert.True(run.Killed || run.ExitCode == 0, $"{what}: {run.Stderr}");

            (long corruptions, long _, long errors, _, string text) = QemuImgCheck.Of(image);
            Assert.True(corruptions == 0 && errors == 0, $"{what}: qemu-img check: {text}");

            // The older snapshots keep their VM state; QEMU loads them with their RAM (at some points: a boot each).
            string[] tags = SnapshotKit.QemuList(image).Select(r => r.Tag).ToArray();
            Assert.Contains("old1", tags);
            Assert.Contains("disk1", tags);
            if (command != "snapshot delete") Assert.Contains("old2", tags);
            Assert.Equal(images.Old1State, KillFixture.VmStateHash(image, "old1"));
            if (tags.Contains("old2")) Assert.Equal(images.Old2State, KillFixture.VmStateHash(image, "old2"));
            if (k == points.Min || k == middle || k == points.Max)
            {
                AssertQemuLoads(image, "old1", fixture.Ram1, what);
                if (tags.Contains("old2")) AssertQemuLoads(image, "old2", fixture.Ram2, what);
                qemuLoads++;
            }

            // The next save goes into the space the killed command left: the file grows by that save alone.
            string next = tags.Contains("new") ? "next" : "new";
            using (var profile = MachineProfile.Create("none", [new("ram0", fixture.Ram1)])) VmSnapshots.Save(image, next, profile);
            long nextState = SnapshotKit.QemuInfo(image).Single(s => s.Name == next).VmStateSize;
            long length = new FileInfo(image).Length;
            long allowed = sourceLength + (tags.Contains("new") ? 2 * nextState : nextState) + (2 << 20);
            Assert.True(length <= allowed, $"{what}: after the next save the file has {length} bytes, more than {allowed}: the killed command's space was not reused");
            (corruptions, _, errors, _, text) = QemuImgCheck.Of(image);
            Assert.True(corruptions == 0 && errors == 0, $"{what}, then a save: qemu-img check: {text}");
            Assert.Equal(images.Old1State, KillFixture.VmStateHash(image, next));
            File.Delete(image);
        }
        Assert.True(qemuLoads >= 2);
    }

    private static void AssertQemuLoads(string image, string tag, string ram, string what)
    {
        string target = Path.Combine(Path.GetDirectoryName(image)!, $"loaded-{Guid.NewGuid():N}");
        using (var f = File.Create(target)) f.SetLength(KillFixture.Ram);
        QemuLoadvm(QemuVm.MachineNone(target, KillFixture.Ram), image, tag);
        Assert.True(GuestRam.Hash(ram) == GuestRam.Hash(target), $"{what}: QEMU's -loadvm {tag} gives other RAM");
        File.Delete(target);
    }
}
