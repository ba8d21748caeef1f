using System.Diagnostics;
using System.Text.Json;
using Vmsnap.Tests.Interop;
using Vmsnap.Tests.Live;
using static Vmsnap.Tests.Snapshots.VmKit;

namespace Vmsnap.Tests.Libvirt;

/// <summary>
/// vmsnap savevm/loadvm --domain on a real libvirtd (Debian 12's libvirt 9.0 with its QEMU 7.2) and the real guest under TCG, judged by
/// virsh and qemu-img (of the same QEMU): what libvirt lists, reverts and deletes, and a guest that continues where the snapshot was taken.
/// </summary>
[Trait("Category", "Guest")]
[Collection(LibvirtdCollection.Name)]
public class LibvirtSnapshotTests
{
    private static (JsonElement Result, SaveWindow Window) SaveVm(LibvirtGuest guest, string tag, params string[] more)
    {
        GuestTick before = guest.LastTick();
        JsonElement r = VmsnapJson(["savevm", .. guest.Domain, tag, .. more, "--json"]);
        GuestTick after = guest.WaitForTickAfter(guest.LastTick().N);
        return (r, new SaveWindow(before.N, after.N, before.Boot));
    }

    [Theory]
    [MemberData(nameof(LibvirtSetup.Names), MemberType = typeof(LibvirtSetup))]
    public void vmsnap_savevm_is_listed_reverted_and_deleted_by_virsh(string libvirt)
    {
        LibvirtSetup setup = LibvirtSetup.Get(libvirt);
        using var qemu = QemuInstall.Use(setup.QemuVersion);
        using var dir = new TempDir();
        using LibvirtGuest guest = LibvirtGuest.Boot(dir, setup);

        // Stopped: QEMU 7.2's live migration of a TCG guest does not always restore exactly (LiveKit.LiveSaveRestoresExactly).
        (JsonElement first, SaveWindow window) = SaveVm(guest, "s1");
        Assert.Equal("running", first.GetProperty("run-state").GetString());
        Assert.Equal(["s1"], guest.SnapshotNames());
        Assert.Equal("s1", guest.Virsh("snapshot-current", guest.Name, "--name").Trim());
        string xml = guest.Virsh("snapshot-dumpxml", guest.Name, "s1");
        Assert.Contains("<memory snapshot='internal'/>", xml);
        Assert.Contains("<disk name='vda' snapshot='internal'/>", xml);
        Assert.Contains("<disk name='vdb' snapshot='internal'/>", xml);
        Assert.Contains("<state>running</state>", xml);

        (JsonElement second, _) = SaveVm(guest, "s2", "--live");
        Assert.True(second.GetProperty("live").GetBoolean());
        Assert.True(second.GetProperty("downtime-seconds").ValueKind == JsonValueKind.Number, second.ToString());
        Assert.Equal("s1", guest.Virsh("snapshot-parent", guest.Name, "s2").Trim());
        Assert.Equal("s2", guest.Virsh("snapshot-current", guest.Name, "--name").Trim());
        string info = guest.Virsh("snapshot-info", guest.Name, "s2");
        Assert.Contains("Location:       internal", info);
        foreach (string disk in guest.Disks) Assert.Equal(["s1", "s2"], LibvirtGuest.DiskSnapshotNames(disk));
        JsonElement listing = VmsnapJson(["snapshot", "list", .. guest.Domain, "--json"]);
        var rows = listing.GetProperty("snapshots").EnumerateArray().ToList();
        Assert.Equal(["s1", "s2"], rows.Select(x => x.GetProperty("name").GetString()));
        Assert.All(rows, x => Assert.Equal(JsonValueKind.Null, x.GetProperty("problem").ValueKind));
        Assert.True(rows[1].GetProperty("current").GetBoolean());
        Assert.Equal("1", rows[0].GetProperty("disks").GetProperty("vdb").GetString());

        int mark = guest.MarkBeforeRestore(window);
        guest.Virsh("snapshot-revert", guest.Name, "s1");
        Assert.Equal("running", guest.State());
        guest.AssertResumes(window, mark);
        Assert.Equal("s1", guest.Virsh("snapshot-current", guest.Name, "--name").Trim());

        guest.Virsh("snapshot-delete", guest.Name, "s2");
        Assert.Equal(["s1"], guest.SnapshotNames());
        foreach (string disk in guest.Disks) Assert.Equal(["s1"], LibvirtGuest.DiskSnapshotNames(disk));
        guest.Virsh("destroy", guest.Name);
        foreach (string disk in guest.Disks) QemuImgCheck.AssertClean(disk);
    }

