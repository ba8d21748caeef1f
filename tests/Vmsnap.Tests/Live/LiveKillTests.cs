using System.Diagnostics;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Vmsnap.Tests.Interop;
using static Vmsnap.Tests.Live.LiveKit;
using Vmsnap.Tests.Snapshots;
using Xunit.Abstractions;
using static Vmsnap.Tests.Snapshots.VmKit;

namespace Vmsnap.Tests.Live;

/// <summary>
/// A real <c>vmsnap savevm</c> of a real guest killed with SIGKILL at every phase of a save, the stop window
/// included (the test's startup hook stops the process at a phase, or at the Nth file write after it, see
/// <see cref="LiveKillHook"/>; one kill is timed, without the hook, while QEMU sends the VM state). After each kill
/// the next vmsnap command on that QEMU (<c>vmsnap recover</c>, <c>savevm</c> or <c>loadvm</c>) finds the save's record in
/// QEMU and undoes what it left. Then: the guest runs and keeps counting in the same boot, QEMU's migration parameters
/// and capabilities are exactly what they were before the first save (the whole query-migrate-parameters and
/// query-migrate-capabilities answers), QEMU holds no record, the killed save's snapshot is on every drive or on none,
/// the older snapshot's VM state is unchanged, qemu-img check (with the guest stopped, so that QEMU has flushed its
/// metadata) finds nothing, and the file holds no unsaved VM state past what the image uses. At the end, with QEMU gone,
/// qemu-img check is clean, the older snapshot restores the guest, and so does a snapshot the recovery finished.
/// One guest for every kill.
/// </summary>
[Trait("Category", "Guest")]
public class LiveKillTests(ITestOutputHelper output)
{
    private const string Slow = "16M";   // --max-bandwidth for the timed kill, so that the migration lasts a few seconds

    /// <summary>What the test does after the kill.</summary>
    private enum Next
    {
        Recover,
        SaveVm,
        LoadVm,
    }

    /// <summary>
    /// One kill: the save's kind, the phase (and I/O after it) where the hook stops it (null: killed by the clock while
    /// QEMU sends), the command that follows, and the recovery's stage and snapshot outcome when the test can know them.
    /// </summary>
    private sealed record KillPoint(string Phase, bool Live, Next Next, string? Stage = null, string? Snapshot = null)
    {
        /// <summary>Stop the guest before the save (a save of a paused guest).</summary>
        public bool PausedGuest { get; init; }

        /// <summary>Killed before the save wrote its record: nothing to recover in QEMU (the next save sweeps the rehearsal's scratch folder).</summary>
        public bool BeforeRecord { get; init; }

        /// <summary>Before the kill, while the hook holds the save: vmsnap recover must refuse and leave it alone.</summary>
        public bool RecoverWhileItRuns { get; init; }

        /// <summary>Delete the snapshot from this disk with qemu-img after the kill (QEMU has released the images): a snapshot cut short on some drives.</summary>
        public int? DeleteFromDisk { get; init; }

        public override string ToString() => $"{(Live ? "--live" : "stopped")} save killed at '{Phase}'{(PausedGuest ? " (guest paused)" : "")}" +
            $"{(DeleteFromDisk is int d ? $", snapshot then deleted from disk {d}" : "")}, then {Next}";
    }

