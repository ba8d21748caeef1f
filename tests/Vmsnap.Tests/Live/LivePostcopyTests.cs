using System.Text.Json;
using Vmsnap.Tests.Interop;
using static Vmsnap.Tests.Live.LiveKit;
using Vmsnap.Tests.Snapshots;
using static Vmsnap.Tests.Snapshots.VmKit;

namespace Vmsnap.Tests.Live;

/// <summary>
/// vmsnap loadvm --postcopy of a real Linux guest whose RAM is a shared memory-backend-file on tmpfs: snapshots made by
/// vmsnap savevm and by QEMU's own savevm, loaded into a QEMU started with -incoming defer -S. Once the load returns,
/// the RAM file (with the guest still paused) holds exactly what vmsnap load writes for the same snapshot; then the guest
/// resumes inside the save window, in the same boot, its memory checksum and disks intact. Refusals leave QEMU in
/// inmigrate with its capability and images unchanged.
/// </summary>
[Trait("Category", "Guest")]
public class LivePostcopyTests
{
    [QemuTheory]
    [InlineData("pc")]
    [InlineData("q35")]
    public void A_postcopy_load_delivers_every_page_of_vmsnap_and_QEMU_snapshots_and_the_guest_resumes(string machine)
    {
        using var dir = new TempDir();
        using var ram = new ShmFile();
        GuestOptions options = SharedRam(machine, ram.Path);
        SaveWindow vmsnapWindow, qemuWindow;
        using (TestGuest guest = TestGuest.Boot(dir, options))
        {
            guest.WaitForTick(t => t.N >= 3);
            (_, vmsnapWindow) = SaveVm(guest, "vmsnap", live: false);
            GuestTick before = guest.LastTick();
            Assert.Equal("", guest.Vm.Hmp("savevm qemu").Trim());
            long returned = guest.LastTick().N;
            qemuWindow = new SaveWindow(before.N, guest.WaitForTick(t => t.N > returned).N, before.Boot);
            guest.Vm.Quit();
        }

        foreach ((string tag, SaveWindow window) in new[] { ("vmsnap", vmsnapWindow), ("qemu", qemuWindow) })
        {
            // What the snapshot's RAM is, as vmsnap load writes it.
            string expected = dir.File($"expected-{tag}.ram");
            VmKit.Vmsnap("load", dir.File("disk0.qcow2"), tag, "--ram", $"ram0={expected}");

            using TestGuest restored = TestGuest.Restart(dir, options, "-incoming", "defer", "-S");
            Assert.Equal("inmigrate", restored.RunState());
            JsonElement r = VmsnapJson("loadvm", "--qmp", restored.VmsnapSocket, tag, "--postcopy", "--json");
            Assert.Equal("paused", r.GetProperty("run-state").GetString());
            JsonElement pc = r.GetProperty("postcopy");
            // vmsnap's savevm recorded the page index with the snapshot; QEMU's savevm did not, so it is scanned.
            Assert.Equal(tag == "vmsnap" ? "recorded" : "scanned", pc.GetProperty("index").GetString());
            Assert.Equal(JsonValueKind.Null, pc.GetProperty("index-problem").ValueKind);
            long pages = pc.GetProperty("pages-on-demand").GetInt64() + pc.GetProperty("pages-streamed").GetInt64();
            Assert.Equal(r.GetProperty("ram-bytes").GetInt64() / 4096, pages);
            Assert.Equal("completed", restored.Vm.Execute("query-migrate")!["status"]!.GetValue<string>());
            // The load put postcopy-ram back as it found it.
            Assert.DoesNotContain(restored.Vm.Execute("query-migrate-capabilities")!.AsArray(),
                c => c!["capability"]!.GetValue<string>() == "postcopy-ram" && c["state"]!.GetValue<bool>());

            // The guest has not run: its whole RAM is the snapshot's.
            Assert.Equal(GuestRam.Hash(expected), GuestRam.Hash(ram.Path));
            restored.Vm.Execute("cont");
            AssertResumes(restored, window);
            restored.Vm.Quit();
        }
        foreach (string disk in new[] { dir.File("disk0.qcow2"), dir.File("disk1.qcow2") }) QemuImgCheck.AssertClean(disk);
    }

