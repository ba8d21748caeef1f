using Vmsnap.Migration;
using Vmsnap.Qcow2;
using Vmsnap.Snapshots;
using Vmsnap.Tests.Interop;
using Vmsnap.Tests.Migration;
using static Vmsnap.Tests.Snapshots.VmKit;

namespace Vmsnap.Tests.Snapshots;

/// <summary>
/// Snapshots and QEMU 10.0 (64 MiB guests): mapped-ram files imported as plain snapshots that QEMU's
/// -loadvm takes, <c>export --mapped-ram</c> restored by <c>migrate-incoming file:</c> with multifd and
/// direct-io, a snapshot laid out as QEMU 10.2's mapped-ram savevm does it, early-setup sections, and
/// streams of a machine type both versions have moving between them.
/// </summary>
[Trait("Category", "Interop")]
public sealed class Qemu10SnapshotTests
{
    public static TheoryData<string, string> ImportCases => new()
    {
        { "none", "mapped-ram,multifd" },
        { "pc", "mapped-ram" },
        { "q35", "mapped-ram,multifd,direct-io" },
    };

    [QemuTheory(Since = "10.0")]
    [MemberData(nameof(ImportCases))]
    public void A_QEMU_mapped_ram_file_imported_is_a_plain_snapshot_that_QEMU_loadvm_restores(string kind, string variant)
    {
        using var dir = new TempDir();
        string machine = Qemu10StreamTests.MachineOf(kind);
        string ram = dir.File("ram0");
        GuestRam.Create(ram, RamBytes, seed: 61);
        string file = dir.File("mapped.mig");
        Qemu10StreamTests.QemuMappedRamFile(machine, ram, file, variant);

        string image = QemuImage(dir);
        VmSnapshotResult imported = VmSnapshots.Import(file, image, "imported");
        Assert.True(imported.Stream.IsMappedRam);
        QemuImgCheck.AssertClean(image);
        Assert.Equal(imported.VmStateBytes, QemuSnapshots(image)["imported"].VmStateSize);
        // Stored as the plain stream savevm writes: no capability left, every page a record.
        MigrationStreamInfo stored = VmSnapshots.Inspect(image, "imported").Stream;
        Assert.Empty(stored.Capabilities);
        Assert.Equal(imported.Stream.RamBlocks.Select(b => b.Pages + b.ZeroPages), stored.RamBlocks.Select(b => b.Pages + b.ZeroPages));

        string target = EmptyRam(dir, "target");
        QemuLoadvm(QemuVm.Machine(machine, target, RamBytes), image, "imported");
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(target));

