using System.Text.Json;
using Vmsnap.Tests.Interop;
using static Vmsnap.Tests.Live.LiveKit;
using static Vmsnap.Tests.Snapshots.VmKit;

namespace Vmsnap.Tests.Live;

/// <summary>
/// vmsnap savevm of a real Linux guest, stopped and live, then each snapshot restored both ways: by a
/// fresh QEMU with -loadvm, and by vmsnap loadvm into a QEMU started with -incoming defer. Machines
/// pc and q35, on both QEMU versions.
/// </summary>
[Trait("Category", "Guest")]
public class LiveSaveLoadTests
{
    [QemuTheory]
    [InlineData("pc")]
    [InlineData("q35")]
    public void A_guest_saved_stopped_and_live_resumes_from_each_snapshot_with_loadvm_and_with_vmsnap_loadvm(string machine)
    {
        using var dir = new TempDir();
        SaveWindow stoppedWindow, liveWindow;
        string bootId;
        using (TestGuest guest = TestGuest.Boot(dir, new GuestOptions { Machine = machine }))
        {
            guest.WaitForTick(t => t.N >= 3);
            bootId = guest.LastTick().Boot;

            (JsonElement stopped, stoppedWindow) = SaveVm(guest, "stopped", live: false);
            AssertSaveResult(stopped, "stopped", live: false, guest);
            (JsonElement live, liveWindow) = SaveVm(guest, "live", live: true);
            AssertSaveResult(live, "live", live: true, guest);

            // The guest keeps counting after both saves, in the same boot, its disks reading back right.
            GuestTick later = guest.WaitForTick(t => t.N > liveWindow.After + 2);
            Assert.Equal(bootId, later.Boot);
            Assert.All(guest.Ticks(), t => Assert.Equal("ok", t.Disks));
            Assert.Equal("running", guest.RunState());
            guest.Vm.Quit();

            foreach (string disk in guest.Disks) QemuImgCheck.AssertClean(disk);
            List<ImageSnapshot> first = LiveKit.Snapshots(guest.Disks[0]), second = LiveKit.Snapshots(guest.Disks[1]);
            Assert.Equal(["stopped", "live"], first.Select(s => s.Name));
            Assert.Equal(["stopped", "live"], second.Select(s => s.Name));
            Assert.All(first, s => Assert.True(s.VmStateSize > 0));
            Assert.All(second, s => Assert.Equal(0, s.VmStateSize));
            // What QEMU's savevm records: the same date and guest clock on every disk, no icount.
            for (int i = 0; i < 2; i++)
            {
                Assert.Equal(first[i].DateSeconds, second[i].DateSeconds);
                Assert.Equal(first[i].VmClockNanoseconds, second[i].VmClockNanoseconds);
                Assert.True(first[i].VmClockNanoseconds > 0);
            }
            Assert.Equal(stopped.GetProperty("bytes").GetInt64(), first[0].VmStateSize);
            Assert.True(first[1].VmClockNanoseconds > first[0].VmClockNanoseconds);
        }

        // The live save is restored where QEMU's live migration of a TCG guest is consistent (not 7.2: see LiveSaveRestoresExactly).
        foreach ((string tag, SaveWindow window) in new[] { ("stopped", stoppedWindow), ("live", liveWindow) }.Where(s => s.Item1 != "live" || LiveSaveRestoresExactly))
        {
            using (TestGuest restored = RestartOn(dir, machine, "-loadvm", tag))
            {
                AssertResumes(restored, window);
                restored.Vm.Quit();   // a killed QEMU may leak the clusters of its last writes
            }

            using (TestGuest restored = RestartOn(dir, machine, "-incoming", "defer"))
            {
                Assert.Equal("inmigrate", restored.RunState());
                JsonElement r = VmsnapJson("loadvm", "--qmp", restored.VmsnapSocket, tag, "--json");
                Assert.Equal("running", r.GetProperty("run-state").GetString());
                Assert.Equal(2, r.GetProperty("disks").GetArrayLength());
                Assert.True(r.GetProperty("bytes").GetInt64() > 0);
                AssertResumes(restored, window);
                restored.Vm.Quit();
            }
        }
        foreach (string disk in new[] { dir.File("disk0.qcow2"), dir.File("disk1.qcow2") }) QemuImgCheck.AssertClean(disk);
    }

    private static void AssertSaveResult(JsonElement r, string tag, bool live, TestGuest guest)
    {
        Assert.Equal(tag, r.GetProperty("tag").GetString());
        Assert.Equal(live, r.GetProperty("live").GetBoolean());
        Assert.Equal("running", r.GetProperty("run-state").GetString());
        // The guest's RAM plus its firmware's RAM blocks (ROMs, ACPI tables).
        Assert.InRange(r.GetProperty("ram-bytes").GetInt64(), (long)TestGuest.RamMiB << 20, ((long)TestGuest.RamMiB + 16) << 20);
        Assert.True(r.GetProperty("bytes").GetInt64() > 16L << 20, "the VM state holds at least the guest's filled memory");
        double total = r.GetProperty("seconds").GetDouble(), down = r.GetProperty("downtime-seconds").GetDouble();
        Assert.True(down > 0 && down <= total, $"downtime {down} s of a {total} s save");
        Assert.True(r.GetProperty("mib-per-second").GetDouble() > 0);
        Assert.Equal(guest.Machine, r.GetProperty("machine").GetString());
        JsonElement disks = r.GetProperty("disks");
        Assert.Equal(2, disks.GetArrayLength());
        Assert.True(disks[0].GetProperty("vm-state").GetBoolean());
        Assert.False(disks[1].GetProperty("vm-state").GetBoolean());
        Assert.Equal(guest.Disks[0], disks[0].GetProperty("image").GetString());
    }

    /// <summary>A new QEMU on the test's disks with the guest's command line plus <paramref name="more"/>.</summary>
    private static TestGuest RestartOn(TempDir dir, string machine, params string[] more) =>
        TestGuest.Restart(dir, new GuestOptions { Machine = machine }, more);
}
