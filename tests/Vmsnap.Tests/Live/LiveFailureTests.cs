using System.Diagnostics;
using System.Text.Json.Nodes;
using Microsoft.Win32.SafeHandles;
using Vmsnap.Storage;
using Vmsnap.Tests.Interop;
using static Vmsnap.Tests.Live.LiveKit;
using static Vmsnap.Tests.Snapshots.VmKit;

namespace Vmsnap.Tests.Live;

/// <summary>
/// Every failure of a live save injected for real into one guest: QEMU's migration failing (a writable
/// NBD export keeps QEMU from releasing the disk at the switchover) or cancelled (migrate_cancel from
/// the test's own QMP connection), the disk full (RLIMIT_FSIZE lowered under the running vmsnap), an
/// image still held by another process after the migration (an OFD lock), SIGTERM to vmsnap, and QEMU
/// killed. After each: no new snapshot on either disk, older snapshots unchanged, QEMU's migration
/// settings as they were, the guest running, the space given back, and at the end qemu-img check
/// clean and the older snapshot still restores the guest.
/// </summary>
[Trait("Category", "Guest")]
public class LiveFailureTests
{
    private const string Slow = "16M";   // --max-bandwidth for saves a failure must catch midway (about 8 s for this guest)

    [QemuFact]
    public void Each_failure_of_a_live_save_leaves_no_trace_and_the_guest_running()
    {
        using var dir = new TempDir();
        var options = new GuestOptions { ShareFirstDisk = true };
        SaveWindow beforeWindow;
        string[] listings;
        string beforeState;
        using (TestGuest guest = TestGuest.Boot(dir, options))
        {
            guest.WaitForTick(t => t.N >= 3);
            // The snapshot the test restores is saved stopped on QEMU 7.2: its own live migration of a TCG guest is at times inconsistent (docs/live.md).
            (_, beforeWindow) = SaveVm(guest, "before", live: QemuInstall.Current.AtLeast(10, 0));
            listings = guest.Disks.Select(Listing).ToArray();
            beforeState = VmStateHash(guest.Disks[0], "before");
            long bandwidth = MaxBandwidth(guest.Vm);
            long length = new FileInfo(guest.Disks[0]).Length;

            void AssertNothingChanged(string failure, long slack = 0)
            {
                for (int i = 0; i < 2; i++)
                    Assert.True(Listing(guest.Disks[i]) == listings[i], $"after {failure}: the snapshots of disk {i} changed:\n{Listing(guest.Disks[i])}");
                Assert.True(VmStateHash(guest.Disks[0], "before") == beforeState, $"after {failure}: the VM state of the older snapshot changed");
                Assert.Equal(bandwidth, MaxBandwidth(guest.Vm));
                Assert.Equal("running", guest.RunState());
                long at = guest.LastTick().N;
                guest.WaitForTick(t => t.N > at);
                Assert.All(guest.Ticks(), t => Assert.Equal("ok", t.Disks));
                long now = new FileInfo(guest.Disks[0]).Length;
                Assert.True(now <= length + slack, $"after {failure}: the image is {now} bytes long, was {length}: the VM state's space was not given back");
            }

            // QEMU's migration fails at the switchover: a writable NBD export of the disk keeps QEMU from releasing it.
            string node = guest.Vm.Execute("query-block")!.AsArray().First(b => b!["device"]!.GetValue<string>() == "d0")!["inserted"]!["node-name"]!.GetValue<string>();
            guest.Vm.Execute("nbd-server-start", new JsonObject { ["addr"] = new JsonObject { ["type"] = "unix", ["data"] = new JsonObject { ["path"] = dir.File("nbd.sock") } } });
            guest.Vm.Execute("block-export-add", new JsonObject { ["type"] = "nbd", ["id"] = "e0", ["node-name"] = node, ["writable"] = true });
            VmsnapFails(["savevm", "--qmp", guest.VmsnapSocket, "failed"], "QEMU's migration failed", "nothing was saved");
            guest.Vm.Execute("block-export-del", new JsonObject { ["id"] = "e0" });
            guest.Vm.Execute("nbd-server-stop");
            AssertNothingChanged("a failed migration", slack: 33L << 20);

            // Cancelled by another QMP client midway.
            using (RunningVmsnap save = Start("savevm", "--qmp", guest.VmsnapSocket, "cancelled", "--max-bandwidth", Slow))
            {
                WaitMigrating(guest, save);
                guest.Vm.Execute("migrate_cancel");
                AssertFailed(save.Wait(), "cancelled", "nothing was saved");
            }
            AssertNothingChanged("a cancelled migration", slack: 33L << 20);

            // The disk fills up midway: vmsnap's writes past a file-size limit fail (EFBIG) as they would with ENOSPC.
            using (RunningVmsnap save = Start("savevm", "--qmp", guest.VmsnapSocket, "full", "--max-bandwidth", Slow))
            {
                WaitFor(() => new FileInfo(guest.Disks[0]).Length > length + (96L << 20), save, "vmsnap to start writing the VM state");
                save.LimitFileSize(new FileInfo(guest.Disks[0]).Length + (4L << 20));
                AssertFailed(save.Wait(), "too large", "nothing was saved");
            }
            AssertNothingChanged("a full disk", slack: 33L << 20);

            // An image another process still holds after the migration (it forbids writers, as a second
            // user of the image would): vmsnap cannot write it and says so; QEMU cannot take it back either
            // until that process lets go.
            using (SafeFileHandle holder = File.OpenHandle(guest.Disks[1], FileMode.Open, FileAccess.Read))
            {
                Assert.True(NativeFile.TrySetOfdLock(holder, 201, 1, NativeFile.LockKind.Read));
                VmsnapFails(["savevm", "--qmp", guest.VmsnapSocket, "held", "--live"], "still holds the image", "nothing was saved", "could not be resumed");
            }
            guest.Vm.Execute("cont");
            AssertNothingChanged("an image held by another process", slack: 33L << 20);

            // SIGTERM to vmsnap midway (a live save).
            using (RunningVmsnap save = Start("savevm", "--qmp", guest.VmsnapSocket, "terminated", "--live", "--max-bandwidth", Slow))
            {
                WaitMigrating(guest, save);
                save.Terminate();
                AssertFailed(save.Wait(), "cancelled");
            }
            AssertNothingChanged("SIGTERM", slack: 33L << 20);

            // After all that a save works, and the first one is untouched.
            SaveVm(guest, "after", live: true);
            guest.Vm.Quit();
        }
        foreach (string disk in new[] { dir.File("disk0.qcow2"), dir.File("disk1.qcow2") }) QemuImgCheck.AssertClean(disk);
        string[] withAfter = [dir.File("disk0.qcow2"), dir.File("disk1.qcow2")];
        for (int i = 0; i < 2; i++) Assert.StartsWith(listings[i] + "\n", Listing(withAfter[i]));

        using (TestGuest restored = TestGuest.Restart(dir, options, "-loadvm", "before"))
        {
            AssertResumes(restored, beforeWindow);
            string[] now = withAfter.Select(Listing).ToArray();
            long length = new FileInfo(withAfter[0]).Length;

            // QEMU killed midway (a stopped save: QEMU flushed its own metadata when the guest stopped).
            using RunningVmsnap save = Start("savevm", "--qmp", restored.VmsnapSocket, "killed", "--max-bandwidth", Slow);
            WaitMigrating(restored, save);
            restored.Vm.Dispose();   // SIGKILL
            AssertFailed(save.Wait(), "QEMU exited", "nothing was saved");
            for (int i = 0; i < 2; i++) Assert.Equal(now[i], Listing(withAfter[i]));
            Assert.True(new FileInfo(withAfter[0]).Length <= length, "the VM state's space was not given back after QEMU died");
        }
        foreach (string disk in withAfter) QemuImgCheck.AssertClean(disk);
    }

