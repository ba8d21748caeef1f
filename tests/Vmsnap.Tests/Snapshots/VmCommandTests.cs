using System.Diagnostics;
using System.Text.Json;
using Vmsnap.Tests.Interop;
using Vmsnap.Tests.Migration;
using static Vmsnap.Tests.Snapshots.VmKit;

namespace Vmsnap.Tests.Snapshots;

/// <summary>save, load, import, export, inspect as the real tool: refusals are one line, exit non-zero, and leave files as they were.</summary>
[Trait("Category", "Unit")]
public class VmCommandTests(QemuStreams streams) : IClassFixture<QemuStreams>
{
    private static string Hash(string path) => GuestRam.Hash(path);

    [QemuFact]
    public void Save_refuses_wrong_arguments_without_touching_the_image()
    {
        VersionStreams qemu = streams.ForCurrent();
        using var dir = new TempDir();
        string ram = dir.File("ram0");
        GuestRam.Create(ram, RamBytes, seed: 41);
        string image = QemuImage(dir);
        VmsnapJson("save", image, "--name", "a", "--machine", "none", "--ram", $"ram0={ram}", "--json");
        string before = Hash(image);

        VmsnapFails(["save", image, "--name", "a", "--machine", "none", "--ram", $"ram0={ram}"], "already has a snapshot named 'a'");
        VmsnapFails(["save", image, "--name", "1", "--machine", "none", "--ram", $"ram0={ram}"], "with ID '1'", "named 'a'");
        VmsnapFails(["save", image, "--name", "b", "--ram", $"ram0={ram}"], "--machine", "--template");
        VmsnapFails(["save", image, "--name", "b", "--machine", "none", "--template", qemu.PcStream, "--ram", $"ram0={ram}"], "either");
        VmsnapFails(["save", image, "--name", "b", "--machine", "none", "--ram", ram], "ID=FILE");
        VmsnapFails(["save", image, "--name", "b", "--machine", "none", "--ram", $"ram0={dir.File("missing")}"], "missing");
        VmsnapFails(["save", image, "--name", "b", "--machine", "none", "--ram", $"ram0={ram}", "--ram", $"ram0={ram}"], "twice");
        VmsnapFails(["save", image, "--name", "b", "--machine", "none", "--ram", $"ram0={ram}", "--mode", "fast"], "fast");
        VmsnapFails(["save", image, "--name", "b", "--machine", "none", "--ram", $"ram0={ram}", "--buffer-size", "4G"], "4G", "at most");
        VmsnapFails(["save", dir.File("nope.qcow2"), "--name", "b", "--machine", "none", "--ram", $"ram0={ram}"], "nope.qcow2");

        // A template's block must be replaced by a file of exactly its length.
        string shortRam = dir.File("short");
        GuestRam.Create(shortRam, RamBytes / 2, seed: 42);
        VmsnapFails(["save", image, "--name", "b", "--template", qemu.PcStream, "--ram", $"ram0={shortRam}"], "ram0");
        VmsnapFails(["save", image, "--name", "b", "--template", qemu.PcStream, "--ram", $"nosuchblock={ram}"], "nosuchblock");

        Assert.Equal(before, Hash(image));
        Assert.Equal(["a"], QemuSnapshots(image).Keys);
    }

    [QemuFact]
    public void Load_refuses_what_it_cannot_do_and_creates_no_file()
    {
        VersionStreams qemu = streams.ForCurrent();
        using var dir = new TempDir();
        string image = QemuImage(dir);
        VmsnapJson("import", qemu.NoneStream, image, "--name", "vm", "--json");
        Tool.QemuImg("snapshot", "-c", "diskonly", image);
        string before = Hash(image);
        string target = dir.File("out");

        VmsnapFails(["load", image, "nosuch", "--ram", $"ram0={target}"], "nosuch");
        VmsnapFails(["load", image, "diskonly", "--ram", $"ram0={target}"], "no VM state");
        VmsnapFails(["load", image, "vm", "--ram", $"other={target}"], "other");
        VmsnapFails(["load", image, "vm"], "--ram");
        Assert.False(File.Exists(target));
        Assert.DoesNotContain(Directory.GetFiles(dir.Path), f => f.Contains("out"));
        Assert.Equal(before, Hash(image));

        // By ID works as well as by name.
        string id = QemuSnapshots(image)["vm"].Id;
        VmsnapJson("load", image, id, "--ram", $"ram0={target}", "--json");
        Assert.Equal(Hash(qemu.NoneRam), Hash(target));
    }