    [QemuFact]
    public void A_live_save_killed_anywhere_leaves_nothing_behind_once_the_next_vmsnap_command_ran()
    {
        // The snapshots this test restores are saved live only where that restores exactly (not QEMU 7.2); the kills of
        // live saves restore nothing.
        bool liveRestored = LiveKit.LiveSaveRestoresExactly;
        KillPoint[] points =
        [
            new("rehearsed", Live: true, Next.SaveVm) { BeforeRecord = true },
            new("settings applied", Live: true, Next.Recover, "preparing", "none"),
            new("guest stopped", Live: false, Next.Recover, "preparing", "none"),
            new("guest stopped+3", Live: false, Next.SaveVm),
            new("clock", Live: true, Next.Recover, "migrating", "none"),
            new("migration completed", Live: true, Next.Recover, "stopped", "none") { RecoverWhileItRuns = true },
            new("postcopy index recorded", Live: false, Next.Recover, "stopped", "none"),
            new("images opened", Live: true, Next.LoadVm),
            new("region checked+1", Live: true, Next.Recover),
            new("region checked+3", Live: false, Next.SaveVm),
            new("snapshots committed", Live: true, Next.Recover, "committed", "kept"),
            new("snapshots committed", Live: liveRestored, Next.Recover, "stopped", "finished") { DeleteFromDisk = 1 },
            new("snapshots committed", Live: true, Next.Recover, "stopped", "undone") { DeleteFromDisk = 0 },
            new("resumed", Live: true, Next.SaveVm),
            new("settings restored", Live: true, Next.Recover, "resumed", "kept"),
            new("migration completed", Live: true, Next.Recover, "stopped", "none") { PausedGuest = true },
        ];

        using var dir = new TempDir();
        // A second QMP socket for vmsnap: the first is taken while the hook holds a save (QMP serves one client at a time).
        string second = dir.File("second.qmp");
        var options = new GuestOptions { Extra = ["-qmp", $"unix:{second},server=on,wait=off"] };
        SaveWindow beforeWindow;
        SaveWindow? finishedWindow = null;
        string? finishedTag = null;
        var outcomes = new List<string>();
        int partialKills = 0;
        using (TestGuest guest = TestGuest.Boot(dir, options))
        {
            guest.WaitForTick(t => t.N >= 3);
            // The user's own settings, none of them QEMU's default, each one a save changes: every kill must leave them so.
            guest.Vm.Execute("migrate-set-parameters", new JsonObject { ["max-bandwidth"] = 100L << 20, ["downtime-limit"] = 456 });
            guest.Vm.Execute("migrate-set-capabilities", new JsonObject
            {
                ["capabilities"] = new JsonArray(
                    new JsonObject { ["capability"] = "release-ram", ["state"] = true },
                    new JsonObject { ["capability"] = "validate-uuid", ["state"] = true }),
            });
            JsonNode parameters = guest.Vm.Execute("query-migrate-parameters")!;
            JsonNode capabilities = guest.Vm.Execute("query-migrate-capabilities")!;
            (_, beforeWindow) = SaveVm(guest, "before", live: liveRestored);
            string beforeLine = Listing(guest.Disks[0]).Split('\n').Single();
            string beforeState = VmStateHash(guest.Disks[0], "before");
            AssertSettings(guest, parameters, capabilities, "after a save that ran to its end");
            JsonElement nothing = VmsnapJson("recover", "--qmp", guest.VmsnapSocket, "--json");
            Assert.False(nothing.GetProperty("found").GetBoolean());
            Assert.Equal("running", nothing.GetProperty("run-state").GetString());

            for (int i = 0; i < points.Length; i++)
            {
                KillPoint point = points[i];
                string tag = $"killed{i}", what = $"kill {i}: {point}";
                if (point.PausedGuest) guest.Vm.Execute("stop");
                GuestTick before = guest.LastTick();

                string[] args = ["savevm", "--qmp", guest.VmsnapSocket, tag, .. point.Live ? new[] { "--live" } : [], .. point.Phase == "clock" ? new[] { "--max-bandwidth", Slow } : []];
                int pid;
                using (HookedVmsnap save = point.Phase == "clock" ? HookedVmsnap.Start(args, null) : HookedVmsnap.Start(args, point.Phase))
                {
                    pid = save.Pid;
                    if (point.Phase == "clock") WaitMigrating(guest, save, what);
                    else save.WaitPaused(what);
                    // Stopped in one drive's snapshot creation: the others go on; kill once one of them has its snapshot.
                    if (point.Phase.StartsWith("region checked+", StringComparison.Ordinal))
                        WaitUntil(() => guest.Disks.Any(d => LiveKit.Snapshots(d).Any(s => s.Name == tag)), TimeSpan.FromSeconds(20));
                    if (point.RecoverWhileItRuns)
                    {
                        VmsnapFails(["recover", "--qmp", second], $"a vmsnap save of '{tag}' (process {save.Pid}", "under way", "nothing was done");
                        Assert.Contains(guest.Vm.Execute("qom-list", new { path = "/objects" })!.AsArray(), o => o!["name"]!.GetValue<string>() == "vmsnap-save");
                    }
                    save.Kill();
                }
                string stateAfterKill = guest.RunState();
                // With the guest stopped (QEMU has flushed, or released, its images) the kill itself left no corruption: leaks at most.
                long leaks = 0;
                if (stateAfterKill is "paused" or "postmigrate")
                {
                    foreach (string d in guest.Disks)
                    {
                        QemuImgCheck c = QemuImgCheck.Of(d, "-U");
                        Assert.True(c.Corruptions == 0 && c.CheckErrors == 0, $"{what}: right after the kill, qemu-img check {d}: {c.Json}");
                        leaks += c.Leaks;
                    }
                }
                int[] taggedDisks = Enumerable.Range(0, guest.Disks.Length).Where(n => LiveKit.Snapshots(guest.Disks[n]).Any(s => s.Name == tag)).ToArray();
                string tagged = string.Join(",", taggedDisks);
                if (point.DeleteFromDisk is int disk)
                {
                    Assert.Equal("postmigrate", stateAfterKill);
                    Tool.QemuImg("snapshot", "-d", tag, guest.Disks[disk]);   // QEMU released the images: qemu-img may write them
                }

                string? stage = null, snapshot = null;
                switch (point.Next)
                {
                    case Next.Recover:
                        JsonElement r = VmsnapJson("recover", "--qmp", guest.VmsnapSocket, "--json");
                        Assert.True(r.GetProperty("found").GetBoolean(), $"{what}: vmsnap recover found nothing: {r}");
                        Assert.Equal(tag, r.GetProperty("tag").GetString());
                        stage = r.GetProperty("stage").GetString();
                        snapshot = r.GetProperty("snapshot").GetString();
                        if (point.Stage is not null) Assert.True(point.Stage == stage, $"{what}: stage '{stage}', expected '{point.Stage}': {r}");
                        if (point.Snapshot is not null) Assert.True(point.Snapshot == snapshot, $"{what}: snapshot '{snapshot}', expected '{point.Snapshot}': {r}");
                        Assert.Equal(!point.PausedGuest && stateAfterKill != "running", r.GetProperty("resumed").GetBoolean());
                        break;
                    case Next.SaveVm:
                        Tool.Result s = VmKit.Vmsnap("savevm", "--qmp", guest.VmsnapSocket, tag + "-next", "--live", "--json");
                        Assert.True(s.ExitCode == 0, $"{what}: the next savevm failed: {s.Stderr}");
                        if (point.BeforeRecord) Assert.Empty(s.Stderr);
                        else Assert.Contains("recovered first: a vmsnap save of '" + tag + "'", s.Stderr);
                        break;
                    case Next.LoadVm:
                        Tool.Result l = VmKit.Vmsnap("loadvm", "--qmp", guest.VmsnapSocket, "before");
                        Assert.True(l.ExitCode != 0, $"{what}: loadvm into a running QEMU should be refused");
                        Assert.Contains("recovered first: a vmsnap save of '" + tag + "'", l.Stderr);
                        Assert.Contains("not waiting for an incoming migration", l.Stderr);
                        break;
                }
                if (point.DeleteFromDisk is null && taggedDisks.Length > 0 && taggedDisks.Length < guest.Disks.Length) partialKills++;
                Assert.Empty(Directory.GetDirectories(Path.GetTempPath(), $"vmsnap-rehearsal-{pid}-*"));
                outcomes.Add($"{what}: QEMU {stateAfterKill} after the kill, snapshot on disk(s) [{tagged}], {leaks} leaked cluster(s), recovery stage {stage ?? "-"}, snapshot {snapshot ?? "-"}");
                output.WriteLine(outcomes[^1]);

                if (point.PausedGuest)
                {
                    // A guest paused before the save stays paused; the images are QEMU's again (10.0: blockdev-set-active; 7.2: with cont).
                    Assert.True(guest.RunState() is "paused" or "postmigrate", $"{what}: a guest paused before the save is {guest.RunState()} after the recovery");
                    guest.Vm.Execute("cont");
                }
                AssertNothingLeft(guest, what, tag, parameters, capabilities, beforeLine, beforeState);
                if (snapshot == "finished")
                {
                    finishedTag = tag;
                    finishedWindow = new SaveWindow(before.N, guest.LastTick().N, before.Boot);
                }
            }

            // The drives take their snapshots side by side: a kill inside that leaves the snapshot on one drive only, which the recovery settled.
            Assert.True(partialKills > 0, "no kill left a snapshot on one drive only:\n" + string.Join("\n", outcomes));

            // After all that a save works (this QEMU's migration settings and the images all in order).
            SaveVm(guest, "after", live: true);
            AssertSettings(guest, parameters, capabilities, "after the last save");
            guest.Vm.Quit();
        }
        foreach (string disk in new[] { dir.File("disk0.qcow2"), dir.File("disk1.qcow2") }) QemuImgCheck.AssertClean(disk);

        using (TestGuest restored = TestGuest.Restart(dir, options, "-loadvm", "before"))
        {
            AssertResumes(restored, beforeWindow);
            restored.Vm.Quit();
        }
        Assert.True(finishedTag is not null, "no kill left a snapshot the recovery finished:\n" + string.Join("\n", outcomes));
        using (TestGuest restored = TestGuest.Restart(dir, options, "-incoming", "defer"))
        {
            VmsnapJson("loadvm", "--qmp", restored.VmsnapSocket, finishedTag!, "--json");
            AssertResumes(restored, finishedWindow!);
            restored.Vm.Quit();
        }
        foreach (string disk in new[] { dir.File("disk0.qcow2"), dir.File("disk1.qcow2") }) QemuImgCheck.AssertClean(disk);
    }