        // The command line reads the file too: inspect names the capability, load gives the RAM.
        Tool.Result inspect = VmKit.Vmsnap("inspect", file);
        Assert.True(inspect.ExitCode == 0, inspect.Stderr);
        Assert.Contains("capabilities: mapped-ram", inspect.Stdout);
        string loaded = dir.File("loaded");
        Tool.Result load = VmKit.Vmsnap("load", file, "--ram", $"ram0={loaded}");
        Assert.True(load.ExitCode == 0, load.Stderr);
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(loaded));
        Tool.Result stdin = Tool.Run("sh", ["-c", $"cat {file} | {VmsnapCli.Shell} inspect -"]);
        Assert.NotEqual(0, stdin.ExitCode);
        Assert.Contains("placed by file offset", stdin.Stderr);
    }

    [QemuFact]
    public void A_QEMU_10_mapped_ram_file_of_machine_pc_i440fx_7_2_imported_loads_in_both_versions()
    {
        using var dir = new TempDir();
        string ram = dir.File("ram0");
        GuestRam.Create(ram, RamBytes, seed: 62);
        string file = dir.File("mapped.mig");
        using (QemuInstall.Use("10.0"))
            Qemu10StreamTests.QemuMappedRamFile("pc-i440fx-7.2", ram, file, "mapped-ram");

        string image = QemuImage(dir);
        VmSnapshots.Import(file, image, "from10");
        QemuImgCheck.AssertClean(image);
        string target = EmptyRam(dir, "target");
        QemuLoadvm(QemuVm.MachinePc(target, RamBytes, "pc-i440fx-7.2"), image, "from10");
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(target));
    }

    [QemuTheory(Since = "10.0")]
    [InlineData("mapped-ram")]
    [InlineData("mapped-ram,multifd,direct-io")]
    public void Export_mapped_ram_is_restored_by_QEMU_migrate_incoming_file(string incoming)
    {
        using var dir = new TempDir();
        string image = QemuImage(dir);
        // Two snapshots: one vmsnap saved (machine none, zero pages among the RAM), one QEMU's savevm of a current PC.
        string noneRam = dir.File("none-ram0");
        GuestRam.Create(noneRam, RamBytes, seed: 63);
        using (var profile = MachineProfile.Create("none", [new("ram0", noneRam)]))
            VmSnapshots.Save(image, "ours", profile);
        string pcRam = dir.File("pc-ram0");
        GuestRam.Create(pcRam, RamBytes, seed: 64);
        QemuSavevm(QemuVm.MachinePc(pcRam, RamBytes), image, "theirs");

        foreach (var (tag, machine, ram) in new[] { ("ours", "none", noneRam), ("theirs", QemuInstall.Current.PcMachine, pcRam) })
        {
            string file = dir.File(tag + ".mig");
            Tool.Result r = VmKit.Vmsnap("export", image, tag, "-o", file, "--mapped-ram");
            Assert.True(r.ExitCode == 0, $"export --mapped-ram failed: {r.Stderr}");
            MigrationStreamInfo info = VmSnapshots.InspectStream(file);
            Assert.True(info.IsMappedRam);
            Assert.Equal(GuestRam.CountZeroPages(ram), info.RamBlocks.Single(b => b.Id == "ram0").ZeroPages);

            string[] parts = incoming.Split(',');
            var parameters = parts.Contains("direct-io") ? new Dictionary<string, object> { ["direct-io"] = true } : null;
            string target = EmptyRam(dir, "target-" + tag);
            using var vm = QemuVm.Start([.. QemuVm.Machine(machine, target, RamBytes), "-incoming", "defer"], paused: true);
            vm.IncomingFromFileUri(file, parts.Where(p => p != "direct-io").ToArray(), parameters);
            vm.Quit();
            Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(target));
        }
        Tool.Result pipe = VmKit.Vmsnap("export", image, "ours", "-o", "-", "--mapped-ram");
        Assert.NotEqual(0, pipe.ExitCode);
        Assert.Contains("--mapped-ram", pipe.Stderr);
    }

    /// <summary>
    /// Lays a mapped-ram file into a snapshot's VM-state area the way QEMU 10.2's savevm does (offsets relative to the
    /// area, the recorded size being what QEMU counted as transferred: stream bytes, bitmaps and pages with data).
    /// QEMU 10.2 is not in Debian; QEMU 10.0 makes the mapped-ram file and tells its transferred size.
    /// </summary>
    private static void PlaceAsQemu102Snapshot(string image, string file, string name, long vmStateSize)
    {
        using var img = Qcow2Image.Open(image);
        using var area = img.OpenVmStateAreaForWriting();
        byte[] chunk = new byte[64 << 10];
        using (var f = File.OpenRead(file))
        {
            for (long at = 0; ; at += chunk.Length)
            {
                int n = f.Read(chunk);
                if (n == 0) break;
                // Holes stay holes (QEMU writes only the pages with data).
                if (chunk.AsSpan(0, n).ContainsAnyExcept((byte)0)) area.Write(chunk.AsSpan(0, n), at);
            }
        }
        area.Flush();
        img.CreateSnapshot(name, new Qcow2SnapshotCreateOptions { VmStateSize = vmStateSize });
    }

    [QemuFact(Since = "10.0")]
    public void A_snapshot_laid_out_as_QEMU_10_2_mapped_ram_savevm_loads_exports_and_inspects()
    {
        using var dir = new TempDir();
        string ram = dir.File("ram0");
        GuestRam.Create(ram, RamBytes, seed: 65);
        string file = dir.File("mapped.mig");
        string machine = QemuInstall.Current.PcMachine;
        long transferred = Qemu10StreamTests.QemuMappedRamFile(machine, ram, file, "mapped-ram");
        Assert.True(transferred < new FileInfo(file).Length, "the layout reaches past what QEMU wrote");

        string image = QemuImage(dir);
        PlaceAsQemu102Snapshot(image, file, "mr", transferred);
        QemuImgCheck.AssertClean(image);
        Assert.Equal(transferred, QemuSnapshots(image)["mr"].VmStateSize);

        MigrationStreamInfo info = VmSnapshots.Inspect(image, "mr").Stream;
        Assert.True(info.IsMappedRam);
        Assert.Equal(machine, info.MachineType);
        Assert.Equal(new FileInfo(file).Length, info.TotalBytes);
        Assert.Equal(VmSnapshots.InspectStream(file).RamBlocks, info.RamBlocks);

        string loaded = dir.File("loaded");
        VmSnapshots.Load(image, "mr", [new("ram0", loaded)]);
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(loaded));

        // Exported as a plain stream, QEMU -incoming takes it.
        string plain = dir.File("plain.mig");
        VmSnapshots.Export(image, "mr", plain);
        Assert.Empty(VmSnapshots.InspectStream(plain).Capabilities);
        string target = EmptyRam(dir, "target");
        QemuVm.LoadStream(QemuVm.MachinePc(target, RamBytes), plain);
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(target));

        // Exported as a mapped-ram file again: migrate-incoming file: with multifd and direct-io takes it.
        string mapped = dir.File("again.mig");
        VmSnapshots.Export(image, "mr", mapped, new VmSnapshotOptions { MappedRam = true });
        string target2 = EmptyRam(dir, "target2");
        using (var vm = QemuVm.Start([.. QemuVm.MachinePc(target2, RamBytes), "-incoming", "defer"], paused: true))
        {
            vm.IncomingFromFileUri(mapped, ["mapped-ram", "multifd"], new Dictionary<string, object> { ["direct-io"] = true });
            vm.Quit();
        }
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(target2));

        // Imported from the snapshot's own export, it becomes a plain snapshot the QEMU at hand loads.
        VmSnapshots.Import(mapped, image, "plain");
        string target3 = EmptyRam(dir, "target3");
        QemuLoadvm(QemuVm.MachinePc(target3, RamBytes), image, "plain");
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(target3));
    }

    [QemuFact(Since = "10.0")]
    public void A_stream_with_an_early_setup_section_imported_loads_with_loadvm_and_QEMUs_own_savevm_of_it_loads_in_vmsnap()
    {
        using var dir = new TempDir();
        string ram = dir.File("ram0");
        GuestRam.Create(ram, RamBytes, seed: 66);
        string stream = dir.File("vmem.mig");
        string image = QemuImage(dir);
        using (var vm = QemuVm.Start([.. QemuVm.MachinePc(ram, RamBytes), .. Qemu10StreamTests.VirtioMem], paused: true))
        {
            vm.MigrateToFile(stream);
            vm.Quit();
        }
        // The same guest's own savevm, beside it.
        QemuSavevm([.. QemuVm.MachinePc(ram, RamBytes), .. Qemu10StreamTests.VirtioMem], image, "qemu");
        VmSnapshotResult imported = VmSnapshots.Import(stream, image, "imported");
        Assert.Contains(imported.Stream.Sections, s => s.Kind == MigrationSectionKind.EarlySetup);
        QemuImgCheck.AssertClean(image);
        string target = EmptyRam(dir, "target");
        QemuLoadvm([.. QemuVm.MachinePc(target, RamBytes), .. Qemu10StreamTests.VirtioMem], image, "imported");
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(target));

        MigrationStreamInfo theirs = VmSnapshots.Inspect(image, "qemu").Stream;
        Assert.Contains(theirs.Sections, s => s.Kind == MigrationSectionKind.EarlySetup);
        Assert.Null(theirs.DeviceStateProblem);
        string exported = dir.File("exported.mig");
        VmSnapshots.Export(image, "qemu", exported);
        string target2 = EmptyRam(dir, "target2");
        QemuVm.LoadStream([.. QemuVm.MachinePc(target2, RamBytes), .. Qemu10StreamTests.VirtioMem], exported);
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(target2));
    }

    [QemuFact]
    public void A_pc_i440fx_7_2_template_of_the_other_version_saved_by_vmsnap_loads_in_this_one()
    {
        string version = QemuInstall.Current.Version;
        // The machine type both versions have: a template from QEMU 10 (machine pc-i440fx-7.2) loads in 7.2, one
        // from 7.2 in 10.0, once vmsnap wrote new RAM into it.
        using var dir = new TempDir();
        string other = QemuInstall.All.Single(i => i.Version != version).Version;
        string templateRam = dir.File("template-ram");
        GuestRam.Create(templateRam, RamBytes, seed: 67);
        string template = dir.File("template.mig");
        using (QemuInstall.Use(other))
            QemuVm.SaveStream(QemuVm.MachinePc(templateRam, RamBytes, "pc-i440fx-7.2"), template);

        string ram = dir.File("ram0");
        GuestRam.Create(ram, RamBytes, seed: 68);
        string image = QemuImage(dir);
        using (var profile = MachineProfile.FromTemplate(template, [new("ram0", ram)], dir.Path))
            VmSnapshots.Save(image, "saved", profile);
        QemuImgCheck.AssertClean(image);
        string target = EmptyRam(dir, "target");
        QemuLoadvm(QemuVm.MachinePc(target, RamBytes, "pc-i440fx-7.2"), image, "saved");
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(target));
    }

    [QemuFact(Since = "10.0")]
    public void QEMU_10_savevm_writes_SWITCHOVER_START_for_current_machine_types_only_and_its_loadvm_needs_none()
    {
        // Measured (QEMU 10.0.2), against what the issue expected: savevm sends the command as migrate does, for
        // machine types 10.0+ (and none), not for older ones. A snapshot without it (vmsnap's save of machine none)
        // loads in QEMU 10 all the same, as the save tests show; with it (QEMU's own) vmsnap loads and exports it.
        using var dir = new TempDir();
        string ram = dir.File("ram0");
        GuestRam.Create(ram, RamBytes, seed: 69);
        string image = QemuImage(dir);
        QemuSavevm(QemuVm.MachinePc(ram, RamBytes), image, "current");
        QemuSavevm(QemuVm.MachinePc(ram, RamBytes, "pc-i440fx-7.2"), image, "old");
        Assert.Contains(VmSnapshots.Inspect(image, "current").Stream.Sections, s => s.Kind == MigrationSectionKind.Command && s.Id == 11);
        Assert.DoesNotContain(VmSnapshots.Inspect(image, "old").Stream.Sections, s => s.Kind == MigrationSectionKind.Command);

        string exported = dir.File("current.mig");
        VmSnapshots.Export(image, "current", exported);
        string target = EmptyRam(dir, "target");
        QemuVm.LoadStream(QemuVm.MachinePc(target, RamBytes), exported);
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(target));
    }
}
