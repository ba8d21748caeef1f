using System.Text.Json;
using System.Text.Json.Nodes;
using Vmsnap.Tests.Interop;
using Vmsnap.Tests.Snapshots;
using static Vmsnap.Tests.Snapshots.VmKit;

namespace Vmsnap.Tests.Live;

/// <summary>
/// The record a live save keeps in QEMU, and vmsnap recover, on a QEMU that never ran its guest (-S, no kernel: nothing
/// writes the images, so they must stay byte for byte as they were). The kills of saves of a running guest are in
/// <see cref="LiveKillTests"/>.
/// </summary>
[Trait("Category", "Interop")]
public class LiveRecoveryTests
{
    private static (QemuVm Vm, string Socket, string[] Disks) Start(TempDir dir)
    {
        string[] disks = [dir.File("a.qcow2"), dir.File("b.qcow2")];
        foreach (string d in disks) Tool.QemuImg("create", "-q", "-f", "qcow2", d, "64M");
        Tool.QemuIo("-c", "write -P 0x5a 0 1M", disks[0]);
        string socket = dir.File("v.qmp");
        QemuVm vm = QemuVm.Start(["-machine", "pc", "-accel", "tcg", "-m", "64M", .. disks.SelectMany(d => new[] { "-drive", $"file={d},if=virtio,format=qcow2" }),
            "-qmp", $"unix:{socket},server=on,wait=off"], paused: true);
        return (vm, socket, disks);
    }

    /// <summary>A --live save killed while the hook holds it right after it changed QEMU's migration settings.</summary>
    private static void KillOnceSettingsApplied(string socket, string tag)
    {
        using HookedVmsnap save = HookedVmsnap.Start(["savevm", "--qmp", socket, tag, "--live"], "settings applied");
        save.WaitPaused("a --live save held once it changed the settings");
        save.Kill();
    }

    [QemuFact]
    public void Recover_puts_back_the_settings_still_at_vmsnaps_values_leaves_one_changed_since_and_does_not_start_a_guest_that_never_ran()
    {
        using var dir = new TempDir();
        (QemuVm vm, string socket, string[] disks) = Start(dir);
        using (vm)
        {
            string[] hashes = disks.Select(GuestRam.Hash).ToArray();
            JsonNode parameters = vm.Execute("query-migrate-parameters")!, capabilities = vm.Execute("query-migrate-capabilities")!;
            KillOnceSettingsApplied(socket, "t");
            // What the killed save left: its settings, and its record.
            JsonNode left = vm.Execute("query-migrate-parameters")!;
            Assert.Equal(0, left["max-bandwidth"]!.GetValue<long>());
            Assert.Equal(50, left["downtime-limit"]!.GetValue<long>());
            Assert.Contains(vm.Execute("query-migrate-capabilities")!.AsArray(), c => c!["capability"]!.GetValue<string>() == "auto-converge" && c["state"]!.GetValue<bool>());
            // Someone sets a downtime limit of their own before anyone recovers: theirs stays.
            vm.Execute("migrate-set-parameters", new JsonObject { ["downtime-limit"] = 123 });

            JsonElement r = VmsnapJson("recover", "--qmp", socket, "--json");
            Assert.True(r.GetProperty("found").GetBoolean());
            Assert.Equal("t", r.GetProperty("tag").GetString());
            Assert.Equal("preparing", r.GetProperty("stage").GetString());
            Assert.Equal("none", r.GetProperty("snapshot").GetString());
            Assert.False(r.GetProperty("resumed").GetBoolean());
            Assert.Equal(["auto-converge", "max-bandwidth"], r.GetProperty("restored-settings").EnumerateArray().Select(e => e.GetString()).Order());
            Assert.Equal(["downtime-limit"], r.GetProperty("kept-settings").EnumerateArray().Select(e => e.GetString()));
            Assert.Equal("prelaunch", r.GetProperty("run-state").GetString());

            var expected = (JsonObject)parameters.DeepClone();
            expected["downtime-limit"] = 123;
            Assert.True(JsonNode.DeepEquals(expected, vm.Execute("query-migrate-parameters")), $"parameters: {vm.Execute("query-migrate-parameters")}");
            Assert.True(JsonNode.DeepEquals(capabilities, vm.Execute("query-migrate-capabilities")), $"capabilities: {vm.Execute("query-migrate-capabilities")}");
            Assert.DoesNotContain(vm.Execute("qom-list", new { path = "/objects" })!.AsArray(), o => o!["name"]!.GetValue<string>() == "vmsnap-save");
            Assert.Equal("prelaunch", vm.Execute("query-status")!["status"]!.GetValue<string>());

            // Once recovered, there is nothing more to recover.
            JsonElement again = VmsnapJson("recover", "--qmp", socket, "--json");
            Assert.False(again.GetProperty("found").GetBoolean());
            vm.Quit();
            Assert.Equal(hashes, disks.Select(GuestRam.Hash));
        }
    }

