using System.Text.Json;
using Vmsnap.Migration;
using Vmsnap.Snapshots;
using Vmsnap.Tests.Interop;
using Vmsnap.Tests.Migration;
using Vmsnap.VmState;
using Vmsnap.Tests.VmState;
using static Vmsnap.Tests.Snapshots.VmKit;

namespace Vmsnap.Tests.Snapshots;

/// <summary>
/// Save and load against real QEMU 7.2 and 10.0, both directions: what QEMU saves, vmsnap loads; what vmsnap
/// saves, QEMU's -loadvm restores; streams move between migrate/-incoming and snapshots through import/export.
/// </summary>
[Trait("Category", "Unit")]
public class SaveLoadQemuTests(QemuStreams streams) : IClassFixture<QemuStreams>
{
    /// <summary>Machine kinds: <c>none</c>, and this version's current i440FX and Q35 types (<c>pc-i440fx-10.0</c>, <c>pc-q35-10.0</c>).</summary>
    internal static string MachineOf(string kind) => kind switch
    {
        "pc" => QemuInstall.Current.PcMachine,
        "q35" => QemuInstall.Current.Q35Machine,
        _ => kind,
    };

    [QemuTheory]
    [InlineData("none")]
    [InlineData("pc")]
    [InlineData("q35")]
    public void QEMU_savevm_then_vmsnap_load_gives_the_original_RAM(string kind)
    {
        using var dir = new TempDir();
        string ram = dir.File("ram0");
        GuestRam.Create(ram, RamBytes, seed: 31);
        string image = QemuImage(dir);
        QemuSavevm(QemuVm.Machine(MachineOf(kind), ram, RamBytes), image, "qemu1");

        string loaded = dir.File("loaded");
        JsonElement r = VmsnapJson("load", image, "qemu1", "--ram", $"ram0={loaded}", "--json");
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(loaded));
        if (kind != "none") return;   // a PC has more RAM blocks (BIOS, ROMs) than ram0
        Assert.Equal(RamBytes, r.GetProperty("ram-size").GetInt64());
        Assert.Equal(QemuSnapshots(image)["qemu1"].VmStateSize, r.GetProperty("vm-state-size").GetInt64());
        Assert.Equal(GuestRam.CountZeroPages(ram), r.GetProperty("zero-pages").GetInt64());
    }

    [QemuTheory]
    [InlineData("buffered")]
    [InlineData("gather")]
    public void vmsnap_save_then_QEMU_loadvm_restores_the_RAM(string mode)
    {
        using var dir = new TempDir();
        string ram = dir.File("ram0");
        GuestRam.Create(ram, RamBytes, seed: 32);
        string image = dir.File("vm.qcow2");
        VmsnapJson("create", image, "1G", "--json");
        Qcow2.Qemu.Io(image, "write -P 0x5a 0 1M");   // some disk content as well

        JsonElement r = VmsnapJson("save", image, "--name", "ours", "--machine", "none", "--ram", $"ram0={ram}", "--mode", mode, "--json");
        Assert.Equal(mode, r.GetProperty("mode").GetString());
        long vmState = r.GetProperty("vm-state-size").GetInt64();

        QemuImgCheck.AssertClean(image);
        var listed = QemuSnapshots(image);
        Assert.Equal(vmState, listed["ours"].VmStateSize);
        Assert.Equal(r.GetProperty("snapshot").GetProperty("id").GetString(), listed["ours"].Id);
        Assert.Contains("ours", Tool.QemuImg("snapshot", "-l", image));

        string target = EmptyRam(dir, "target");
        QemuLoadvm(QemuVm.MachineNone(target, RamBytes), image, "ours");
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(target));

        // A second save of the same guest goes into fresh clusters and leaves the first one as it was.
        string ram2 = dir.File("ram1");
        GuestRam.Create(ram2, RamBytes, seed: 33);
        VmsnapJson("save", image, "--name", "ours2", "--machine", "none", "--ram", $"ram0={ram2}", "--mode", mode, "--json");
        QemuImgCheck.AssertClean(image);
        string target2 = EmptyRam(dir, "target2");
        QemuLoadvm(QemuVm.MachineNone(target2, RamBytes), image, "ours2");
        Assert.Equal(GuestRam.Hash(ram2), GuestRam.Hash(target2));
        string target1 = EmptyRam(dir, "target1");
        QemuLoadvm(QemuVm.MachineNone(target1, RamBytes), image, "ours");
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(target1));
    }

    [QemuFact]
    public void A_QEMU_migration_stream_imported_loads_with_loadvm_and_exported_loads_with_incoming()
    {
        VersionStreams qemu = streams.ForCurrent();
        using var dir = new TempDir();
        string image = QemuImage(dir);
        JsonElement imported = VmsnapJson("import", qemu.NoneStream, image, "--name", "imported", "--json");
        Assert.Equal(new FileInfo(qemu.NoneStream).Length, imported.GetProperty("vm-state-size").GetInt64());
        QemuImgCheck.AssertClean(image);

        string target = EmptyRam(dir, "target");
        QemuLoadvm(QemuVm.MachineNone(target, QemuStreams.RamBytes), image, "imported");
        Assert.Equal(GuestRam.Hash(qemu.NoneRam), GuestRam.Hash(target));

        // Export gives back the very bytes imported, and QEMU takes them with -incoming.
        string exported = dir.File("exported.mig");
        VmsnapJson("export", image, "imported", "-o", exported, "--json");
        Assert.Equal(File.ReadAllBytes(qemu.NoneStream), File.ReadAllBytes(exported));
        string target2 = EmptyRam(dir, "target2");
        QemuVm.LoadStream([.. QemuVm.MachineNone(target2, QemuStreams.RamBytes)], exported);
        Assert.Equal(GuestRam.Hash(qemu.NoneRam), GuestRam.Hash(target2));
    }

    [QemuFact]
    public void Export_of_a_QEMU_savevm_snapshot_loads_with_incoming_and_pipes_work_both_ways()
    {
        using var dir = new TempDir();
        string ram = dir.File("ram0");
        GuestRam.Create(ram, RamBytes, seed: 34);
        string image = QemuImage(dir);
        QemuSavevm(QemuVm.MachineNone(ram, RamBytes), image, "qs");

        // Export to stdout, import from stdin, through shell pipes.
        string vmsnap = VmsnapCli.Shell;
        string piped = dir.File("piped.mig");
        Tool.Check("sh", "-c", $"{vmsnap} export {image} qs -o - > {piped}");
        string target = EmptyRam(dir, "target");
        QemuVm.LoadStream([.. QemuVm.MachineNone(target, RamBytes)], piped);
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(target));

        string image2 = QemuImage(dir, "second.qcow2");
        Tool.Check("sh", "-c", $"cat {piped} | {vmsnap} import - {image2} --name fromstdin");
        QemuImgCheck.AssertClean(image2);
        string target2 = EmptyRam(dir, "target2");
        QemuLoadvm(QemuVm.MachineNone(target2, RamBytes), image2, "fromstdin");
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(target2));
    }

    [QemuFact]
    public void A_pc_machine_template_saved_with_new_ram0_is_restored_by_QEMU_pc()
    {
        VersionStreams qemu = streams.ForCurrent();
        using var dir = new TempDir();
        JsonElement inspected = VmsnapJson("inspect", qemu.PcStream, "--json").GetProperty("stream");
        var blocks = inspected.GetProperty("ram-blocks").EnumerateArray().Select(b => b.GetProperty("id").GetString()).ToList();
        Assert.Equal(6, blocks.Count);
        Assert.Contains("ram0", blocks);
        Assert.Contains("pc.bios", blocks);
        var devices = inspected.GetProperty("devices").EnumerateArray().Select(d => d.GetProperty("name").GetString()).ToList();
        Assert.Contains("timer", devices);
        Assert.True(devices.Count > 10, $"a PC has many devices, got {devices.Count}");
        Assert.StartsWith("pc-i440fx", inspected.GetProperty("machine-type").GetString());

        string newRam = dir.File("new-ram0");
        GuestRam.Create(newRam, QemuStreams.RamBytes, seed: 35);
        string image = QemuImage(dir);
        VmsnapJson("save", image, "--name", "pc1", "--template", qemu.PcStream, "--ram", $"ram0={newRam}", "--json");
        QemuImgCheck.AssertClean(image);

        // Inspecting the snapshot shows the template's machine and devices.
        JsonElement fromImage = VmsnapJson("inspect", image, "pc1", "--json").GetProperty("stream");
        Assert.Equal(inspected.GetProperty("machine-type").GetString(), fromImage.GetProperty("machine-type").GetString());
        Assert.Equal(devices, fromImage.GetProperty("devices").EnumerateArray().Select(d => d.GetProperty("name").GetString()).ToList());

        string target = EmptyRam(dir, "target", QemuStreams.RamBytes);
        QemuLoadvm(QemuVm.MachinePc(target, QemuStreams.RamBytes), image, "pc1");
        Assert.Equal(GuestRam.Hash(newRam), GuestRam.Hash(target));
    }

    [QemuTheory]
    [InlineData(3, false, 5)]        // EIO, thrown at once, early
    [InlineData(20, true, 28)]       // ENOSPC, reported by the write's completion, later
    public void A_save_failing_midway_leaves_no_snapshot_no_leak_and_the_older_snapshots_loadable(int failAt, bool async, int errno)
    {
        using var dir = new TempDir();
        string ram = dir.File("ram0");
        GuestRam.Create(ram, RamBytes, seed: 36);
        string image = QemuImage(dir);
        QemuSavevm(QemuVm.MachineNone(ram, RamBytes), image, "older");
        VmsnapJson("save", image, "--name", "ours", "--machine", "none", "--ram", $"ram0={ram}", "--json");

        string ram2 = dir.File("ram1");
        GuestRam.Create(ram2, RamBytes, seed: 37);
        using (var profile = MachineProfile.Create("none", [new("ram0", ram2)]))
        {
            var e = Assert.ThrowsAny<VmsnapException>(() => TestHooks.SaveThrough(image, "failed", profile, new VmSnapshotOptions(),
                inner => new FaultInjectingBackend(inner) { FailAtWrite = failAt, FailAsynchronously = async, FailureErrno = errno }));
            Assert.Contains("writ", e.Message, StringComparison.OrdinalIgnoreCase);
        }
        Assert.Equal(["older", "ours"], QemuSnapshots(image).Keys.Order());
        QemuImgCheck.AssertClean(image);

        foreach (string tag in new[] { "older", "ours" })
        {
            string target = EmptyRam(dir, "target-" + tag);
            QemuLoadvm(QemuVm.MachineNone(target, RamBytes), image, tag);
            Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(target));
        }
    }

    [QemuFact]
    public void A_cancelled_save_leaves_no_snapshot_and_no_leak()
    {
        using var dir = new TempDir();
        string ram = dir.File("ram0");
        GuestRam.Create(ram, RamBytes, seed: 38);
        string image = QemuImage(dir);
        VmsnapJson("save", image, "--name", "kept", "--machine", "none", "--ram", $"ram0={ram}", "--json");

        using var cancel = new CancellationTokenSource();
        var progress = new SynchronousProgress(done => { if (done > RamBytes / 3) cancel.Cancel(); });
        using (var profile = MachineProfile.Create("none", [new("ram0", ram)]))
            Assert.ThrowsAny<OperationCanceledException>(() =>
                VmSnapshots.Save(image, "cancelled", profile, new VmSnapshotOptions { BufferCount = 2 }, progress, cancel.Token));
        Assert.Equal(["kept"], QemuSnapshots(image).Keys);
        QemuImgCheck.AssertClean(image);
    }

    [QemuFact]
    public void Export_to_a_file_works_beside_a_scratch_file_a_killed_export_left_and_leaves_none_of_its_own()
    {
        VersionStreams qemu = streams.ForCurrent();
        using var dir = new TempDir();
        string image = QemuImage(dir);
        VmsnapJson("import", qemu.NoneStream, image, "--name", "vm", "--json");
        // What an export killed in this same process ID (a container's, say) left behind.
        string stale = dir.File($".out.mig.vmsnap-{Environment.ProcessId}.tmp");
        File.WriteAllText(stale, "left over");
        string output = dir.File("out.mig");
        VmSnapshots.Export(image, "vm", output);
        Assert.Equal(File.ReadAllBytes(qemu.NoneStream), File.ReadAllBytes(output));
        Assert.Equal([Path.GetFileName(stale), "out.mig", "vm.qcow2"], Directory.GetFiles(dir.Path).Select(Path.GetFileName).Order(StringComparer.Ordinal));
    }

    private sealed class SynchronousProgress(Action<long> report) : IProgress<long>
    {
        public void Report(long value) => report(value);
    }
}
