using System.Diagnostics;
using System.Text.Json;
using Vmsnap.Tests.Interop;
using Vmsnap.Tests.Live;
using static Vmsnap.Tests.Snapshots.VmKit;

namespace Vmsnap.Tests.Libvirt;

/// <summary>
/// libvirtd killed (SIGKILL) under a running <c>vmsnap savevm --domain</c>, then started again: libvirt reconnects to the domain's
/// QEMU, <c>vmsnap recover --domain</c> undoes what the cut-off save left through libvirt's monitor, and libvirt's view and the disks
/// agree (judged by virsh and qemu-img check -U); the guest runs on in the same boot.
/// </summary>
[Trait("Category", "Guest")]
[Collection(LibvirtdCollection.Name)]
public class LibvirtKillTests
{
    /// <summary>qemu-img check -U of a disk the domain's QEMU holds, with the guest paused (QEMU flushes its metadata caches when the guest stops; a running guest's writes would show as passing leaks).</summary>
    private static void AssertCleanShared(string image)
    {
        QemuImgCheck c = QemuImgCheck.Of(image, "-U");
        Assert.True(c.ExitCode == 0 && c.Corruptions == 0 && c.Leaks == 0 && c.CheckErrors == 0, c.ToString());
    }

    /// <summary>After the recovery: the guest runs on in the same boot, with its disks reading back right.</summary>
    private static void AssertGuestRunsOn(LibvirtGuest guest, string boot)
    {
        Assert.Equal("running", guest.State());
        GuestTick next = guest.WaitForTickAfter(guest.LastTick().N);
        Assert.Equal(boot, next.Boot);
        Assert.Equal("ok", next.Disks);
    }

    [Theory]
    [MemberData(nameof(LibvirtSetup.Names), MemberType = typeof(LibvirtSetup))]
    public void libvirtd_killed_while_the_VM_state_is_sent_fails_the_save_and_recover_domain_resumes_the_guest_with_no_snapshot_anywhere(string libvirt)
    {
        LibvirtSetup setup = LibvirtSetup.Get(libvirt);
        using var qemu = QemuInstall.Use(setup.QemuVersion);
        using var dir = new TempDir();
        using LibvirtGuest guest = LibvirtGuest.Boot(dir, setup);
        VmsnapJson(["savevm", .. guest.Domain, "s1", "--json"]);
        string boot = guest.LastTick().Boot;

        using (RunningVmsnap save = LiveKit.Start(["savevm", .. guest.Domain, "cut", "--max-bandwidth", "8M"]))
        {
            var clock = Stopwatch.StartNew();
            while (clock.Elapsed < TimeSpan.FromSeconds(60) && !save.HasExited && !guest.Virsh("qemu-monitor-command", guest.Name, "{\"execute\":\"query-migrate\"}").Contains("\"active\"", StringComparison.Ordinal))
                Thread.Sleep(100);
            Assert.False(save.HasExited, "the save ended before libvirtd was killed");
            Thread.Sleep(1000);
            guest.KillDaemon();
            Tool.Result r = save.Wait();
            Assert.True(r.ExitCode != 0, $"the save should have failed: {r.Stdout}");
            Assert.Contains("the connection to libvirt was lost", r.Stderr);
            Assert.Contains($"vmsnap recover --domain {guest.Name}", r.Stderr);
        }
        guest.StartDaemon();
        // libvirt is back on the same QEMU: the guest stopped for the save, no snapshot 'cut' anywhere, the images clean.
        Assert.Equal("paused", guest.State());
        Assert.Equal(["s1"], guest.SnapshotNames());
        foreach (string disk in guest.Disks)
        {
            Assert.Equal(["s1"], LibvirtGuest.DiskSnapshotNames(disk));
            AssertCleanShared(disk);
        }

        JsonElement rec = VmsnapJson(["recover", .. guest.Domain, "--json"]);
        Assert.True(rec.GetProperty("found").GetBoolean(), rec.ToString());
        Assert.Equal("cut", rec.GetProperty("tag").GetString());
        Assert.Equal("none", rec.GetProperty("snapshot").GetString());
        Assert.True(rec.GetProperty("resumed").GetBoolean(), rec.ToString());
        Assert.Equal("running", rec.GetProperty("run-state").GetString());
        AssertGuestRunsOn(guest, boot);
        Assert.Equal(["s1"], guest.SnapshotNames());
        AssertDisksCleanWhilePaused(guest, ["s1"]);
        Assert.False(VmsnapJson(["recover", .. guest.Domain, "--json"]).GetProperty("found").GetBoolean());

        // The next save works, and is listed with s1 as its parent.
        VmsnapJson(["savevm", .. guest.Domain, "s2", "--json"]);
        Assert.Equal("s1", guest.Virsh("snapshot-parent", guest.Name, "s2").Trim());
        foreach (string disk in guest.Disks) Assert.Equal(["s1", "s2"], LibvirtGuest.DiskSnapshotNames(disk));
        guest.Virsh("destroy", guest.Name);
        foreach (string disk in guest.Disks) QemuImgCheck.AssertClean(disk);
    }

