using System.Buffers.Binary;
using Vmsnap.Migration;
using Vmsnap.Tests.Interop;
using static Vmsnap.Tests.Migration.StreamFiles;

namespace Vmsnap.Tests.Migration;

/// <summary>Migration streams against real QEMU 7.2 and 10.0, both directions (64 MiB guests).</summary>
[Trait("Category", "Unit")]
public sealed class MigrationQemuTests(QemuStreams streams) : IClassFixture<QemuStreams>
{
    private static readonly string[] PcBlocks =
        ["ram0", "/rom@etc/acpi/tables", "pc.bios", "pc.rom", "/rom@etc/table-loader", "/rom@etc/acpi/rsdp"];

    [QemuFact]
    public void Qemu_machine_none_stream_reads_back_the_guest_ram()
    {
        VersionStreams qemu = streams.ForCurrent();
        using var dir = new TempDir();
        string output = dir.File("ram0.out");
        MigrationStreamInfo info = ReadInto(qemu.NoneStream, ("ram0", output));

        Assert.Equal(GuestRam.Hash(qemu.NoneRam), GuestRam.Hash(output));
        // Sparse: zero pages were not written, so the file holds little more than its data pages.
        long dataBytes = (QemuStreams.RamBytes / 4096 - qemu.NoneZeroPages) * 4096;
        Assert.InRange(AllocatedBytes(output), 0, dataBytes + (1 << 20));
        Assert.Equal([new RamBlockSummary("ram0", QemuStreams.RamBytes, info.RamBlocks[0].Pages, info.RamBlocks[0].ZeroPages)], info.RamBlocks);
        Assert.Equal(new FileInfo(qemu.NoneStream).Length, info.TotalBytes);
    }

    [QemuFact]
    public void Inspect_of_a_qemu_machine_none_stream_lists_machine_blocks_counts_and_devices()
    {
        VersionStreams qemu = streams.ForCurrent();
        MigrationStreamInfo info = Inspect(qemu.NoneStream);

        Assert.Equal("none", info.MachineType);
        RamBlockSummary block = Assert.Single(info.RamBlocks);
        Assert.Equal("ram0", block.Id);
        Assert.Equal(QemuStreams.RamBytes, block.Length);
        long zero = GuestRam.CountZeroPages(qemu.NoneRam);
        Assert.Equal(qemu.NoneZeroPages, zero);
        Assert.Equal(zero, block.ZeroPages);
        Assert.Equal(QemuStreams.RamBytes / 4096 - zero, block.Pages);
        Assert.Equal(new FileInfo(qemu.NoneStream).Length, info.TotalBytes);

        // QEMU's machine none still writes the timer and global-state sections and describes them.
        Assert.Equal(["timer", "globalstate"], info.Devices.Select(d => d.Name));
        Assert.Null(info.DeviceStateProblem);
        // QEMU 10 sends SWITCHOVER_START for machine none (a current machine type) before the RAM section's end.
        string[] sections = QemuInstall.Current.WritesSwitchoverStart("none")
            ? ["configuration", "ram", "SWITCHOVER_START", "timer", "globalstate"]
            : ["configuration", "ram", "timer", "globalstate"];
        Assert.Equal(sections, info.Sections.Select(s => s.Name));
        // QEMU 8.2+ opens the VM description with a configuration object.
        Assert.Equal(QemuInstall.Current.AtLeast(8, 2), info.DescriptionHasConfiguration);
        Assert.Empty(info.Capabilities);
        MigrationSectionInfo ram = info.Sections[1];
        Assert.True(ram.Count >= 2, "start, parts and end");
        Assert.Equal(info.TotalBytes, info.Sections.Sum(s => s.Bytes) + 8 /* header */ + 1 /* EOF */ + VmDescriptionBytes(qemu.NoneStream));
    }

    [QemuFact]
    public void Our_machine_none_stream_begins_byte_for_byte_as_qemus()
    {
        VersionStreams qemu = streams.ForCurrent();
        // Same machine and RAM size, written for this QEMU: header, configuration and the RAM section's start
        // (block list, section id, footer) are what QEMU writes, and the first part opens the same way; the VM
        // description has this QEMU's shape.
        using var profile = MachineProfile.Create("none", Ram(("ram0", qemu.NoneRam)), Version.Parse(QemuInstall.Current.Version));
        var (ours, written) = WriteBytes(w => MigrationStream.Write(w, profile));
        byte[] theirs = File.ReadAllBytes(qemu.NoneStream);
        int firstPage = StartFooterOffset(theirs) + 5 + 5;
        Assert.Equal(theirs[..(firstPage + 8 + 5)], ours[..(firstPage + 8 + 5)]);
        Assert.Equal(Inspect(qemu.NoneStream).DescriptionHasConfiguration, written.DescriptionHasConfiguration);
        // QEMU's own description of the configuration section, word for word.
        string theirDescription = System.Text.Encoding.UTF8.GetString(theirs[^(int)VmDescriptionBytes(qemu.NoneStream)..][5..]);
        string ourDescription = System.Text.Encoding.UTF8.GetString(ours[^(int)VmDescriptionBytes2(ours)..][5..]);
        Assert.StartsWith(ourDescription[..ourDescription.IndexOf("\"devices\"", StringComparison.Ordinal)], theirDescription);
    }

