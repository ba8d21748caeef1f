using System.Text.Json.Nodes;
using Vmsnap.Live;
using Vmsnap.Tests.Interop;
using static Vmsnap.Tests.Live.LiveKit;

namespace Vmsnap.Tests.Live;

/// <summary>
/// What a failed live save reports as data (<see cref="LiveSnapshotException"/>'s properties), through the library, on
/// a QEMU with no kernel (-S; once continued its firmware runs and finds nothing to boot): whether anything was saved,
/// whether the guest runs, and a cancel that stays an <see cref="OperationCanceledException"/>.
/// </summary>
[Trait("Category", "Interop")]
public class LiveErrorTests
{
    private static (QemuVm Vm, string Socket, string Disk) Start(TempDir dir)
    {
        string disk = dir.File("a.qcow2");
        Tool.QemuImg("create", "-q", "-f", "qcow2", disk, "64M");
        Tool.QemuIo("-c", "write -P 0x5a 0 1M", disk);
        string socket = dir.File("v.qmp");
        QemuVm vm = QemuVm.Start(["-machine", "pc", "-accel", "tcg", "-m", "64M", "-drive", $"file={disk},if=none,id=d0,format=qcow2",
            "-device", "virtio-blk-pci,drive=d0,share-rw=on",
            "-qmp", $"unix:{socket},server=on,wait=off"], paused: true);
        return (vm, socket, disk);
    }

    private static string RunState(QemuVm vm) => vm.Execute("query-status")!["status"]!.GetValue<string>();

    [QemuFact]
    public void A_failed_migration_says_nothing_was_saved_and_whether_the_guest_runs()
    {
        using var dir = new TempDir();
        (QemuVm vm, string socket, string disk) = Start(dir);
        using (vm)
        {
            // A writable NBD export of the disk (share-rw lets QEMU add one) keeps QEMU from releasing it: its migration fails at the switchover.
            string node = vm.Execute("query-block")!.AsArray().First(b => b!["device"]!.GetValue<string>() == "d0")!["inserted"]!["node-name"]!.GetValue<string>();
            vm.Execute("nbd-server-start", new JsonObject { ["addr"] = new JsonObject { ["type"] = "unix", ["data"] = new JsonObject { ["path"] = dir.File("nbd.sock") } } });
            vm.Execute("block-export-add", new JsonObject { ["type"] = "nbd", ["id"] = "e0", ["node-name"] = node, ["writable"] = true });

            // A paused guest (it never ran) stays paused.
            var paused = Assert.Throws<LiveSnapshotException>(() => LiveSnapshots.SaveVm(socket, "paused"));
            Assert.True(paused.NothingSaved, paused.Message);
            Assert.False(paused.GuestRunning, paused.Message);
            Assert.StartsWith("QEMU's migration failed", paused.Cause);
            Assert.Equal($"{paused.Cause}; nothing was saved", paused.Message);
            Assert.Null(paused.ResumeProblem);
            Assert.Empty(paused.Notes);
            Assert.False(paused.RecoveryPending);
            // Paused as it was; QEMU 7.2 calls a paused guest whose migration failed "postmigrate" (its images active again).
            Assert.Equal(QemuInstall.Current.AtLeast(8, 0) ? "prelaunch" : "postmigrate", RunState(vm));

            // A running guest runs again.
            vm.Execute("cont");
            Assert.Equal("running", RunState(vm));
            var running = Assert.Throws<LiveSnapshotException>(() => LiveSnapshots.SaveVm(socket, "running", new LiveSaveOptions { Live = true }));
            Assert.True(running.NothingSaved, running.Message);
            Assert.True(running.GuestRunning, running.Message);
            Assert.EndsWith("; nothing was saved", running.Message);
            Assert.False(running.RecoveryPending);
            Assert.Equal("running", RunState(vm));

            vm.Execute("block-export-del", new JsonObject { ["id"] = "e0" });
            vm.Execute("nbd-server-stop");
            Assert.Empty(LiveKit.Snapshots(disk));
            vm.Quit();
        }
        Assert.Empty(LiveKit.Snapshots(disk));
        QemuImgCheck.AssertClean(disk);
    }

    [QemuFact]
    public void A_cancelled_save_is_an_OperationCanceledException_whose_inner_error_says_nothing_was_saved_and_the_guest_runs()
    {
        using var dir = new TempDir();
        (QemuVm vm, string socket, string disk) = Start(dir);
        using (vm)
        {
            vm.Execute("cont");
            using var cancel = new CancellationTokenSource();
            // Cancelled from the progress report, which comes every 16 MiB of the guest's 64 MiB of RAM: midway, for sure.
            var cancelled = Assert.ThrowsAny<OperationCanceledException>(() =>
                LiveSnapshots.SaveVm(socket, "cancelled", null, new CancelOnReport(cancel), cancel.Token));
            var undone = Assert.IsType<LiveSnapshotException>(cancelled.InnerException);
            Assert.Equal("cancelled", undone.Cause);
            Assert.True(undone.NothingSaved);
            Assert.True(undone.GuestRunning);
            Assert.Equal("cancelled; nothing was saved", cancelled.Message);
            Assert.Equal("running", RunState(vm));
            Assert.Empty(LiveKit.Snapshots(disk));
            vm.Quit();
        }
        QemuImgCheck.AssertClean(disk);
    }

    /// <summary>Cancels at the first report (synchronously, on the thread that copies the stream).</summary>
    private sealed class CancelOnReport(CancellationTokenSource cancel) : IProgress<long>
    {
        public void Report(long value)
        {
            if (value > 0) cancel.Cancel();
        }
    }
}