    [QemuFact]
    public void A_postcopy_load_killed_or_failing_midway_leaves_the_guest_paused_and_the_same_command_resumes_it()
    {
        using var dir = new TempDir();
        using var ram = new ShmFile();
        GuestOptions options = SharedRam("pc", ram.Path);
        SaveWindow window;
        using (TestGuest guest = TestGuest.Boot(dir, options))
        {
            guest.WaitForTick(t => t.N >= 3);
            (_, window) = SaveVm(guest, "s", live: false);
            Assert.Equal("", guest.Vm.Hmp("savevm other").Trim());
            guest.Vm.Quit();
        }
        string expected = dir.File("expected.ram");
        VmKit.Vmsnap("load", dir.File("disk0.qcow2"), "s", "--ram", $"ram0={expected}");
        string[] disks = [dir.File("disk0.qcow2"), dir.File("disk1.qcow2")];

        // vmsnap SIGKILLed while it streams pages (the guest started, pages left), resumed by the same command; the image's
        // reads failing there, resumed by the same command; SIGKILLed again, resumed by vmsnap recover.
        foreach ((bool kill, bool byRecover) in new[] { (true, false), (false, false), (true, true) })
        {
            using TestGuest restored = TestGuest.Restart(dir, options, "-incoming", "defer", "-S");
            string[] args = ["loadvm", "--qmp", restored.VmsnapSocket, "s", "--postcopy"];
            using (HookedVmsnap first = HookedVmsnap.Start(args, pauseAt: kill ? "pages sent" : null, failReadsAt: kill ? null : "pages sent"))
            {
                if (kill)
                {
                    first.WaitPaused("streaming pages");
                    first.Kill();
                }
                else
                {
                    Assert.NotEqual(0, first.WaitExit());
                    foreach (string words in new[] { LiveKillHook.InjectedReadFailure, "waits in postcopy-paused", "run the same command again" })
                        Assert.Contains(words, first.Output);
                }
            }
            WaitForMigrationStatus(restored, "postcopy-paused");
            string[] hashes = disks.Select(GuestRam.Hash).ToArray();
            string[] listings = disks.Select(Listing).ToArray();

            // Another snapshot is refused, and nothing changes.
            VmsnapFails(["loadvm", "--qmp", restored.VmsnapSocket, "other", "--postcopy"], "serves snapshot 's'", "nothing was changed");
            Assert.Equal("postcopy-paused", MigrationStatus(restored));

            // The same command (or recover) resumes it: only the pages QEMU lacks, and no drive reverted again.
            if (byRecover)
            {
                JsonElement rec = VmsnapJson("recover", "--qmp", restored.VmsnapSocket, "--json");
                Assert.True(rec.GetProperty("found").GetBoolean());
                Assert.Equal("postcopy", rec.GetProperty("stage").GetString());
                Assert.Equal("s", rec.GetProperty("tag").GetString());
            }
            else
            {
                JsonElement r = VmsnapJson([.. args, "--json"]);
                JsonElement pc = r.GetProperty("postcopy");
                Assert.True(pc.GetProperty("resumed").GetBoolean());
                long there = pc.GetProperty("pages-already-there").GetInt64();
                Assert.True(there > 0, "QEMU had received pages before the cut");
                Assert.Equal(r.GetProperty("ram-bytes").GetInt64() / 4096, there + pc.GetProperty("pages-on-demand").GetInt64() + pc.GetProperty("pages-streamed").GetInt64());
            }
            Assert.Equal("completed", MigrationStatus(restored));
            Assert.DoesNotContain(restored.Vm.Execute("query-migrate-capabilities")!.AsArray(),
                c => c!["capability"]!.GetValue<string>() == "postcopy-ram" && c["state"]!.GetValue<bool>());
            Assert.Equal(hashes, disks.Select(GuestRam.Hash).ToArray());
            Assert.Equal(listings, disks.Select(Listing).ToArray());

            Assert.Equal(GuestRam.Hash(expected), GuestRam.Hash(ram.Path));
            restored.Vm.Execute("cont");
            AssertResumes(restored, window);
            restored.Vm.Quit();
        }
        foreach (string disk in disks) QemuImgCheck.AssertClean(disk);
    }

    private static string MigrationStatus(TestGuest guest) => guest.Vm.Execute("query-migrate")!["status"]?.GetValue<string>() ?? "none";