    /// <summary>After a kill and the command that followed it: nothing of the killed save is left anywhere.</summary>
    private static void AssertNothingLeft(TestGuest guest, string what, string tag, JsonNode parameters, JsonNode capabilities, string beforeLine, string beforeState)
    {
        Assert.True(guest.RunState() == "running", $"{what}: the guest is {guest.RunState()}");
        long at = guest.LastTick().N;
        guest.WaitForTick(t => t.N > at + 1);
        Assert.All(guest.Ticks(), t => Assert.Equal("ok", t.Disks));
        AssertSettings(guest, parameters, capabilities, what);
        Assert.DoesNotContain(guest.Vm.Execute("qom-list", new { path = "/objects" })!.AsArray(), o => o!["name"]!.GetValue<string>() == "vmsnap-save");

        // The snapshot is on every drive or on none; every other snapshot too; the older one is as it was.
        string[][] names = guest.Disks.Select(d => LiveKit.Snapshots(d).Select(s => s.Name).ToArray()).ToArray();
        Assert.True(names[0].SequenceEqual(names[1]), $"{what}: the drives' snapshots differ: [{string.Join(", ", names[0])}] and [{string.Join(", ", names[1])}]");
        Assert.Equal(beforeLine, Listing(guest.Disks[0]).Split('\n')[0]);
        Assert.True(VmStateHash(guest.Disks[0], "before") == beforeState, $"{what}: the VM state of the older snapshot changed");

        // qemu-img check with the guest stopped (QEMU flushes its metadata when it stops), and no unsaved VM state lingering
        // in the file past what the image uses (at most the guard a save keeps above QEMU's writes while QEMU holds the image).
        guest.Vm.Execute("stop");
        try
        {
            foreach (string disk in guest.Disks)
            {
                QemuImgCheck check = QemuImgCheck.Of(disk, "-U");
                Assert.True(check.ExitCode == 0 && check.Corruptions == 0 && check.Leaks == 0 && check.CheckErrors == 0, $"{what}: qemu-img check {disk}: {check.Json}");
                long end = check.Field("image-end-offset"), length = new FileInfo(disk).Length;
                Assert.True(length <= end + (33L << 20), $"{what}: {disk} is {length} bytes long, its clusters end at {end}: unsaved VM state was left in the file");
            }
        }
        finally
        {
            guest.Vm.Execute("cont");
        }
    }