    [Theory]
    [MemberData(nameof(LibvirtSetup.Names), MemberType = typeof(LibvirtSetup))]
    public void vmsnap_loadvm_reverts_a_virsh_snapshot_and_its_own(string libvirt)
    {
        LibvirtSetup setup = LibvirtSetup.Get(libvirt);
        using var qemu = QemuInstall.Use(setup.QemuVersion);
        using var dir = new TempDir();
        using LibvirtGuest guest = LibvirtGuest.Boot(dir, setup);

        (SaveWindow window, int mark) = guest.VirshSnapshot("v1");

        // A running domain is refused without --force; nothing changes.
        string[] listed = LibvirtGuest.DiskSnapshotNames(guest.Disks[0]);
        VmsnapFails(["loadvm", .. guest.Domain, "v1"], "is not shut off", "--force", "nothing was loaded");
        Assert.Equal("running", guest.State());
        // A name libvirt has is refused by savevm, the disks unchanged.
        VmsnapFails(["savevm", .. guest.Domain, "v1"], "libvirt already has a snapshot 'v1'", "nothing was saved");
        foreach (string disk in guest.Disks) Assert.Equal(listed, LibvirtGuest.DiskSnapshotNames(disk));
        Assert.Equal(["v1"], guest.SnapshotNames());
        Assert.Equal("running", guest.State());

        JsonElement r = VmsnapJson(["loadvm", .. guest.Domain, "v1", "--force", "--json"]);
        Assert.Equal("running", r.GetProperty("run-state").GetString());
        Assert.True(r.GetProperty("bytes").GetInt64() > 0);
        Assert.Equal("running", guest.State());
        Assert.Equal("v1", guest.Virsh("snapshot-current", guest.Name, "--name").Trim());
        guest.AssertResumes(window, mark);

        // vmsnap's own snapshot, loaded into the shut-off domain, with the save image first framed for the other libvirt
        // (libvirt 11 reads its header twice, 9.0 once): the restore that fails so is tried once more, framed right.
        (_, SaveWindow own) = SaveVm(guest, "s1");
        mark = guest.MarkBeforeRestore(own);
        guest.Virsh("destroy", guest.Name);
        string wrong = setup.ReadsSaveHeaderTwice ? "once" : "twice";
        Tool.Result load = Tool.RunPath("/usr/bin/env", [$"VMSNAP_LIBVIRT_SAVE_HEADER={wrong}", "VMSNAP_LIVE_TRACE=1", .. VmsnapCli.Command,
            "loadvm", .. guest.Domain, "s1", "--json"], TimeSpan.FromMinutes(3));
        Assert.True(load.ExitCode == 0, $"loadvm with the header framed '{wrong}' first exited {load.ExitCode}: {load.Stderr}");
        Assert.Contains("restore to be tried again", load.Stderr);
        Assert.Equal("running", JsonDocument.Parse(load.Stdout).RootElement.GetProperty("run-state").GetString());
        Assert.Equal("s1", guest.Virsh("snapshot-current", guest.Name, "--name").Trim());
        guest.AssertResumes(own, mark);
        Assert.Equal(["s1", "v1"], guest.SnapshotNames().Order().ToArray());
    }