    [QemuFact]
    public void Recover_says_what_it_did_in_words_and_is_in_the_help_and_the_README()
    {
        using var dir = new TempDir();
        (QemuVm vm, string socket, string[] disks) = Start(dir);
        using (vm)
        {
            JsonNode parameters = vm.Execute("query-migrate-parameters")!, capabilities = vm.Execute("query-migrate-capabilities")!;
            KillOnceSettingsApplied(socket, "w");
            Tool.Result r = VmKit.Vmsnap("recover", "--qmp", socket);
            Assert.True(r.ExitCode == 0, $"vmsnap recover exited {r.ExitCode}: {r.Stderr}");
            string said = r.Stdout.Trim();
            Assert.StartsWith("recovered: a vmsnap save of 'w' (process ", said);
            Assert.Contains("--live) was cut short before QEMU began sending the VM state", said);
            Assert.Contains("put back QEMU's migration settings", said);
            foreach (string setting in new[] { "max-bandwidth", "downtime-limit", "auto-converge" }) Assert.Contains(setting, said);
            Assert.EndsWith("guest prelaunch", said);
            Assert.True(JsonNode.DeepEquals(parameters, vm.Execute("query-migrate-parameters")), $"parameters: {vm.Execute("query-migrate-parameters")}");
            Assert.True(JsonNode.DeepEquals(capabilities, vm.Execute("query-migrate-capabilities")), $"capabilities: {vm.Execute("query-migrate-capabilities")}");

            Tool.Result again = VmKit.Vmsnap("recover", "--qmp", socket);
            Assert.Equal(0, again.ExitCode);
            Assert.Equal("no vmsnap save was interrupted on this QEMU (run state 'prelaunch')", again.Stdout.Trim());
            vm.Quit();
        }

        // The command is in the help, with its options, and the README names it.
        Tool.Result help = VmKit.Vmsnap("--help"), own = VmKit.Vmsnap("recover", "--help");
        Assert.Matches(@"\n\s+recover\s+Undo what a killed live save left", help.Stdout);
        Assert.Contains("vmsnap recover [options]", own.Stdout);
        // --qmp or --domain (a libvirt domain), exactly one of them: required as savevm's and loadvm's are.
        Assert.Contains("--qmp <qmp>", own.Stdout);
        Assert.Contains("--domain <domain>", own.Stdout);
        VmKit.VmsnapFails(["recover"], "--qmp SOCKET or --domain NAME");
        Assert.Contains("--json", own.Stdout);
        string readme = File.ReadAllText(Path.Combine(LayeringTests.RepositoryRoot(), "README.md"));
        Assert.Contains("vmsnap recover --qmp SOCKET [--json]", readme);
        Assert.Contains("vmsnap recover --qmp /run/vm/vmsnap.sock", readme);
    }

    [QemuFact]
    public void An_object_with_the_records_id_that_vmsnap_did_not_write_is_refused_with_nothing_changed()
    {
        using var dir = new TempDir();
        (QemuVm vm, string socket, string[] disks) = Start(dir);
        using (vm)
        {
            string[] hashes = disks.Select(GuestRam.Hash).ToArray();
            JsonNode parameters = vm.Execute("query-migrate-parameters")!;
            vm.Execute("object-add", new JsonObject { ["qom-type"] = "authz-simple", ["id"] = "vmsnap-save", ["identity"] = "alice" });
            VmsnapFails(["savevm", "--qmp", socket, "t", "--live"], "'/objects/vmsnap-save'", "not a vmsnap save record", "nothing was done");
            VmsnapFails(["recover", "--qmp", socket], "'/objects/vmsnap-save'", "not a vmsnap save record", "nothing was done");
            vm.Execute("object-del", new JsonObject { ["id"] = "vmsnap-save" });
            vm.Execute("object-add", new JsonObject { ["qom-type"] = "secret", ["id"] = "vmsnap-save", ["data"] = "x" });
            VmsnapFails(["recover", "--qmp", socket], "'/objects/vmsnap-save'", "not a vmsnap save record", "nothing was done");

            Assert.True(JsonNode.DeepEquals(parameters, vm.Execute("query-migrate-parameters")));
            Assert.Equal("prelaunch", vm.Execute("query-status")!["status"]!.GetValue<string>());
            vm.Quit();
            Assert.Equal(hashes, disks.Select(GuestRam.Hash));
        }
    }
}