    /// <summary>Waits until the save's migration is under way and some RAM has gone.</summary>
    private static void WaitMigrating(TestGuest guest, RunningVmsnap save) =>
        WaitFor(() =>
        {
            JsonNode? m = guest.Vm.Execute("query-migrate");
            return m?["status"]?.GetValue<string>() == "active" && (m["ram"]?["transferred"]?.GetValue<long>() ?? 0) > 16L << 20;
        }, save, "the migration to be under way");

    private static void WaitFor(Func<bool> condition, RunningVmsnap save, string what)
    {
        var clock = Stopwatch.StartNew();
        while (!condition())
        {
            if (save.HasExited) Assert.Fail($"vmsnap exited while the test waited for {what}: {save.Wait().Stderr}");
            if (clock.Elapsed > TimeSpan.FromSeconds(60)) Assert.Fail($"timed out waiting for {what}");
            Thread.Sleep(20);
        }
    }

    private static void AssertFailed(Tool.Result r, params string[] words)
    {
        Assert.True(r.ExitCode != 0, $"vmsnap should have failed: {r.Stdout}{r.Stderr}");
        string line = r.Stderr.Trim();
        Assert.True(line.StartsWith("vmsnap: ", StringComparison.Ordinal) && !line.Contains('\n'), $"not a one-line error: {line}");
        foreach (string w in words) Assert.True(line.Contains(w, StringComparison.OrdinalIgnoreCase), $"'{w}' is not in: {line}");
    }
}