    /// <summary>
    /// Saves s1, then holds a save of 'cut' once its snapshot is on every disk, kills libvirtd and that vmsnap (SIGKILL), and starts
    /// libvirtd again; returns the guest's boot.
    /// </summary>
    private static string SaveThenKillLibvirtdAndVmsnapOnceCommitted(LibvirtGuest guest)
    {
        VmsnapJson(["savevm", .. guest.Domain, "s1", "--json"]);
        string boot = guest.LastTick().Boot;
        using (HookedVmsnap save = HookedVmsnap.Start(["savevm", .. guest.Domain, "cut"], "snapshots committed"))
        {
            save.WaitPaused("a save held once its snapshot is on every disk");
            guest.KillDaemon();
            save.Kill();
        }
        guest.StartDaemon();
        return boot;
    }

    [Theory]
    [MemberData(nameof(LibvirtSetup.Names), MemberType = typeof(LibvirtSetup))]
    public void libvirtd_killed_during_a_postcopy_load_the_pages_go_on_and_the_guest_continues_from_the_snapshot(string libvirt)
    {
        LibvirtSetup setup = LibvirtSetup.Get(libvirt);
        using var qemu = QemuInstall.Use(setup.QemuVersion);
        using var dir = new TempDir();
        using LibvirtGuest guest = LibvirtGuest.Boot(dir, setup);
        (SaveWindow window, int mark) = guest.VirshSnapshot("v1");

        // The snapshot's reads slowed once the device state is out: the guest runs, its pages still coming, when libvirtd dies.
        using (HookedVmsnap load = HookedVmsnap.Start(["loadvm", .. guest.Domain, "v1", "--force", "--postcopy"], pauseAt: null, slowReadsAt: "device state sent", trace: true))
        {
            load.WaitForOutput("domain running");
            guest.KillDaemon();
            Assert.NotEqual(0, load.WaitExit());
            Assert.True(load.Output.Contains("libvirt did not finish the incoming migration", StringComparison.Ordinal), load.Output);
            Assert.Contains("every page was sent and QEMU has them all", load.Output);
            Assert.Contains($"virsh snapshot-current {guest.Name} v1", load.Output);
        }
        guest.StartDaemon();
        // libvirt, back, finds the domain's QEMU running the snapshot's guest, which continues where the snapshot was taken.
        Assert.Equal("running", guest.State());
        guest.AssertResumes(window, mark);
        guest.Virsh("snapshot-current", guest.Name, "v1");
        Assert.Equal("v1", guest.Virsh("snapshot-current", guest.Name, "--name").Trim());
        guest.Virsh("destroy", guest.Name);
        foreach (string disk in guest.Disks) QemuImgCheck.AssertClean(disk);
    }