    [QemuTheory]
    [InlineData(MigrationStreamWriter.DefaultPartBytes)]
    [InlineData(1L << 20)]
    public void Stream_written_for_machine_none_loads_in_qemu_with_the_same_ram(long partBytes)
    {
        int chunkBytes = partBytes == MigrationStreamWriter.DefaultPartBytes ? MigrationStreamWriter.DefaultChunkBytes : 256 << 10;
        using var dir = new TempDir();
        string source = dir.File("source-ram0");
        GuestRam.Create(source, QemuStreams.RamBytes, seed: 21);
        string stream = dir.File("ours.mig");
        using (var profile = MachineProfile.Create("none", Ram(("ram0", source))))
        {
            var progress = new List<long>();
            MigrationStreamInfo written = WriteFile(stream,
                w => TestHooks.WriteInParts(w, profile, partBytes, chunkBytes, new SyncProgress(progress.Add)));
            Assert.Equal(new FileInfo(stream).Length, written.TotalBytes);
            Assert.Equal(QemuStreams.RamBytes, progress[^1]);
            Assert.Equal(GuestRam.CountZeroPages(source), written.ZeroPages);
        }

        string loaded = dir.File("loaded-ram0");
        Assert.Equal("paused", QemuVm.LoadStream(QemuVm.MachineNone(loaded, QemuStreams.RamBytes), stream));
        Assert.Equal(GuestRam.Hash(source), GuestRam.Hash(loaded));
    }

    [QemuFact]
    public void Template_from_a_pc_guest_lists_its_six_blocks_and_its_devices()
    {
        VersionStreams qemu = streams.ForCurrent();
        MigrationStreamInfo info = Inspect(qemu.PcStream);

        Assert.Equal(qemu.PcMachine, info.MachineType);
        Assert.Equal(QemuInstall.Current.WritesSwitchoverStart(qemu.PcMachine), info.Sections.Any(s => s.Kind == MigrationSectionKind.Command));
        Assert.Equal(PcBlocks, info.RamBlocks.Select(b => b.Id));
        Assert.Equal(QemuStreams.RamBytes, info.RamBlocks[0].Length);
        Assert.All(info.RamBlocks, b => Assert.Equal(b.Length / 4096, b.Pages + b.ZeroPages));
        string[] devices = info.Devices.Select(d => d.Name).ToArray();
        Assert.Contains("cpu", devices);
        Assert.Contains("apic", devices);
        Assert.Contains("mc146818rtc", devices);
        Assert.Contains("0000:00:01.1/ide", devices);
        Assert.Contains(info.Devices.Single(d => d.Name == "cpu").Fields, f => f.Name == "env.regs" && f.Bytes == 16 * 8);
        // Every device section was walked with the VM description, in the description's order.
        Assert.Null(info.DeviceStateProblem);
        Assert.Equal(devices, info.Sections.Where(s => s.Kind == MigrationSectionKind.Device).Select(s => s.Name));
        Assert.InRange(info.DeviceStateBytes, 50_000, 300_000);
    }

    [QemuFact]
    public void Template_write_with_new_ram0_loads_in_qemu_pc_with_the_new_ram()
    {
        VersionStreams qemu = streams.ForCurrent();
        using var dir = new TempDir();
        string newRam = dir.File("new-ram0");
        GuestRam.Create(newRam, QemuStreams.RamBytes, seed: 31);
        string stream = dir.File("from-template.mig");
        using (var profile = MachineProfile.FromTemplate(qemu.PcStream, Ram(("ram0", newRam)), dir.Path))
        {
            Assert.Equal(PcBlocks, profile.RamBlocks.Select(b => b.Id));
            WriteFile(stream, w => MigrationStream.Write(w, profile));
        }
        Assert.Empty(Directory.GetDirectories(dir.Path)); // scratch files gone with the profile

        // The blocks not replaced carry the template's pages: compare pc.bios both ways.
        string templateBios = dir.File("template-bios"), ourBios = dir.File("our-bios");
        ReadInto(qemu.PcStream, ("pc.bios", templateBios));
        ReadInto(stream, ("pc.bios", ourBios));
        Assert.Equal(GuestRam.Hash(templateBios), GuestRam.Hash(ourBios));
        // And the device state is the template's, byte for byte.
        Assert.Equal(Tail(qemu.PcStream), Tail(stream));

        string loaded = dir.File("loaded-ram0");
        QemuVm.LoadStream(QemuVm.MachinePc(loaded, QemuStreams.RamBytes), stream);
        Assert.Equal(GuestRam.Hash(newRam), GuestRam.Hash(loaded));
    }