    [QemuFact]
    public void Load_of_a_truncated_stream_leaves_an_existing_ram_file_as_it_was_and_in_place_loads_into_the_open_file()
    {
        VersionStreams qemu = streams.ForCurrent();
        using var dir = new TempDir();
        string truncated = dir.File("truncated");
        byte[] stream = File.ReadAllBytes(qemu.NoneStream);
        File.WriteAllBytes(truncated, stream[..(stream.Length * 2 / 3)]);
        string target = dir.File("ram0");
        GuestRam.Create(target, new FileInfo(qemu.NoneRam).Length, seed: 43);
        string before = Hash(target);

        VmsnapFails(["load", truncated, "--ram", $"ram0={target}"], "migration stream offset", "ends");
        Assert.Equal(before, Hash(target));
        Assert.Equal(["ram0", "truncated"], Directory.GetFiles(dir.Path).Select(Path.GetFileName).Order());

        // --in-place writes the file a process holds open (QEMU's memory-backend-file with share=on): it sees the RAM.
        using var held = new FileStream(target, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
        VmsnapJson("load", qemu.NoneStream, "--ram", $"ram0={target}", "--in-place", "--json");
        Assert.Equal(Hash(qemu.NoneRam), GuestRam.Hash(held));
    }

    [QemuFact]
    public void A_damaged_stream_is_refused_by_import_with_its_offset_leaving_no_snapshot_and_no_leak()
    {
        VersionStreams qemu = streams.ForCurrent();
        using var dir = new TempDir();
        string image = QemuImage(dir);
        VmsnapJson("import", qemu.NoneStream, image, "--name", "good", "--json");
        byte[] stream = File.ReadAllBytes(qemu.NoneStream);
        string truncated = dir.File("truncated.mig");
        File.WriteAllBytes(truncated, stream.AsSpan(0, stream.Length / 2).ToArray());
        VmsnapFails(["import", truncated, image, "--name", "bad"], "offset");
        string garbage = dir.File("garbage.mig");
        File.WriteAllBytes(garbage, new byte[4096]);
        VmsnapFails(["import", garbage, image, "--name", "bad"], "offset 0");
        Assert.Equal(["good"], QemuSnapshots(image).Keys);
        QemuImgCheck.AssertClean(image);
    }

    [QemuTheory]
    [InlineData(true)]
    [InlineData(false)] // the writer stalls: vmsnap waits in a read that only the signal ends
    public async Task An_import_stopped_by_a_termination_signal_frees_what_it_wrote_and_says_so(bool writerGoesOn)
    {
        using var dir = new TempDir();
        string image = QemuImage(dir);
        string ram = dir.File("ram0");
        GuestRam.Create(ram, 128 << 20, seed: 44);
        string stream = dir.File("s.mig");
        using (var profile = Vmsnap.Migration.MachineProfile.Create("none", [new("ram0", ram)]))
            StreamFiles.WriteFile(stream, w => Vmsnap.Migration.MigrationStream.Write(w, profile));
        byte[] bytes = File.ReadAllBytes(stream);
        long imageBefore = new FileInfo(image).Length;

        // The stream comes through a pipe the test feeds: a quarter, the signal once vmsnap writes, then the rest.
        ProcessStartInfo psi = VmsnapCli.StartInfo(["import", "-", image, "--name", "cut"]);
        psi.RedirectStandardInput = true;
        psi.RedirectStandardOutput = true;
        psi.RedirectStandardError = true;
        using var p = Tool.Start(psi);
        var stderr = p.StandardError.ReadToEndAsync();
        var stdout = p.StandardOutput.ReadToEndAsync();
        Stream input = p.StandardInput.BaseStream;
        input.Write(bytes, 0, bytes.Length / 4);
        input.Flush();
        var clock = Stopwatch.StartNew();
        while (new FileInfo(image).Length < imageBefore + (16 << 20) && !p.HasExited && clock.Elapsed < TimeSpan.FromSeconds(60)) Thread.Sleep(20);
        if (p.HasExited) Assert.Fail($"vmsnap import ended early: {await stderr}");
        Tool.Check("kill", "-TERM", p.Id.ToString(System.Globalization.CultureInfo.InvariantCulture));
        if (!writerGoesOn)
        {
            // Far below the 60 s grace after which the process would end without its cleanup.
            bool stopped = p.WaitForExit(TimeSpan.FromSeconds(20));
            input.Close();
            Assert.True(stopped, "vmsnap import blocked on a stalled pipe did not stop on SIGTERM");
        }
        try
        {
            for (int at = bytes.Length / 4; writerGoesOn && at < bytes.Length; at += 1 << 20)
            {
                input.Write(bytes, at, Math.Min(1 << 20, bytes.Length - at));
                Thread.Sleep(5);
            }
            input.Close();
        }
        catch (IOException)
        {
            // vmsnap stopped reading: the pipe is closed.
        }
        Assert.True(p.WaitForExit(TimeSpan.FromSeconds(60)), "vmsnap import did not stop");
        p.WaitForExit();
        string errors = await stderr, output = await stdout;
        Assert.True(p.ExitCode == 143, $"exit code {p.ExitCode}: {errors}{output}");   // 128 + SIGTERM, as shells expect
        Assert.Equal("vmsnap: cancelled by SIGTERM", errors.Trim());
        Assert.Empty(QemuSnapshots(image));
        QemuImgCheck.AssertClean(image);
    }

    [QemuFact]
    public void Export_and_inspect_refuse_what_they_cannot_do()
    {
        VersionStreams qemu = streams.ForCurrent();
        using var dir = new TempDir();
        string image = QemuImage(dir);
        VmsnapJson("import", qemu.NoneStream, image, "--name", "vm", "--json");
        VmsnapFails(["export", image, "nosuch", "-o", dir.File("x.mig")], "nosuch");
        Assert.False(File.Exists(dir.File("x.mig")));
        VmsnapFails(["inspect", image], "qcow2 image", "TAG");
        VmsnapFails(["inspect", dir.File("missing.mig")], "missing.mig");

        // Inspect of the image's snapshot and of the stream itself agree.
        JsonElement a = VmsnapJson("inspect", image, "vm", "--json").GetProperty("stream");
        JsonElement b = VmsnapJson("inspect", qemu.NoneStream, "--json").GetProperty("stream");
        Assert.Equal(b.GetProperty("total-bytes").GetInt64(), a.GetProperty("total-bytes").GetInt64());
        Assert.Equal(b.GetProperty("ram-blocks").ToString(), a.GetProperty("ram-blocks").ToString());
        Assert.Equal(qemu.NoneZeroPages, a.GetProperty("ram-blocks")[0].GetProperty("zero-pages").GetInt64());

        Tool.Result text = VmKit.Vmsnap("inspect", image, "vm");
        Assert.Equal(0, text.ExitCode);
        Assert.Contains("machine: none", text.Stdout);
        Assert.Contains("ram0", text.Stdout);
    }

    [QemuFact]
    public void With_QEMU_holding_the_image_save_import_and_load_without_force_share_fail_and_change_nothing()
    {
        VersionStreams qemu = streams.ForCurrent();
        using var dir = new TempDir();
        string image = QemuImage(dir);
        VmsnapJson("import", qemu.NoneStream, image, "--name", "vm", "--json");
        string before = Hash(image);
        string holderRam = dir.File("holder-ram");
        GuestRam.Create(holderRam, RamBytes, seed: 43);
        using (var vm = QemuVm.Start([.. QemuVm.MachineNone(holderRam, RamBytes), .. Drive(image)], paused: true))
        {
            VmsnapFails(["save", image, "--name", "x", "--machine", "none", "--ram", $"ram0={qemu.NoneRam}"], "in use");
            VmsnapFails(["import", qemu.NoneStream, image, "--name", "x"], "in use");
            VmsnapFails(["load", image, "vm", "--ram", $"ram0={dir.File("out")}"], "in use");
            // Read-only with --force-share is fine while QEMU has it.
            VmsnapJson("load", image, "vm", "--ram", $"ram0={dir.File("out")}", "--force-share", "--json");
            Assert.Equal(Hash(qemu.NoneRam), Hash(dir.File("out")));
            vm.Quit();
        }
        Assert.Equal(before, Hash(image));
    }

    [QemuFact]
    public void Save_and_load_fall_back_from_O_DIRECT_where_the_file_system_has_none()
    {
        VersionStreams qemu = streams.ForCurrent();
        // tmpfs refuses O_DIRECT; save, load and export must still work there, through the page cache.
        Assert.True(Directory.Exists("/dev/shm"), "this test needs /dev/shm (tmpfs)");
        string dir = Path.Combine("/dev/shm", "vmsnap-test-" + Guid.NewGuid().ToString("N")[..8]);
        Directory.CreateDirectory(dir);
        try
        {
            string image = Path.Combine(dir, "vm.qcow2");
            VmsnapJson("create", image, "1G", "--json");
            VmsnapJson("save", image, "--name", "s", "--machine", "none", "--ram", $"ram0={qemu.NoneRam}", "--json");
            string loaded = Path.Combine(dir, "loaded");
            VmsnapJson("load", image, "s", "--ram", $"ram0={loaded}", "--json");
            Assert.Equal(Hash(qemu.NoneRam), Hash(loaded));
            string exported = Path.Combine(dir, "s.mig");
            VmsnapJson("export", image, "s", "-o", exported, "--json");
            QemuImgCheck.AssertClean(image);
            string target = dir + "/target";
            using (var f = File.Create(target)) f.SetLength(QemuStreams.RamBytes);
            QemuVm.LoadStream(QemuVm.MachineNone(target, QemuStreams.RamBytes), exported);
            Assert.Equal(Hash(qemu.NoneRam), Hash(target));
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }
}
