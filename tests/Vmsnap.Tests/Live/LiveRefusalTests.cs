using Vmsnap.Tests.Interop;
using static Vmsnap.Tests.Live.LiveKit;
using static Vmsnap.Tests.Snapshots.VmKit;

namespace Vmsnap.Tests.Live;

/// <summary>
/// What vmsnap savevm and loadvm refuse before changing anything, on a QEMU that never ran its guest
/// (-S, no kernel: nothing writes the images, so they must stay byte for byte as they were).
/// </summary>
[Trait("Category", "Unit")]
public class LiveRefusalTests
{
    private static QemuVm Start(string[] drives, string socket, params string[] more) =>
        QemuVm.Start(["-machine", "pc", "-accel", "tcg", "-m", "64M", .. drives, "-qmp", $"unix:{socket},server=on,wait=off", .. more], paused: true);

    [QemuFact]
    public void A_writable_raw_drive_is_refused_with_nothing_changed()
    {
        using var dir = new TempDir();
        string qcow2 = dir.File("a.qcow2"), raw = dir.File("b.raw");
        Tool.QemuImg("create", "-q", "-f", "qcow2", qcow2, "64M");
        Tool.QemuIo("-c", "write -P 0x33 0 1M", qcow2);
        Tool.QemuImg("create", "-q", "-f", "raw", raw, "8M");
        string socket = dir.File("v.qmp");
        using QemuVm vm = Start(["-drive", $"file={qcow2},if=virtio,format=qcow2", "-drive", $"file={raw},if=none,id=scratch,format=raw"], socket);
        string[] hashes = [GuestRam.Hash(qcow2), GuestRam.Hash(raw)];
        long bandwidth = MaxBandwidth(vm);

        VmsnapFails(["savevm", "--qmp", socket, "t"], "Device 'scratch' is writable but does not support snapshots", "nothing was saved");
        VmsnapFails(["savevm", "--qmp", socket, "t", "--live"], "Device 'scratch' is writable but does not support snapshots");

        Assert.Equal("prelaunch", vm.Execute("query-status")!["status"]!.GetValue<string>());
        Assert.Equal(bandwidth, MaxBandwidth(vm));
        vm.Quit();
        Assert.Equal(hashes, new[] { GuestRam.Hash(qcow2), GuestRam.Hash(raw) });
    }

    [QemuFact]
    public void A_taken_name_a_wrong_drive_and_a_missing_snapshot_are_refused_and_loadvm_wants_incoming_defer()
    {
        using var dir = new TempDir();
        string a = dir.File("a.qcow2"), b = dir.File("b.qcow2"), ro = dir.File("ro.qcow2");
        foreach (string f in new[] { a, b, ro }) Tool.QemuImg("create", "-q", "-f", "qcow2", f, "64M");
        Tool.QemuImg("snapshot", "-c", "taken", b);
        string socket = dir.File("v.qmp");
        string[] hashes;
        using (QemuVm vm = Start(["-drive", $"file={a},if=virtio,format=qcow2", "-drive", $"file={b},if=virtio,format=qcow2",
                   "-drive", $"file={ro},if=none,id=cd,format=qcow2,readonly=on"], socket))
        {
            hashes = [GuestRam.Hash(a), GuestRam.Hash(b), GuestRam.Hash(ro)];
            VmsnapFails(["savevm", "--qmp", socket, "taken"], "virtio1", "already has a snapshot named 'taken'", "nothing was saved");
            VmsnapFails(["savevm", "--qmp", socket, "t", "--vmstate-disk", "cd"], "'cd' is read-only");
            VmsnapFails(["savevm", "--qmp", socket, "t", "--vmstate-disk", "nope"], "no drive 'nope'");
            VmsnapFails(["loadvm", "--qmp", socket, "taken"], "not waiting for an incoming migration", "-incoming defer");
            Assert.Equal("prelaunch", vm.Execute("query-status")!["status"]!.GetValue<string>());
            vm.Quit();
        }
        Assert.Equal(hashes, new[] { GuestRam.Hash(a), GuestRam.Hash(b), GuestRam.Hash(ro) });

        using (QemuVm vm = Start(["-drive", $"file={a},if=virtio,format=qcow2", "-drive", $"file={b},if=virtio,format=qcow2"], socket, "-incoming", "defer"))
        {
            // 'taken' is on b only: QEMU's loadvm wants it on every drive.
            VmsnapFails(["loadvm", "--qmp", socket, "taken"], "Snapshot 'taken' does not exist in drive 'virtio0'", "nothing was loaded");
            Assert.Equal("inmigrate", vm.Execute("query-status")!["status"]!.GetValue<string>());
            vm.Quit();
        }
        Assert.Equal(hashes[..2], new[] { GuestRam.Hash(a), GuestRam.Hash(b) });

        using (QemuVm vm = Start(["-drive", $"file={ro},if=virtio,format=qcow2,readonly=on"], socket))
        {
            VmsnapFails(["savevm", "--qmp", socket, "t"], "no writable qcow2 drive");
            vm.Quit();
        }
        VmsnapFails(["savevm", "--qmp", dir.File("missing.qmp"), "t"], "cannot connect", "-qmp unix:");
    }
}