    [QemuFact]
    public void Copy_of_a_qemu_stream_is_byte_identical_and_qemu_loads_it()
    {
        VersionStreams qemu = streams.ForCurrent();
        using var dir = new TempDir();
        string copy = dir.File("copy.mig");
        var progress = new List<long>();
        long? totalWhenFirstReported = null;
        var receiver = new SyncRamProgress(done =>
        {
            progress.Add(done);
            totalWhenFirstReported ??= -1;
        }, total => totalWhenFirstReported ??= total);
        MigrationStreamInfo info = ReadFile(qemu.PcStream,
            r => WriteFile(copy, w => MigrationStream.Copy(r, w, receiver)));

        Assert.True(File.ReadAllBytes(qemu.PcStream).AsSpan().SequenceEqual(File.ReadAllBytes(copy)));
        Assert.Equal(new FileInfo(copy).Length, info.TotalBytes);
        Assert.Equal(info.RamBytes, progress[^1]);
        // The total (MEM_SIZE) arrives before the first bytes, and it is the RAM the -machine pc guest has.
        Assert.Equal(info.RamBytes, totalWhenFirstReported);
        Assert.True(totalWhenFirstReported > QemuStreams.RamBytes);

        string loaded = dir.File("loaded-ram0");
        QemuVm.LoadStream(QemuVm.MachinePc(loaded, QemuStreams.RamBytes), copy);
        Assert.Equal(GuestRam.Hash(qemu.PcRam), GuestRam.Hash(loaded));
    }

    [QemuFact]
    public void Qemu_refuses_what_we_refuse_a_stream_without_the_ram_section_footer()
    {
        VersionStreams qemu = streams.ForCurrent();
        // The footer rule is QEMU's: drop the RAM start's footer and both sides refuse.
        byte[] bytes = File.ReadAllBytes(qemu.NoneStream);
        int footer = StartFooterOffset(bytes);
        byte[] broken = [.. bytes.AsSpan(0, footer), .. bytes.AsSpan(footer + 5)];
        var e = Assert.Throws<MigrationStreamException>(() => ReadBytes(broken, r => MigrationStream.Inspect(r)));
        Assert.Equal(footer, e.Offset);
        Assert.Contains("footer (0x7e) of section 'ram'", e.Message);

        using var dir = new TempDir();
        string stream = dir.File("broken.mig");
        File.WriteAllBytes(stream, broken);
        var q = Assert.Throws<QemuException>(() => QemuVm.LoadStream(QemuVm.MachineNone(dir.File("ram"), QemuStreams.RamBytes), stream));
        Assert.Contains("footer", q.Message, StringComparison.OrdinalIgnoreCase);
    }

    [QemuFact]
    public void Corrupt_qemu_streams_are_refused_with_the_offset()
    {
        VersionStreams qemu = streams.ForCurrent();
        byte[] bytes = File.ReadAllBytes(qemu.NoneStream);
        MigrationStreamException Refuse(byte[] b) => Assert.Throws<MigrationStreamException>(() => ReadBytes(b, r => MigrationStream.Inspect(r)));

        // Truncated anywhere: in the header, the RAM block list, a page, the device state, the VM description.
        foreach (int cut in new[] { 6, 40, 100_000, bytes.Length / 2, bytes.Length - 600, bytes.Length - 10 })
        {
            var e = Refuse(bytes[..cut]);
            Assert.InRange(e.Offset, 0, cut);
            Assert.Contains($"offset {e.Offset}", e.Message);
        }

        // The first page record of the first part, flagged XBZRLE.
        int page = StartFooterOffset(bytes) + 5 + 5;
        byte[] xbzrle = (byte[])bytes.Clone();
        xbzrle[page + 7] |= 0x40;
        var x = Refuse(xbzrle);
        Assert.Equal(page, x.Offset);
        Assert.Contains("XBZRLE", x.Message);

        byte[] magic = (byte[])bytes.Clone();
        magic[0] = (byte)'X';
        Assert.Contains("not a QEMU migration stream", Refuse(magic).Message);

        byte[] wrongVersion = (byte[])bytes.Clone();
        wrongVersion[7] = 2;
        var v = Refuse(wrongVersion);
        Assert.Equal(4, v.Offset);
        Assert.Contains("version 2", v.Message);
    }

