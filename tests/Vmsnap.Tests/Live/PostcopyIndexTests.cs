using System.Text;
using System.Text.Json;
using Vmsnap.Migration;
using Vmsnap.Migration.LowLevel;
using Vmsnap.Qcow2;
using Vmsnap.Qcow2.LowLevel;
using Vmsnap.VmState;
using Vmsnap.VmState.LowLevel;
using Vmsnap.Tests.Interop;
using static Vmsnap.Tests.Live.LiveKit;
using Vmsnap.Tests.Snapshots;
using static Vmsnap.Tests.Snapshots.VmKit;

namespace Vmsnap.Tests.Live;

/// <summary>
/// The postcopy index vmsnap records with a snapshot (docs/postcopy-index.md), with a real Linux guest whose RAM is a shared
/// file on tmpfs: a live savevm snapshot, an imported one and a saved one load with <c>--postcopy</c> from their recorded index, and the
/// RAM equals what vmsnap load writes; the record survives QEMU rewriting the snapshot table; QEMU's own -loadvm of the
/// snapshot still works; a damaged index or pointer is detected, the snapshot is scanned instead and loads the same.
/// </summary>
[Trait("Category", "Guest")]
public class PostcopyIndexTests
{
    [QemuFact]
    public void Recorded_indexes_are_used_survive_QEMU_table_rewrites_and_a_damaged_one_falls_back_to_the_scan()
    {
        using var dir = new TempDir();
        string ram = Path.Combine("/dev/shm", $"vmsnap-pcindex-{Guid.NewGuid():N}.ram");
        try
        {
            GuestOptions options = LivePostcopyTests.SharedRam("pc", ram);
            SaveWindow window;
            // The snapshot restored below is live where QEMU's live migration of a TCG guest restores exactly; on QEMU 7.2 it
            // is stopped (LiveKit.LiveSaveRestoresExactly, docs/live.md), and a live one, "iterative", has its index compared
            // with the scan only.
            bool live = LiveSaveRestoresExactly;
            using (TestGuest guest = TestGuest.Boot(dir, options))
            {
                guest.WaitForTick(t => t.N >= 3);
                (_, window) = SaveVm(guest, "live", live);
                if (!live) SaveVm(guest, "iterative", live: true);
                guest.Vm.Quit();
            }
            string disk0 = dir.File("disk0.qcow2"), disk1 = dir.File("disk1.qcow2");
            // An imported snapshot: the live one's stream exported and imported under another name (disk1 gets a disk-only one).
            string stream = dir.File("live.stream");
            Ok(VmKit.Vmsnap("export", disk0, "live", "-o", stream));
            Ok(VmKit.Vmsnap("import", stream, disk0, "--name", "imported"));
            Ok(Tool.Run("qemu-img", ["snapshot", "-c", "imported", disk1]));
            // A saved snapshot: the live one's RAM written anew by vmsnap save on the live stream as template.
            string liveRam = dir.File("live.ram");
            Ok(VmKit.Vmsnap("load", disk0, "live", "--ram", $"ram0={liveRam}"));
            Ok(VmKit.Vmsnap("save", disk0, "--name", "saved", "--template", stream, "--ram", $"ram0={liveRam}"));
            Ok(Tool.Run("qemu-img", ["snapshot", "-c", "saved", disk1]));
            // QEMU rewrites disk0's snapshot table twice; the vmsnap entries' extra data must come through.
            Ok(Tool.Run("qemu-img", ["snapshot", "-c", "other", disk0]));
            Ok(Tool.Run("qemu-img", ["snapshot", "-d", "other", disk0]));
            QemuImgCheck.AssertClean(disk0);
            // The later saves and QEMU's table rewrites leave the first snapshot's VM state as it was.
            string again = dir.File("live-again.stream");
            Ok(VmKit.Vmsnap("export", disk0, "live", "-o", again));
            Assert.Equal(Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(File.ReadAllBytes(stream))),
                Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(File.ReadAllBytes(again))));

            // QEMU's own load of the snapshot vmsnap recorded an index for: the guest continues inside the save window; then
            // QEMU's savevm of another snapshot rewrites both tables from the running QEMU.
            File.Delete(ram);
            using (TestGuest restored = TestGuest.Restart(dir, options, "-loadvm", "live"))
            {
                AssertResumes(restored, window);
                Assert.Equal("", restored.Vm.Hmp("savevm other2").Trim());
                restored.Vm.Quit();
            }

            Assert.Equal("none", VmsnapJson("inspect", disk0, "other2", "--json").GetProperty("source").GetProperty("postcopy-index").GetString());
            foreach (string tag in new[] { "live", "imported", "saved" })
            {
                Assert.Equal("recorded", VmsnapJson("inspect", disk0, tag, "--json").GetProperty("source").GetProperty("postcopy-index").GetString());
                JsonElement pc = LoadWithPostcopy(dir, options, ram, tag, window);
                Assert.Equal("recorded", pc.GetProperty("index").GetString());
                Assert.Equal(JsonValueKind.Null, pc.GetProperty("index-problem").ValueKind);
            }

            // Each recorded index finds every page and landmark where a scan of the stream does (the live stream is QEMU's
            // iterative one: a page QEMU sent twice is at its last record in both).
            foreach (string tag in live ? ["live", "imported", "saved"] : new[] { "live", "imported", "saved", "iterative" })
                AssertRecordedEqualsScan(disk0, tag);