    [Theory]
    [MemberData(nameof(LibvirtSetup.Names), MemberType = typeof(LibvirtSetup))]
    public void vmsnap_loadvm_postcopy_migrates_the_domain_in_from_vmsnap(string libvirt)
    {
        LibvirtSetup setup = LibvirtSetup.Get(libvirt);
        using var qemu = QemuInstall.Use(setup.QemuVersion);
        using var dir = new TempDir();
        using LibvirtGuest guest = LibvirtGuest.Boot(dir, setup);

        (SaveWindow window, int mark) = guest.VirshSnapshot("v1");
        string idBefore = guest.Virsh("domid", guest.Name).Trim();   // a new QEMU gets a new domain ID

        Tool.Result load = Tool.RunPath("/usr/bin/env", ["VMSNAP_LIVE_TRACE=1", .. VmsnapCli.Command,
            "loadvm", .. guest.Domain, "v1", "--force", "--postcopy", "--json"], TimeSpan.FromMinutes(3));
        Assert.True(load.ExitCode == 0, $"loadvm --postcopy exited {load.ExitCode}: {load.Stderr}");
        // libvirt took the domain in as an incoming migration, not a restore, and vmsnap was its source.
        Assert.Contains("libvirt prepared the incoming migration", load.Stderr);
        Assert.DoesNotContain("restored whole instead", load.Stderr);
        JsonElement r = JsonDocument.Parse(load.Stdout).RootElement;
        JsonElement pc = r.GetProperty("postcopy");
        Assert.True(pc.ValueKind == JsonValueKind.Object, load.Stdout);
        Assert.Equal(JsonValueKind.Null, r.GetProperty("postcopy-note").ValueKind);
        long pages = pc.GetProperty("pages-on-demand").GetInt64() + pc.GetProperty("pages-streamed").GetInt64();
        // Every page of the guest's RAM once, and those of the smaller RAM blocks (ROMs, video memory).
        Assert.InRange(pages, (long)LibvirtGuest.RamMiB << 20 >> 12, ((long)LibvirtGuest.RamMiB + 64) << 20 >> 12);
        Assert.Equal("running", r.GetProperty("run-state").GetString());
        Assert.Equal("running", guest.State());
        Assert.Contains("migrated", guest.Virsh("domstate", "--reason", guest.Name));
        Assert.NotEqual(idBefore, guest.Virsh("domid", guest.Name).Trim());
        Assert.Equal("v1", guest.Virsh("snapshot-current", guest.Name, "--name").Trim());
        guest.AssertResumes(window, mark);

        // libvirt's view of the domain is whole: its migration job is over, so its own snapshot and revert work on it.
        guest.Virsh("snapshot-create-as", guest.Name, "v2");
        Assert.Equal("v1", guest.Virsh("snapshot-parent", guest.Name, "v2").Trim());
        guest.Virsh("snapshot-revert", guest.Name, "v1");
        Assert.Equal("running", guest.State());
        guest.Virsh("destroy", guest.Name);
        foreach (string disk in guest.Disks) QemuImgCheck.AssertClean(disk);
    }

    [Theory]
    [MemberData(nameof(LibvirtSetup.Names), MemberType = typeof(LibvirtSetup))]
    public void vmsnap_loadvm_postcopy_restores_whole_a_domain_whose_RAM_postcopy_cannot_serve(string libvirt)
    {
        LibvirtSetup setup = LibvirtSetup.Get(libvirt);
        using var qemu = QemuInstall.Use(setup.QemuVersion);
        using var dir = new TempDir();
        // RAM as a shared file in libvirt's memory_backing_dir: QEMU's postcopy serves anonymous RAM and files on tmpfs or hugetlbfs only.
        using LibvirtGuest guest = LibvirtGuest.Boot(dir, setup, "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>");
        bool onTmpfs = new DriveInfo(setup.MemoryBackingDir).DriveFormat is "tmpfs" or "hugetlbfs";

        (JsonElement saved, SaveWindow window) = SaveVm(guest, "s1");
        Assert.Equal("running", saved.GetProperty("run-state").GetString());
        int mark = guest.MarkBeforeRestore(window);
        Tool.Result load = Tool.RunPath("/usr/bin/env", [.. VmsnapCli.Command, "loadvm", .. guest.Domain, "s1", "--force", "--postcopy", "--json"], TimeSpan.FromMinutes(3));
        Assert.True(load.ExitCode == 0, $"loadvm --postcopy exited {load.ExitCode}: {load.Stderr}");
        JsonElement r = JsonDocument.Parse(load.Stdout).RootElement;
        if (onTmpfs)
        {
            Assert.Equal(JsonValueKind.Object, r.GetProperty("postcopy").ValueKind);
        }
        else
        {
            // QEMU refused (10.0 when libvirt sets postcopy-ram, 7.2 once the load began): libvirt stopped that QEMU, vmsnap restored the domain whole.
            Assert.Equal(JsonValueKind.Null, r.GetProperty("postcopy").ValueKind);
            Assert.Contains("restored whole instead", r.GetProperty("postcopy-note").GetString());
            Assert.Contains("postcopy was not possible", load.Stderr);
            Assert.Contains("restored", guest.Virsh("domstate", "--reason", guest.Name));
        }
        Assert.Equal("running", guest.State());
        Assert.Equal("s1", guest.Virsh("snapshot-current", guest.Name, "--name").Trim());
        guest.AssertResumes(window, mark);

        // A paused snapshot gains nothing from postcopy: restored whole, and said so.
        guest.Virsh("suspend", guest.Name);
        VmsnapJson(["savevm", .. guest.Domain, "p1", "--json"]);
        JsonElement paused = VmsnapJson(["loadvm", .. guest.Domain, "p1", "--force", "--postcopy", "--json"]);
        Assert.Equal(JsonValueKind.Null, paused.GetProperty("postcopy").ValueKind);
        Assert.Contains("paused guest", paused.GetProperty("postcopy-note").GetString());
        Assert.Equal("paused", guest.State());
        guest.Virsh("destroy", guest.Name);
        foreach (string disk in guest.Disks) QemuImgCheck.AssertClean(disk);
    }

