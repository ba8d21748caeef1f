using System.Text.Json;
using Vmsnap.Tests.Interop;
using static Vmsnap.Tests.Live.LiveKit;
using static Vmsnap.Tests.Snapshots.VmKit;

namespace Vmsnap.Tests.Live;

/// <summary>
/// vmsnap and QEMU on the same guest, both ways: QEMU's own savevm loaded by vmsnap loadvm, vmsnap's
/// savevm loaded by QEMU's HMP loadvm, and the guest clock vmsnap records against the one QEMU's savevm
/// records for the same stopped guest.
/// </summary>
[Trait("Category", "Guest")]
public class LiveInteropTests
{
    [QemuFact]
    public void QEMU_savevm_loads_with_vmsnap_loadvm_and_vmsnap_savevm_loads_with_QEMU_loadvm()
    {
        using var dir = new TempDir();
        SaveWindow qemuWindow;
        using (TestGuest guest = TestGuest.Boot(dir))
        {
            guest.WaitForTick(t => t.N >= 3);

            // The same stopped guest saved by QEMU and by vmsnap: the same guest clock in both snapshots.
            guest.Vm.Execute("stop");
            Assert.Equal("", guest.Vm.Hmp("savevm qemu-stopped").Trim());
            JsonElement paused = VmsnapJson("savevm", "--qmp", guest.VmsnapSocket, "vmsnap-stopped", "--json");
            Assert.Equal(JsonValueKind.Null, paused.GetProperty("downtime-seconds").ValueKind);   // it was not running
            var listed = LiveKit.Snapshots(guest.Disks[0]).ToDictionary(s => s.Name);
            Assert.Equal(listed["qemu-stopped"].VmClockNanoseconds, listed["vmsnap-stopped"].VmClockNanoseconds);
            Assert.Equal(listed["vmsnap-stopped"].VmClockNanoseconds, paused.GetProperty("vm-clock-nsec").GetInt64());
            Assert.Null(listed["vmsnap-stopped"].Icount);   // QEMU's -1: no record/replay
            guest.Vm.Execute("cont");
            long resumedAt = guest.LastTick().N;
            guest.WaitForTick(t => t.N > resumedAt + 1);

            // QEMU's savevm of the running guest, for vmsnap loadvm below.
            GuestTick before = guest.LastTick();
            Assert.Equal("", guest.Vm.Hmp("savevm qemu-running").Trim());
            long returned = guest.LastTick().N;
            qemuWindow = new SaveWindow(before.N, guest.WaitForTick(t => t.N > returned).N, before.Boot);

            // vmsnap's live savevm, then QEMU's own HMP loadvm of it in the same QEMU: the guest goes back.
            (_, SaveWindow vmsnapWindow) = SaveVm(guest, "vmsnap-live", live: LiveSaveRestoresExactly);
            guest.WaitForTick(t => t.N > vmsnapWindow.After + 2);
            int printed = guest.Ticks().Count;
            Assert.Equal("", guest.Vm.Hmp("loadvm vmsnap-live").Trim());
            GuestTick back = TickNumber(guest, printed);
            vmsnapWindow.AssertResumedIn(back);
            guest.WaitForTick(t => t.N > back.N + 8 && t.Sum is not null);
            Assert.All(guest.Ticks().Skip(printed), t => Assert.Equal("ok", t.Disks));
            Assert.Equal(TestGuest.ExpectedFillSum, guest.Ticks().Skip(printed).First(t => t.Sum is not null).Sum);
            guest.Vm.Quit();
        }
        foreach (string disk in new[] { dir.File("disk0.qcow2"), dir.File("disk1.qcow2") }) QemuImgCheck.AssertClean(disk);

        using (TestGuest restored = TestGuest.Restart(dir, new GuestOptions(), "-incoming", "defer"))
        {
            JsonElement r = VmsnapJson("loadvm", "--qmp", restored.VmsnapSocket, "qemu-running", "--json");
            Assert.Equal("running", r.GetProperty("run-state").GetString());
            AssertResumes(restored, qemuWindow);
            restored.Vm.Quit();
        }
        // Started with -S as well: QEMU keeps the loaded guest paused until cont.
        using (TestGuest restored = TestGuest.Restart(dir, new GuestOptions(), "-incoming", "defer", "-S"))
        {
            JsonElement r = VmsnapJson("loadvm", "--qmp", restored.VmsnapSocket, "qemu-running", "--json");
            Assert.Equal("paused", r.GetProperty("run-state").GetString());
            Thread.Sleep(1000);
            Assert.Empty(restored.Ticks());
            restored.Vm.Execute("cont");
            AssertResumes(restored, qemuWindow);
            restored.Vm.Quit();
        }
        foreach (string disk in new[] { dir.File("disk0.qcow2"), dir.File("disk1.qcow2") }) QemuImgCheck.AssertClean(disk);
    }

    /// <summary>The tick line at position <paramref name="index"/> of the serial output, once printed.</summary>
    private static GuestTick TickNumber(TestGuest guest, int index)
    {
        guest.WaitForTick(_ => guest.Ticks().Count > index);
        return guest.Ticks()[index];
    }
}
