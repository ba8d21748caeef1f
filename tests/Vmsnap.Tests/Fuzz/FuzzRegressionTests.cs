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

    /// <summary>An early-setup section whose id string is five 0xff bytes (not UTF-8), with its footer.</summary>
    private static byte[] EarlySectionNamedInBadUtf8() =>
        [.. new StreamBuilder().U8(0x04).Be32(1).U8(5).Raw([0xff, 0xff, 0xff, 0xff, 0xff]).Be32(0).Be32(1).Footer(1).ToArray()];

    [Fact]
    public void An_early_section_whose_id_string_is_not_utf8_is_kept_byte_for_byte()
    {
        // Found by the stream target (issue 16): after the configuration, an early-setup section whose id string
        // is not UTF-8. The reader decoded the name and encoded it again to rebuild the section's header; the
        // bytes grew (each bad byte became U+FFFD, three bytes) and writing the header past its array threw
        // ArgumentOutOfRangeException ("Parameter 'length'") instead of a stream error.
        byte[] finding = File.ReadAllBytes(Path.Combine(FuzzRegressions.Folder("stream"), "early-section-id-not-utf8.mig"));
        Assert.Equal([.. new StreamBuilder().Header().Configuration("none").Raw(EarlySectionNamedInBadUtf8()).U8(0x01).Be32(2).Id("ram").ToArray()], finding);
        var e = Assert.Throws<MigrationStreamException>(() => ReadBytes(finding, r => MigrationStream.Inspect(r)));
        Assert.Equal(finding.Length, e.Offset);   // the RAM section's start is cut short after its id string
        Assert.Contains("could not read an instance id", e.Message);
        using (var scratch = new TempDir())
            Assert.IsType<MigrationStreamException>(FuzzTargets.Run("stream", finding, scratch.Path));

        // The whole stream around such a section is read, and its copy and its template keep the section's bytes.
        byte[] early = EarlySectionNamedInBadUtf8();
        byte[] stream = [.. new StreamBuilder()
            .Header().Configuration("none").Raw(early)
            .Start(2).BlockList(("ram0", 4096)).EndOfRecords().Footer(2)
            .End(2).ZeroRecord(0, "ram0").EndOfRecords().Footer(2)
            .Tail()
            .ToArray()];
        var (copy, info) = WriteBytes(w => ReadBytes(stream, r => MigrationStream.Copy(r, w)));
        Assert.Equal(stream, copy);
        MigrationSectionInfo section = Assert.Single(info.Sections, s => s.Kind == MigrationSectionKind.EarlySetup);
        Assert.Equal((17L, (long)early.Length), (section.Offset, section.Bytes));
        using var dir = new TempDir();
        File.WriteAllBytes(dir.File("template.mig"), stream);
        using MachineProfile profile = MachineProfile.FromTemplate(dir.File("template.mig"), []);
        Assert.Equal(early, Assert.Single(profile.EarlySections));
    }

    [Fact]
    public void The_issues_80_byte_stream_with_a_malformed_early_section_is_a_stream_error_with_its_offset()
    {
        // Issue 16 item 5 names an 80-byte finding (configuration, then a malformed early section) that inspect and
        // import failed with "Specified argument was out of the range of valid values. (Parameter 'length')". Its bytes
        // were not kept; this input has its shape and size, and main's reader before the fix failed on it with exactly
        // that message: an early section whose id string is eight 0xff bytes and whose body is 4 bytes (re-encoded,
        // the id grew from 8 to 24 bytes and the instance id was written past the rebuilt header), then the RAM
        // section's start, cut short inside its first block's length.
        byte[] finding = File.ReadAllBytes(Path.Combine(FuzzRegressions.Folder("stream"), "early-section-id-grows-issue-shape-80-bytes.mig"));
        byte[] early = [.. new StreamBuilder().U8(0x04).Be32(1).U8(8).Raw([.. Enumerable.Repeat((byte)0xff, 8)]).Be32(0).Be32(1)
            .Raw([1, 1, 1, 1]).Footer(1).ToArray()];
        Assert.Equal([.. new StreamBuilder().Header().Configuration("none").Raw(early)
            .Start(2).Be64(4096 | 0x04).Id("ram0").Raw([0, 0]).ToArray()], finding);
        Assert.Equal(80, finding.Length);

        var inspect = Assert.Throws<MigrationStreamException>(() => ReadBytes(finding, r => MigrationStream.Inspect(r)));
        var copy = Assert.Throws<MigrationStreamException>(() => WriteBytes(w => ReadBytes(finding, r => MigrationStream.Copy(r, w))));
        foreach (MigrationStreamException e in new[] { inspect, copy })
        {
            Assert.Equal(78, e.Offset);   // where the block's 8-byte length starts, 2 bytes before the end
            Assert.Contains("could not read the length of RAM block 'ram0'", e.Message);
        }
        using var scratch = new TempDir();
        Assert.IsType<MigrationStreamException>(FuzzTargets.Run("stream", finding, scratch.Path));
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