    private static void WaitForMigrationStatus(TestGuest guest, string status)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (MigrationStatus(guest) != status)
        {
            Assert.True(clock.Elapsed < TimeSpan.FromMinutes(1), $"QEMU's migration is '{MigrationStatus(guest)}', not '{status}'");
            Thread.Sleep(50);
        }
    }

    [QemuFact]
    public void A_running_guest_resumes_at_once_and_pages_follow()
    {
        using var dir = new TempDir();
        SaveWindow window;
        using (TestGuest guest = TestGuest.Boot(dir))
        {
            guest.WaitForTick(t => t.N >= 3);
            (_, window) = SaveVm(guest, "s", live: false);
            guest.Vm.Quit();
        }
        using (TestGuest restored = TestGuest.Restart(dir, new GuestOptions(), "-incoming", "defer"))
        {
            JsonElement r = VmsnapJson("loadvm", "--qmp", restored.VmsnapSocket, "s", "--postcopy", "--json");
            Assert.Equal("running", r.GetProperty("run-state").GetString());
            JsonElement pc = r.GetProperty("postcopy");
            Assert.Equal(JsonValueKind.Number, pc.GetProperty("seconds-to-resume").ValueKind);
            Assert.True(pc.GetProperty("seconds-to-resume").GetDouble() <= pc.GetProperty("seconds-to-last-page").GetDouble());
            Assert.True(pc.GetProperty("pages-on-demand").GetInt64() > 0, "a running guest touches pages before the stream brings them");
            AssertResumes(restored, window);
            restored.Vm.Quit();
        }
        foreach (string disk in new[] { dir.File("disk0.qcow2"), dir.File("disk1.qcow2") }) QemuImgCheck.AssertClean(disk);
    }

    [QemuFact]
    public void RAM_postcopy_cannot_serve_is_refused_before_anything_changes()
    {
        using var dir = new TempDir();
        using (TestGuest guest = TestGuest.Boot(dir))
        {
            guest.WaitForTick(t => t.N >= 2);
            SaveVm(guest, "s", live: false);
            guest.Vm.Quit();
        }
        string[] listings = [Listing(dir.File("disk0.qcow2")), Listing(dir.File("disk1.qcow2"))];
        string[] hashes = [GuestRam.Hash(dir.File("disk0.qcow2")), GuestRam.Hash(dir.File("disk1.qcow2"))];
        using var ram = new ShmFile();
        // A file beside the tests' binaries, which are not on tmpfs (/tmp may be).
        string onDisk = Path.Combine(AppContext.BaseDirectory, $"postcopy-{Guid.NewGuid():N}.ram");
        using var deleteOnDisk = new DeleteFile(onDisk);
        var cases = new (GuestOptions Options, string[] Words)[]
        {
            (Backend($"mem-path={ram.Path},share=off"), ["without share=on", "nothing was loaded"]),
            (Backend($"mem-path={onDisk},share=on"), ["needs RAM that is anonymous or on tmpfs", "nothing was loaded"]),
        };
        foreach ((GuestOptions options, string[] words) in cases)
        {
            using TestGuest restored = TestGuest.Restart(dir, options, "-incoming", "defer");
            VmsnapFails(["loadvm", "--qmp", restored.VmsnapSocket, "s", "--postcopy"], words);
            Assert.Equal("inmigrate", restored.RunState());
            Assert.Equal("none", restored.Vm.Execute("query-migrate")!["status"]?.GetValue<string>() ?? "none");
            Assert.DoesNotContain(restored.Vm.Execute("query-migrate-capabilities")!.AsArray(),
                c => c!["capability"]!.GetValue<string>() == "postcopy-ram" && c["state"]!.GetValue<bool>());
            restored.Vm.Quit();
            Assert.Equal(listings, new[] { Listing(dir.File("disk0.qcow2")), Listing(dir.File("disk1.qcow2")) });
            Assert.Equal(hashes, new[] { GuestRam.Hash(dir.File("disk0.qcow2")), GuestRam.Hash(dir.File("disk1.qcow2")) });
        }
    }

    private static GuestOptions Backend(string file) => new()
    {
        Extra = ["-object", $"memory-backend-file,id=ram0,size={TestGuest.RamMiB}M,{file}", "-machine", "memory-backend=ram0"],
    };

    internal static GuestOptions SharedRam(string machine, string path) => Backend($"mem-path={path},share=on") with { Machine = machine };

    private sealed class DeleteFile(string path) : IDisposable
    {
        public void Dispose() => File.Delete(path);
    }

    /// <summary>A file on tmpfs (/dev/shm) for a shared memory backend, deleted afterwards.</summary>
    private sealed class ShmFile : IDisposable
    {
        public string Path { get; } = $"/dev/shm/vmsnap-test-{Guid.NewGuid():N}.ram";

        public void Dispose() => File.Delete(Path);
    }
}