    [Theory]
    [MemberData(nameof(LibvirtSetup.Names), MemberType = typeof(LibvirtSetup))]
    public void libvirtd_and_vmsnap_killed_once_the_snapshot_is_on_every_disk_recover_domain_records_it_in_libvirt_and_resumes_the_guest(string libvirt)
    {
        LibvirtSetup setup = LibvirtSetup.Get(libvirt);
        using var qemu = QemuInstall.Use(setup.QemuVersion);
        using var dir = new TempDir();
        using LibvirtGuest guest = LibvirtGuest.Boot(dir, setup);
        string boot = SaveThenKillLibvirtdAndVmsnapOnceCommitted(guest);
        // What the kills left: the snapshot on every disk, libvirt without it (the state docs/libvirt.md names), the guest stopped.
        Assert.Equal(["s1"], guest.SnapshotNames());
        foreach (string disk in guest.Disks) Assert.Equal(["s1", "cut"], LibvirtGuest.DiskSnapshotNames(disk));
        Assert.Equal("paused", guest.State());

        JsonElement rec = VmsnapJson(["recover", .. guest.Domain, "--json"]);
        Assert.True(rec.GetProperty("found").GetBoolean(), rec.ToString());
        Assert.Equal("kept", rec.GetProperty("snapshot").GetString());
        Assert.Contains(rec.GetProperty("actions").EnumerateArray(), a => a.GetString()!.Contains("recorded snapshot 'cut'", StringComparison.Ordinal));
        AssertGuestRunsOn(guest, boot);
        Assert.Equal(["cut", "s1"], guest.SnapshotNames().Order().ToArray());
        Assert.Equal("cut", guest.Virsh("snapshot-current", guest.Name, "--name").Trim());
        Assert.Equal("s1", guest.Virsh("snapshot-parent", guest.Name, "cut").Trim());
        Assert.Contains("<memory snapshot='internal'/>", guest.Virsh("snapshot-dumpxml", guest.Name, "cut"));
        AssertDisksCleanWhilePaused(guest, ["s1", "cut"]);
        // libvirt's own revert and delete work on it.
        guest.Virsh("snapshot-revert", guest.Name, "cut");
        Assert.Equal("running", guest.State());
        guest.Virsh("snapshot-delete", guest.Name, "cut");
        foreach (string disk in guest.Disks) Assert.Equal(["s1"], LibvirtGuest.DiskSnapshotNames(disk));
        guest.Virsh("destroy", guest.Name);
        foreach (string disk in guest.Disks) QemuImgCheck.AssertClean(disk);
    }

    [Theory]
    [MemberData(nameof(LibvirtSetup.Names), MemberType = typeof(LibvirtSetup))]
    public void The_next_savevm_domain_after_libvirtd_and_vmsnap_were_killed_records_the_cut_off_snapshot_first_and_saves_after_it(string libvirt)
    {
        LibvirtSetup setup = LibvirtSetup.Get(libvirt);
        using var qemu = QemuInstall.Use(setup.QemuVersion);
        using var dir = new TempDir();
        using LibvirtGuest guest = LibvirtGuest.Boot(dir, setup);
        string boot = SaveThenKillLibvirtdAndVmsnapOnceCommitted(guest);

        Tool.Result next = Snapshots.VmKit.Vmsnap(["savevm", .. guest.Domain, "s2"]);
        Assert.True(next.ExitCode == 0, next.Stderr);
        Assert.Contains("recovered first", next.Stderr);
        Assert.Contains("recorded snapshot 'cut'", next.Stderr);
        AssertGuestRunsOn(guest, boot);
        Assert.Equal(["cut", "s1", "s2"], guest.SnapshotNames().Order().ToArray());
        Assert.Equal("s1", guest.Virsh("snapshot-parent", guest.Name, "cut").Trim());
        Assert.Equal("cut", guest.Virsh("snapshot-parent", guest.Name, "s2").Trim());
        Assert.Equal("s2", guest.Virsh("snapshot-current", guest.Name, "--name").Trim());
        AssertDisksCleanWhilePaused(guest, ["s1", "cut", "s2"]);
        guest.Virsh("destroy", guest.Name);
        foreach (string disk in guest.Disks) QemuImgCheck.AssertClean(disk);
    }

    /// <summary>The running guest paused (virsh suspend), its disks' snapshots and qemu-img check -U, then resumed.</summary>
    private static void AssertDisksCleanWhilePaused(LibvirtGuest guest, string[] snapshots)
    {
        guest.Virsh("suspend", guest.Name);
        foreach (string disk in guest.Disks)
        {
            Assert.Equal(snapshots, LibvirtGuest.DiskSnapshotNames(disk));
            AssertCleanShared(disk);
        }
        guest.Virsh("resume", guest.Name);
    }
}
