using System.Text;
using Vmsnap.Fuzz;
using Vmsnap.Migration;
using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;
using Vmsnap.Tests.Migration;
using Vmsnap.Tests.Qcow2;
using static Vmsnap.Tests.Migration.StreamFiles;

namespace Vmsnap.Tests.Fuzz;

/// <summary>
/// What the fuzzers (fuzz/run.sh) found, as the smallest inputs that show it: each must now end in one of
/// the project's own errors, through the parser and through the same fuzzing target that found it.
/// </summary>
[Trait("Category", "Unit")]
public sealed class FuzzRegressionTests
{
    /// <summary>A minimal stream (configuration, one RAM block, no pages) ending with <paramref name="description"/>.</summary>
    private static byte[] StreamWithDescription(byte[] description) =>
        [.. new StreamBuilder()
            .Header().Configuration("none")
            .Start(2).BlockList(("ram0", 4096)).EndOfRecords().Footer(2)
            .End(2).ZeroRecord(0, "ram0").EndOfRecords().Footer(2)
            .U8(0x00).U8(0x06).Be32((uint)description.Length).Raw(description)
            .ToArray()];

    [Fact]
    public void A_vm_description_that_is_not_utf8_is_a_stream_error()
    {
        // Found by the stream target: a string of the JSON holding a byte that is not UTF-8 (0x80) passed
        // JsonDocument.Parse and threw InvalidOperationException when the device name was read out.
        byte[] json = [.. "{\"page_size\": 4096, \"devices\": [{\"name\": \""u8, 0x80, .. "\", \"instance_id\": 0}]}"u8];
        byte[] stream = StreamWithDescription(json);

        var e = Assert.Throws<MigrationStreamException>(() => ReadBytes(stream, r => MigrationStream.Inspect(r)));
        Assert.Contains("VM description", e.Message);
        Assert.Contains("UTF-8", e.Message);
        using (var scratch = new TempDir())
            Assert.IsType<MigrationStreamException>(FuzzTargets.Run("stream", stream, scratch.Path));

        // The same stream with a valid name is read.
        byte[] good = StreamWithDescription(Encoding.UTF8.GetBytes("{\"page_size\": 4096, \"devices\": [{\"name\": \"é\", \"instance_id\": 0}]}"));
        Assert.Equal("é", Assert.Single(ReadBytes(good, r => MigrationStream.Inspect(r)).Devices).Name);
    }

    [QemuFact]
    public void Check_of_an_l2_entry_far_past_the_end_of_the_file_reports_it_without_unbounded_memory()
    {
        // Found by the qcow2 target: the checker's bitmap of clusters the active tables reference grew to the
        // cluster an L2 entry names, however far past the end of the file (the finding's 0x140000000000 asked for
        // 5 GiB; the 1 TiB offset here for 256 MiB).
        using var dir = new TempDir();
        string image = dir.File("far.qcow2");
        Qemu.Create(image, 64 << 10, "cluster_size=512");
        Qemu.Io(image, "write -P 0xa5 0 512");
        ulong l1Entry = Qemu.ReadBE64(image, (long)Qemu.Header(image).L1TableOffset);
        long l2 = (long)(l1Entry & 0x00fffffffffffe00UL);
        Qemu.WriteBE64(image, l2, 0x8000_0100_0000_0000UL);   // COPIED, host offset 1 TiB
        (var qemu, int exit) = QemuImgCheck.Of(image);
        Assert.Equal(2, exit);
        Assert.True(QemuImgCheck.Field(qemu, "corruptions") > 0, qemu.ToString());

        byte[] bytes = File.ReadAllBytes(image);
        long before = GC.GetAllocatedBytesForCurrentThread();
        Qcow2CheckResult result;
        using (var device = new MemoryBlockDevice(bytes) { IsReadOnly = true })
        using (Qcow2Image img = Qcow2Image.Open(device, "far.qcow2", new Qcow2OpenOptions { ReadOnly = true }))
            result = img.Check();
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;

        Assert.True(result.Corruptions > 0);
        Assert.Contains(result.Messages, m => m.Contains("exceeding the end of the file") && m.Contains("10000000000"));
        Assert.InRange(allocated, 0, 64L << 20);
        _ = FuzzTargets.Run("qcow2", bytes, dir.Path);   // accepted or refused, never a crash
    }

    [QemuFact]
    public void A_snapshot_whose_disk_size_overflows_the_vm_state_offset_is_a_format_error()
    {
        // Found by the qcow2 target: a snapshot's extra data named a disk size of 0xff00000002000000 (negative as
        // a long); the VM-state offset computed from it went negative, and reading the VM state threw
        // ArgumentOutOfRangeException.
        using var dir = new TempDir();
        string image = dir.File("disk-size.qcow2");
        Qemu.Create(image, 64 << 10, "cluster_size=512");
        Tool.QemuImg("snapshot", "-c", "s", image);
        // Entry: l1 offset (8), l1 size (4), id/name sizes (2+2), date (4+4), vm clock (8), vm_state_size (4),
        // extra size (4); extra data: 64-bit vm_state_size, disk size, icount.
        long entry = (long)Qemu.Header(image).SnapshotsOffset;
        Assert.True(Qemu.ReadBE64(image, entry + 36) >> 32 >= 16, "QEMU writes 24 bytes of extra data");
        Qemu.WriteBE32(image, entry + 32, 4096);
        Qemu.WriteBE64(image, entry + 40, 4096);
        Qemu.WriteBE64(image, entry + 48, 0xff00_0000_0200_0000UL);
        Assert.Contains("\"name\": \"s\"", Tool.QemuImg("info", "--output=json", image));   // QEMU still reads the table

        byte[] bytes = File.ReadAllBytes(image);
        using (var device = new MemoryBlockDevice(bytes) { IsReadOnly = true })
        using (Qcow2Image img = Qcow2Image.Open(device, "disk-size.qcow2", new Qcow2OpenOptions { ReadOnly = true }))
        {
            Qcow2Snapshot snapshot = Assert.Single(img.Snapshots);
            Assert.Equal(4096, snapshot.VmStateSize);
            var e = Assert.Throws<Qcow2FormatException>(() => img.OpenVmStateAreaForReading(snapshot));
            Assert.Contains($"disk size {0xff00_0000_0200_0000UL}", e.Message);
        }
        Assert.IsType<Qcow2FormatException>(FuzzTargets.Run("qcow2", bytes, dir.Path));
    }
}