    private static void AssertSettings(TestGuest guest, JsonNode parameters, JsonNode capabilities, string what)
    {
        JsonNode p = guest.Vm.Execute("query-migrate-parameters")!, c = guest.Vm.Execute("query-migrate-capabilities")!;
        Assert.True(JsonNode.DeepEquals(parameters, p), $"{what}: QEMU's migration parameters are\n{p.ToJsonString()}\nwere\n{parameters.ToJsonString()}");
        Assert.True(JsonNode.DeepEquals(capabilities, c), $"{what}: QEMU's migration capabilities are\n{c.ToJsonString()}\nwere\n{capabilities.ToJsonString()}");
    }

    private static void WaitUntil(Func<bool> condition, TimeSpan timeout)
    {
        var clock = Stopwatch.StartNew();
        while (!condition() && clock.Elapsed < timeout) Thread.Sleep(100);
    }

    /// <summary>Waits until the save's migration is under way and some RAM has gone.</summary>
    private static void WaitMigrating(TestGuest guest, HookedVmsnap save, string what)
    {
        var clock = Stopwatch.StartNew();
        while (true)
        {
            JsonNode? m = guest.Vm.Execute("query-migrate");
            if (m?["status"]?.GetValue<string>() == "active" && (m["ram"]?["transferred"]?.GetValue<long>() ?? 0) > 16L << 20) return;
            Assert.False(save.HasExited, $"{what}: vmsnap exited before the kill: {save.Output}");
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60), $"{what}: the migration never got under way");
            Thread.Sleep(20);
        }
    }
}