            // A byte of each recorded index flipped: detected, scanned instead, the same RAM.
            FlipInFile(disk0, "vmsnapPI"u8.ToArray(), 200);
            JsonElement damaged = LoadWithPostcopy(dir, options, ram, "live", window);
            Assert.Equal("scanned", damaged.GetProperty("index").GetString());
            Assert.Contains("checksum", damaged.GetProperty("index-problem").GetString());

            // A flipped byte in the pointer's stream length (in the snapshot table): detected too.
            FlipInFile(disk0, "vmsnapPX"u8.ToArray(), 31);
            JsonElement stale = LoadWithPostcopy(dir, options, ram, "imported", window);
            Assert.Equal("scanned", stale.GetProperty("index").GetString());
            Assert.Contains("stream of", stale.GetProperty("index-problem").GetString());
            foreach (string disk in new[] { disk0, disk1 }) QemuImgCheck.AssertClean(disk);
            // Deleting a snapshot frees its index with its VM state.
            Ok(Tool.Run("qemu-img", ["snapshot", "-d", "live", disk0]));
            QemuImgCheck.AssertClean(disk0);
        }
        finally
        {
            File.Delete(ram);
        }
    }

    /// <summary>
    /// Loads <paramref name="tag"/> with --postcopy into a paused QEMU: every page delivered, the RAM exactly what vmsnap load
    /// writes for the snapshot, then the guest continues inside the save window. Returns the postcopy JSON.
    /// </summary>
    private static JsonElement LoadWithPostcopy(TempDir dir, GuestOptions options, string ram, string tag, SaveWindow window)
    {
        string expected = dir.File($"expected-{tag}-{Guid.NewGuid():N}.ram");
        Ok(VmKit.Vmsnap("load", dir.File("disk0.qcow2"), tag, "--ram", $"ram0={expected}"));
        using TestGuest restored = TestGuest.Restart(dir, options, "-incoming", "defer", "-S");
        JsonElement r = VmsnapJson("loadvm", "--qmp", restored.VmsnapSocket, tag, "--postcopy", "--json");
        JsonElement pc = r.GetProperty("postcopy").Clone();
        Assert.Equal(r.GetProperty("ram-bytes").GetInt64() / 4096, pc.GetProperty("pages-on-demand").GetInt64() + pc.GetProperty("pages-streamed").GetInt64());
        Assert.Equal(GuestRam.Hash(expected), GuestRam.Hash(ram));
        restored.Vm.Execute("cont");
        AssertResumes(restored, window);
        restored.Vm.Quit();
        File.Delete(expected);
        return pc;
    }

    private static void AssertRecordedEqualsScan(string image, string tag)
    {
        using var qcow2 = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true });
        Qcow2Snapshot snapshot = qcow2.FindSnapshot(tag)!;
        using Qcow2VmStateArea area = qcow2.OpenVmStateAreaForReading(snapshot, wholeArea: true);
        PostcopyIndex? recorded = RecordedPostcopyIndex.Load(qcow2.GetSnapshotExtraData(snapshot), snapshot.VmStateSize, area.Read, out string? problem);
        Assert.True(recorded is not null, $"{tag}: {problem}");
        PostcopyIndex scanned;
        using (VmStateBackend backend = VmStateBackend.ForBlockDevice(area, 0, snapshot.VmStateSize))
        using (var reader = new VmStateReader(backend, 1 << 20))
            scanned = PostcopySource.Scan(reader, snapshot.VmStateSize, CancellationToken.None);
        MigrationStreamIndex a = scanned.Pages, b = recorded!.Pages;
        Assert.Equal((a.ConfigurationEnd, a.RamStartOffset, a.DeviceStateOffset, a.EofOffset, a.StreamEnd),
            (b.ConfigurationEnd, b.RamStartOffset, b.DeviceStateOffset, b.EofOffset, b.StreamEnd));
        Assert.Equal(a.EarlySections, b.EarlySections);
        Assert.Equal(a.Blocks, b.Blocks);
        for (int block = 0; block < a.Blocks.Count; block++)
        {
            for (long page = 0; page < a.Blocks[block].Length / 4096; page++)
            {
                if (a.Find(block, page) != b.Find(block, page))
                    Assert.Fail($"{tag}: page {page} of block '{a.Blocks[block].Id}': scanned {a.Find(block, page)}, recorded {b.Find(block, page)}");
            }
        }
        Assert.Equal(scanned.Info.RamBytes, recorded.Info.RamBytes);
        Assert.Equal(scanned.Info.MachineType, recorded.Info.MachineType);
    }

    private static void Ok(Tool.Result r) => Assert.True(r.ExitCode == 0, $"exit {r.ExitCode}: {r.Stderr}");

    /// <summary>Flips the byte <paramref name="at"/> bytes past every occurrence of <paramref name="magic"/> in the file (at least one).</summary>
    private static void FlipInFile(string path, byte[] magic, int at)
    {
        byte[] bytes = File.ReadAllBytes(path);
        int found = 0;
        for (int i = bytes.AsSpan().IndexOf(magic); i >= 0;)
        {
            bytes[i + at] ^= 0x5a;
            found++;
            int next = bytes.AsSpan(i + 1).IndexOf(magic);
            i = next < 0 ? -1 : i + 1 + next;
        }
        Assert.True(found > 0, $"no '{Encoding.ASCII.GetString(magic)}' in {path}");
        File.WriteAllBytes(path, bytes);
    }
}