    [Theory]
    [MemberData(nameof(LibvirtSetup.Names), MemberType = typeof(LibvirtSetup))]
    public void Failures_leave_libvirt_and_the_disks_in_agreement(string libvirt)
    {
        LibvirtSetup setup = LibvirtSetup.Get(libvirt);
        using var qemu = QemuInstall.Use(setup.QemuVersion);
        using var dir = new TempDir();
        using LibvirtGuest guest = LibvirtGuest.Boot(dir, setup);

        VmsnapFails(["savevm", "--domain", "vmsnap-no-such-domain", "--connect", guest.Uri, "x"], "has no domain 'vmsnap-no-such-domain'");
        VmsnapFails(["savevm", "--qmp", dir.File("x.qmp"), .. guest.Domain, "x"], "--qmp SOCKET or --domain NAME");

        // A name a disk has (QEMU's own savevm, which libvirt does not know of) is refused, libvirt left without it.
        guest.Virsh("qemu-monitor-command", "--hmp", guest.Name, "savevm ondisk");
        VmsnapFails(["savevm", .. guest.Domain, "ondisk"], "already has a snapshot named 'ondisk'", "nothing was saved");
        Assert.Empty(guest.SnapshotNames());
        foreach (string disk in guest.Disks) Assert.Equal(["ondisk"], LibvirtGuest.DiskSnapshotNames(disk));
        // ... and snapshot list --domain flags the disagreement, with exit code 1.
        Tool.Result listed = Snapshots.VmKit.Vmsnap(["snapshot", "list", .. guest.Domain, "--json"]);
        Assert.Equal(1, listed.ExitCode);
        JsonElement row = JsonDocument.Parse(listed.Stdout).RootElement.GetProperty("snapshots").EnumerateArray().Single();
        Assert.False(row.GetProperty("in-libvirt").GetBoolean());
        Assert.Contains("not in libvirt", row.GetProperty("problem").GetString());

        // The domain stopped in the middle of a save: no snapshot anywhere.
        using (RunningVmsnap save = LiveKit.Start(["savevm", .. guest.Domain, "cut", "--max-bandwidth", "8M"]))
        {
            var clock = Stopwatch.StartNew();
            while (clock.Elapsed < TimeSpan.FromSeconds(60) && !save.HasExited && !guest.Virsh("qemu-monitor-command", guest.Name, "{\"execute\":\"query-migrate\"}").Contains("\"active\"", StringComparison.Ordinal))
                Thread.Sleep(100);
            Thread.Sleep(1000);
            guest.Virsh("destroy", guest.Name);
            Tool.Result r = save.Wait();
            Assert.True(r.ExitCode != 0, $"the save should have failed: {r.Stdout}");
            Assert.Contains("nothing was saved", r.Stderr);
        }
        Assert.Empty(guest.SnapshotNames());
        foreach (string disk in guest.Disks)
        {
            Assert.Equal(["ondisk"], LibvirtGuest.DiskSnapshotNames(disk));
            QemuImgCheck.AssertClean(disk);
        }

        // A shut-off domain is refused.
        VmsnapFails(["savevm", .. guest.Domain, "off"], "is shut off", "nothing was saved");
        VmsnapFails(["loadvm", .. guest.Domain, "nothing-like-it"], "libvirt has no snapshot 'nothing-like-it'", "nothing was loaded");
        Assert.Empty(guest.SnapshotNames());
    }
}