    [QemuFact]
    public void Blocks_and_files_that_do_not_match_are_refused_and_leave_files_untouched()
    {
        VersionStreams qemu = streams.ForCurrent();
        using var dir = new TempDir();
        // A block the stream does not have.
        string other = dir.File("ram1");
        var e = Assert.Throws<MigrationStreamException>(() => ReadInto(qemu.NoneStream, ("ram1", other)));
        Assert.Contains("'ram1'", e.Message);
        Assert.Contains("'ram0' (67108864 bytes)", e.Message);
        Assert.False(File.Exists(other));

        // An existing file of another length is not overwritten.
        string wrong = dir.File("wrong");
        File.WriteAllBytes(wrong, new byte[8192]);
        e = Assert.Throws<MigrationStreamException>(() => ReadInto(qemu.NoneStream, ("ram0", wrong)));
        Assert.Contains("8192 bytes", e.Message);
        Assert.Equal(8192, new FileInfo(wrong).Length);

        // Template: a replacement of the wrong length, and an unknown block.
        e = Assert.Throws<MigrationStreamException>(() => MachineProfile.FromTemplate(qemu.PcStream, Ram(("ram0", wrong)), dir.Path));
        Assert.Contains("must have the block's exact length", e.Message);
        e = Assert.Throws<MigrationStreamException>(() => MachineProfile.FromTemplate(qemu.PcStream, Ram(("ram9", qemu.PcRam)), dir.Path));
        Assert.Contains("'ram9'", e.Message);
        Assert.Contains("'pc.bios'", e.Message);
        Assert.Equal([Path.GetFileName(wrong)], Directory.GetFileSystemEntries(dir.Path).Select(Path.GetFileName)); // no scratch left
    }

    [QemuFact]
    public void A_stream_that_fails_midway_leaves_the_ram_file_as_it_was()
    {
        VersionStreams qemu = streams.ForCurrent();
        using var dir = new TempDir();
        string target = dir.File("ram0");
        File.WriteAllBytes(target, []);   // an existing file is replaced only once the load is complete (see RamFileSinkTests for in place)
        string before = GuestRam.Hash(target);
        byte[] bytes = File.ReadAllBytes(qemu.NoneStream);
        using (var sink = new RamFileSink(Ram(("ram0", target))))
            Assert.Throws<MigrationStreamException>(() => ReadBytes(bytes[..(bytes.Length - 100)], r => MigrationStream.Read(r, sink)));
        Assert.Equal(before, GuestRam.Hash(target));
        Assert.Equal(["ram0"], Directory.GetFileSystemEntries(dir.Path).Select(Path.GetFileName));
    }

    private static long AllocatedBytes(string path)
    {
        string[] stat = Tool.Check("stat", "-c", "%b %B", path).Split(' ', StringSplitOptions.TrimEntries);
        return long.Parse(stat[0]) * long.Parse(stat[1]);
    }

    private static int StartFooterOffset(byte[] stream)
    {
        // Header (8), configuration (5 + name), then the RAM start: find its EOS + footer.
        ReadOnlySpan<byte> eosFooter = [0, 0, 0, 0, 0, 0, 0, 0x10, 0x7e];
        return stream.AsSpan().IndexOf(eosFooter) + 8;
    }

    private static long VmDescriptionBytes(string stream) => VmDescriptionBytes2(File.ReadAllBytes(stream));

    private static long VmDescriptionBytes2(byte[] b)
    {
        for (int p = b.Length - 5; p > 0; p--)
            if (b[p] == 6 && b[p - 1] == 0 && BinaryPrimitives.ReadUInt32BigEndian(b.AsSpan(p + 1)) == b.Length - p - 5)
                return b.Length - p;
        throw new InvalidOperationException("no VM description");
    }

    private static byte[] Tail(string stream)
    {
        MigrationStreamInfo info = Inspect(stream);
        byte[] all = File.ReadAllBytes(stream);
        return all[(int)(all.Length - info.DeviceStateBytes)..];
    }
}

/// <summary>An IProgress that reports synchronously on the caller's thread (Progress&lt;T&gt; posts to the thread pool).</summary>
internal sealed class SyncProgress(Action<long> report) : IProgress<long>
{
    public void Report(long value) => report(value);
}

/// <summary>As <see cref="SyncProgress"/>, also told the stream's total RAM.</summary>
internal sealed class SyncRamProgress(Action<long> report, Action<long> total) : IRamProgress
{
    public void Report(long value) => report(value);

    public void ReportTotal(long ramBytes) => total(ramBytes);
}
