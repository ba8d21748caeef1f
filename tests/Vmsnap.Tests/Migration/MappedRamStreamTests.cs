using System.Buffers.Binary;
using Vmsnap.Migration;
using Vmsnap.Storage;
using Vmsnap.Tests.Interop;
using Vmsnap.VmState;
using static Vmsnap.Tests.Migration.StreamFiles;

namespace Vmsnap.Tests.Migration;

/// <summary>
/// Mapped-ram streams, early-setup sections and commands against bytes built by hand from the format
/// facts (QEMU's migration/ram.c and savevm.c, checked against QEMU 10.0.2's own files in the interop
/// tests): read, inspect, and rewritten in both directions.
/// </summary>
[Trait("Category", "Unit")]
public class MappedRamStreamTests
{
    private const uint RamId = 1;

    /// <summary>A block for a hand-built stream: its id and pages (null = a zero page).</summary>
    internal sealed record Block(string Id, byte[]?[] Pages)
    {
        public long Length => Pages.Length * 4096L;

        public byte[] Bytes()
        {
            byte[] all = new byte[Length];
            for (int i = 0; i < Pages.Length; i++) Pages[i]?.CopyTo(all, i * 4096);
            return all;
        }
    }

    private static Block[] Blocks(int seed)
    {
        var r = new Random(seed);
        byte[]?[] Pages(int n) => Enumerable.Range(0, n).Select(_ => r.Next(3) == 0 ? null : StreamBuilder.RandomPage(r)).ToArray();
        return [new Block("ram0", Pages(70)), new Block("pc.bios", Pages(5)), new Block("/rom@etc/acpi/rsdp", [StreamBuilder.RandomPage(r)])];
    }

    /// <summary>The device state after RAM's end: one device section and a VM description of the given configuration shape.</summary>
    private static byte[] DeviceTail(string machine, bool mappedRam, bool early = false)
    {
        string config = "{\"vmsd_name\": \"configuration\", \"version\": 1, \"fields\": [{\"name\": \"len\", \"type\": \"uint32\", \"size\": 4}, " +
            $"{{\"name\": \"name\", \"type\": \"buffer\", \"size\": {machine.Length}}}]" +
            (mappedRam ? ", \"subsections\": [{\"vmsd_name\": \"configuration/capabilities\", \"version\": 1, \"fields\": [{\"name\": \"caps_count\", \"type\": \"uint32\", \"size\": 4}, {\"name\": \"capabilities\", \"type\": \"capability\", \"size\": 11}]}]" : "") + "}";
        string earlyDevice = early
            ? "{\"name\": \"0000:00:02.0/virtio-mem-device-early\", \"instance_id\": 0, \"vmsd_name\": \"virtio-mem-device-early\", \"version\": 1, " +
              "\"fields\": [{\"name\": \"block-size\", \"type\": \"uint64\", \"size\": 8}, {\"name\": \"addr\", \"type\": \"uint64\", \"size\": 8}, " +
              "{\"name\": \"region-size\", \"type\": \"uint64\", \"size\": 8}]}, "
            : "";
        string json = $"{{\"configuration\": {config}, \"page_size\": 4096, \"devices\": [{earlyDevice}{{\"name\": \"timer\", \"instance_id\": 0, \"vmsd_name\": \"timer\", \"version\": 2, " +
            "\"fields\": [{\"name\": \"cpu_ticks_offset\", \"type\": \"int64\", \"size\": 8}]}]}";
        return new StreamBuilder().Full(3, "timer", 0, 2).Be64(0x1122334455667788).Footer(3).Tail(json).ToArray();
    }

    /// <summary>
    /// A mapped-ram file as QEMU 10.0 lays it out: the configuration lists mapped-ram; each block entry has its
    /// 28-byte header, the bitmap right after it, the pages at the next 1 MiB boundary, and the stream goes on
    /// after the pages; two empty parts, SWITCHOVER_START, an empty end. Returns the bytes and what QEMU counts
    /// as transferred (stream bytes + bitmaps + pages with data: a 10.2 snapshot's VM-state size).
    /// </summary>
    internal static (byte[] Bytes, long Transferred) MappedRamFile(Block[] blocks, string machine = "none", byte[]? early = null, int parts = 2)
    {
        var b = new StreamBuilder().Header().Configuration(machine)
            .U8(0x05).Id("configuration/capabilities").Be32(1).Be32(1).Id("mapped-ram")
            .Start(RamId).Be64((ulong)blocks.Sum(x => x.Length) | StreamBuilder.MemSize);
        var file = new List<byte>();
        long skipped = 0, placed = 0;
        void Flush()
        {
            file.AddRange(b.ToArray());
            b = new StreamBuilder();
        }
        foreach (Block block in blocks)
        {
            b.Id(block.Id).Be64((ulong)block.Length);
            long bitmapAt = file.Count + b.Length + 28;
            long bitmapBytes = (block.Pages.Length + 63) / 64 * 8;
            long pagesAt = (bitmapAt + bitmapBytes + (1 << 20) - 1) / (1 << 20) * (1 << 20);
            b.Be32(1).Be64(4096).Be64((ulong)bitmapAt).Be64((ulong)pagesAt);
            Flush();
            byte[] bitmap = new byte[bitmapBytes];
            byte[] region = new byte[pagesAt - bitmapAt + block.Length];
            for (int i = 0; i < block.Pages.Length; i++)
            {
                if (block.Pages[i] is not { } page) continue;
                bitmap[i / 8] |= (byte)(1 << (i % 8));      // little-endian 64-bit words: bit i is byte i/8, bit i%8
                page.CopyTo(region, pagesAt - bitmapAt + i * 4096L);
                placed += 4096;
            }
            bitmap.CopyTo(region, 0);
            placed += bitmapBytes;
            skipped += region.Length;
            file.AddRange(region);
        }
        b.EndOfRecords().Footer(RamId);
        if (early is not null) b.Raw(early);
        for (int i = 0; i < parts; i++) b.Part(RamId).EndOfRecords().Footer(RamId);
        b.U8(0x08).Be16(11).Be16(0)
            .End(RamId).EndOfRecords().Footer(RamId)
            .Raw(DeviceTail(machine, mappedRam: true, early is not null));
        Flush();
        return (file.ToArray(), file.Count - skipped + placed);
    }

    /// <summary>The same machine as a plain stream, the way vmsnap rewrites a mapped-ram file: pages in parts of their own before the source's parts.</summary>
    private static byte[] PlainStream(Block[] blocks, string machine = "none", byte[]? early = null)
    {
        var b = new StreamBuilder().Header().Configuration(machine)
            .Start(RamId).BlockList(blocks.Select(x => (x.Id, x.Length)).ToArray()).EndOfRecords().Footer(RamId);
        if (early is not null) b.Raw(early);
        b.Part(RamId);
        foreach (Block block in blocks)
        {
            for (int i = 0; i < block.Pages.Length; i++)
            {
                string? name = i == 0 ? block.Id : null;
                if (block.Pages[i] is { } page) b.PageRecord(i * 4096L, page, name);
                else b.ZeroRecord(i * 4096L, name);
            }
        }
        return b.EndOfRecords().Footer(RamId)
            .Part(RamId).EndOfRecords().Footer(RamId)
            .Part(RamId).EndOfRecords().Footer(RamId)
            .U8(0x08).Be16(11).Be16(0)
            .End(RamId).EndOfRecords().Footer(RamId)
            .Raw(DeviceTail(machine, mappedRam: false, early is not null))
            .ToArray();
    }

    /// <summary>An early-setup section as QEMU 10 writes virtio-mem's: a full section with fixed fields and its footer.</summary>
    private static byte[] EarlySection() =>
        new StreamBuilder().Full(38, "0000:00:02.0/virtio-mem-device-early", 0, 1).Be64(0x200000).Be64(0).Be64(0x08000000).Footer(38).ToArray();

    private static MigrationStreamInfo ReadInto(byte[] stream, Block[] blocks, TempDir dir, long? length = null)
    {
        var files = blocks.Select((b, i) => new KeyValuePair<string, string>(b.Id, dir.File($"out{i}"))).ToArray();
        MigrationStreamInfo info;
        using (var sink = new RamFileSink(files))
            info = length is long l
                ? ReadBytes(stream, r => MigrationStream.Parse(r, l, sink))
                : ReadBytes(stream, r => MigrationStream.Read(r, sink));
        for (int i = 0; i < blocks.Length; i++) Assert.Equal(blocks[i].Bytes(), File.ReadAllBytes(files[i].Value));
        return info;
    }

    [Fact]
    public void A_mapped_ram_file_reads_back_its_pages_and_lists_blocks_with_their_offsets()
    {
        using var dir = new TempDir();
        Block[] blocks = Blocks(1);
        var (file, _) = MappedRamFile(blocks);
        MigrationStreamInfo info = ReadInto(file, blocks, dir);
        Assert.True(info.IsMappedRam);
        Assert.Equal(["mapped-ram"], info.Capabilities);
        Assert.Equal(file.Length, info.TotalBytes);
        Assert.Equal(blocks.Select(b => b.Id), info.RamBlocks.Select(b => b.Id));
        for (int i = 0; i < blocks.Length; i++)
        {
            Assert.Equal(blocks[i].Pages.Count(p => p is not null), info.RamBlocks[i].Pages);
            Assert.Equal(blocks[i].Pages.Count(p => p is null), info.RamBlocks[i].ZeroPages);
            Assert.Equal(0, info.RamBlocks[i].PagesOffset % (1 << 20));
        }
        Assert.Equal(1 << 20, info.RamBlocks[0].PagesOffset);
        Assert.Equal(["configuration", "ram", "SWITCHOVER_START", "timer"], info.Sections.Select(s => s.Name));
        Assert.Equal(info.RamBlocks, ReadBytes(file, r => MigrationStream.Inspect(r)).RamBlocks);
    }

    [Fact]
    public void A_mapped_ram_file_is_rewritten_as_the_plain_stream_and_a_plain_one_as_the_mapped_ram_file()
    {
        Block[] blocks = Blocks(2);
        byte[] early = EarlySection();
        var (mapped, _) = MappedRamFile(blocks, "pc-i440fx-10.0", early);
        byte[] plain = PlainStream(blocks, "pc-i440fx-10.0", early);

        var (toPlain, info) = WriteBytes(w => ReadBytes(mapped, r => MigrationStream.Copy(r, w, MigrationStreamFormat.Plain)));
        Assert.Equal(plain, toPlain);
        Assert.True(info.IsMappedRam);
        Assert.Contains(info.Sections, s => s.Kind == MigrationSectionKind.EarlySetup && s.Name == "0000:00:02.0/virtio-mem-device-early");
        Assert.Null(info.DeviceStateProblem);

        // And back: the plain stream as a mapped-ram file is QEMU's layout, byte for byte (zero pages left as holes;
        // the plain stream's three parts stay, emptied).
        var (toMapped, _) = WriteBytes(w => ReadBytes(plain, r => MigrationStream.Copy(r, w, MigrationStreamFormat.MappedRam)));
        Assert.Equal(MappedRamFile(blocks, "pc-i440fx-10.0", early, parts: 3).Bytes, toMapped);
        // A mapped-ram file rewritten as one again keeps its layout.
        var (again, _) = WriteBytes(w => ReadBytes(mapped, r => MigrationStream.Copy(r, w, MigrationStreamFormat.MappedRam)));
        Assert.Equal(mapped, again);
        // A plain copy of a plain stream stays byte for byte.
        var (same, _) = WriteBytes(w => ReadBytes(plain, r => MigrationStream.Copy(r, w)));
        Assert.Equal(plain, same);
    }

    [Theory]
    [InlineData(VmStateWriteMode.Gather)]
    [InlineData(VmStateWriteMode.Buffered)]
    public void Both_writer_modes_write_the_same_mapped_ram_file(VmStateWriteMode mode)
    {
        Block[] blocks = Blocks(3);
        var (mapped, _) = MappedRamFile(blocks, parts: 3);
        var (bytes, _) = WriteBytes(w => ReadBytes(PlainStream(blocks), r => MigrationStream.Copy(r, w, MigrationStreamFormat.MappedRam)), mode);
        Assert.Equal(mapped, bytes);
    }

    [Fact]
    public void In_a_larger_area_a_mapped_ram_stream_ends_where_its_transferred_size_says()
    {
        // QEMU 10.2's savevm records what it wrote (stream bytes, bitmaps, pages with data) as the VM-state size;
        // the area holds the layout, and whatever lies after it.
        using var dir = new TempDir();
        Block[] blocks = Blocks(4);
        var (file, transferred) = MappedRamFile(blocks);
        Assert.True(transferred < file.Length);
        byte[] area = [.. file, .. new byte[3 << 20]];
        area[file.Length + 5] = 0x55; // not part of the stream
        MigrationStreamInfo info = ReadInto(area, blocks, dir, transferred);
        Assert.Equal(file.Length, info.TotalBytes);
        var e = Assert.Throws<MigrationStreamException>(() => ReadBytes(area, r => MigrationStream.Parse(r, transferred - 300)));
        Assert.Contains("does not end with EOF", e.Message);
        // A plain stream in a larger area ends at its size.
        byte[] plain = PlainStream(blocks);
        Assert.Equal(plain.Length, ReadBytes([.. plain, .. new byte[8192]], r => MigrationStream.Parse(r, plain.Length)).TotalBytes);
    }

    [Fact]
    public void Bad_mapped_ram_headers_and_records_are_refused_with_the_offset()
    {
        Block[] blocks = [new Block("ram0", [StreamBuilder.PageOf(1), null])];
        var (file, _) = MappedRamFile(blocks);
        // Header 8, configuration 9 + capabilities subsection 47, START 17, MEM_SIZE 8, the block's id 5 and length 8.
        int header = 8 + 9 + 47 + 17 + 8 + 5 + 8;
        Assert.Equal(1u, BinaryPrimitives.ReadUInt32BigEndian(file.AsSpan(header)));

        MigrationStreamException Refused(byte[] b) => Assert.Throws<MigrationStreamException>(() => ReadBytes(b, r => MigrationStream.Inspect(r)));
        byte[] Patched(int at, ulong value, int size)
        {
            byte[] b = (byte[])file.Clone();
            if (size == 4) BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(at), (uint)value);
            else BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan(at), value);
            return b;
        }
        var e = Refused(Patched(header, 2, 4));
        Assert.Equal(header, e.Offset);
        Assert.Contains("version 2", e.Message);
        Assert.Contains("pages of 8192 bytes", Refused(Patched(header + 4, 8192, 8)).Message);
        Assert.Contains("places the bitmap at 10", Refused(Patched(header + 12, 10, 8)).Message);
        Assert.Contains("4 KiB-aligned", Refused(Patched(header + 20, (1 << 20) + 100, 8)).Message);

        // From a pipe: refused before any page, saying why.
        var p = Assert.Throws<MigrationStreamException>(() =>
        {
            using var reader = new VmStateReader(VmStateBackend.ForStream(new MemoryStream(file)));
            MigrationStream.Inspect(reader);
        });
        Assert.Contains("placed by file offset", p.Message);

        // A page record where mapped-ram has none.
        byte[] withPage = new StreamBuilder().Header().Configuration("none")
            .U8(0x05).Id("configuration/capabilities").Be32(1).Be32(1).Id("mapped-ram")
            .Start(RamId).Be64(4096 | StreamBuilder.MemSize).Id("ram0").Be64(4096).Be32(1).Be64(4096).Be64(130).Be64(1 << 20).ToArray();
        withPage = [.. withPage, .. new byte[(1 << 20) + 4096 - withPage.Length]];
        withPage = [.. withPage, .. new StreamBuilder().EndOfRecords().Footer(RamId).Part(RamId).PageRecord(0, StreamBuilder.PageOf(2), "ram0").ToArray()];
        Assert.Contains("in a mapped-ram stream", Refused(withPage).Message);

        // A mapped-ram copy into a channel.
        var c = Assert.Throws<MigrationStreamException>(() =>
        {
            using var backend = VmStateBackend.ForStream(new MemoryStream());
            using var writer = new VmStateWriter(backend);
            ReadBytes(PlainStream(blocks), r => MigrationStream.Copy(r, writer, MigrationStreamFormat.MappedRam));
        });
        Assert.Contains("write it to a file", c.Message);
    }

    [Fact]
    public void Early_setup_sections_and_switchover_start_are_carried_and_a_template_writes_them_back()
    {
        using var dir = new TempDir();
        Block[] blocks = Blocks(5);
        byte[] early = [.. EarlySection(), .. new StreamBuilder().Full(39, "second-early", 0, 1).Be32(7).Footer(39).ToArray()];
        byte[] plain = PlainStream(blocks, "pc-i440fx-10.0", early);
        MigrationStreamInfo info = ReadBytes(plain, r => MigrationStream.Inspect(r));
        Assert.Equal(["0000:00:02.0/virtio-mem-device-early", "second-early"],
            info.Sections.Where(s => s.Kind == MigrationSectionKind.EarlySetup).Select(s => s.Name));
        Assert.Single(info.Sections, s => s.Kind == MigrationSectionKind.Command && s.Id == 11);
        // The VM description does not know the second one: said, not refused (QEMU loads without the description).
        Assert.Contains("second-early", info.DeviceStateProblem);

        string template = dir.File("t.mig");
        File.WriteAllBytes(template, plain);
        string ram0 = dir.File("ram0");
        File.WriteAllBytes(ram0, blocks[0].Bytes());
        using var profile = MachineProfile.FromTemplate(template, Ram(("ram0", ram0)), dir.Path);
        var (written, _) = WriteBytes(w => MigrationStream.Write(w, profile));
        MigrationStreamInfo again = ReadBytes(written, r => MigrationStream.Inspect(r));
        Assert.Equal(info.Sections.Where(s => s.Kind != MigrationSectionKind.Ram).Select(s => (s.Kind, s.Name, s.Bytes)),
            again.Sections.Where(s => s.Kind != MigrationSectionKind.Ram).Select(s => (s.Kind, s.Name, s.Bytes)));
        // Right after the RAM section's start, byte for byte; the command right before its end.
        int at = IndexOf(written, early);
        Assert.True(at > 0, "the early-setup sections are not in the written stream");
        Assert.Equal([0, 0, 0, 0, 0, 0, 0, 0x10, 0x7e, 0, 0, 0, 1], written[(at - 13)..at]);   // EOS and footer of the start
        Assert.Equal(0x02, written[at + early.Length]);                                           // then the first part
        Assert.Equal(written.Length - DeviceTail("pc-i440fx-10.0", false, early: true).Length - 18 - 5, IndexOf(written, [0x08, 0, 11, 0, 0]));
    }

    private static int IndexOf(byte[] haystack, byte[] needle) => haystack.AsSpan().IndexOf(needle);

    [Fact]
    public void A_QEMU_7_2_shaped_description_gets_the_configuration_object_a_mapped_ram_file_needs_and_loses_it_again()
    {
        // QEMU 7.2 writes no configuration object; a mapped-ram file is for QEMU 9.0+, whose description has one,
        // listing the capabilities subsection. The device list stays byte for byte.
        Block[] blocks = Blocks(7);
        string devices = "\"devices\": [{\"name\": \"timer\", \"instance_id\": 0, \"vmsd_name\": \"timer\", \"version\": 2, \"fields\": [{\"name\": \"cpu_ticks_offset\", \"type\": \"int64\", \"size\": 8}]}]";
        byte[] plain = new StreamBuilder().Header().Configuration("pc-i440fx-7.2")
            .Start(2).BlockList(blocks.Select(x => (x.Id, x.Length)).ToArray()).EndOfRecords().Footer(2)
            .Part(2).PageRecord(0, StreamBuilder.PageOf(9), "ram0").EndOfRecords().Footer(2)
            .End(2).EndOfRecords().Footer(2)
            .Full(3, "timer", 0, 2).Be64(1).Footer(3)
            .Tail("{\"page_size\": 4096, " + devices + "}")
            .ToArray();
        var (mapped, _) = WriteBytes(w => ReadBytes(plain, r => MigrationStream.Copy(r, w, MigrationStreamFormat.MappedRam)));
        string json = Description(mapped);
        Assert.Equal("{\"configuration\": {\"vmsd_name\": \"configuration\", \"version\": 1, \"fields\": [{\"name\": \"len\", \"type\": \"uint32\", \"size\": 4}, " +
            "{\"name\": \"name\", \"type\": \"buffer\", \"size\": 13}], \"subsections\": [{\"vmsd_name\": \"configuration/capabilities\", \"version\": 1, " +
            "\"fields\": [{\"name\": \"caps_count\", \"type\": \"uint32\", \"size\": 4}, {\"name\": \"capabilities\", \"type\": \"capability\", \"size\": 11}]}]}, " +
            "\"page_size\": 4096, " + devices + "}", json);
        System.Text.Json.JsonDocument.Parse(json).Dispose();
        MigrationStreamInfo info = ReadBytes(mapped, r => MigrationStream.Inspect(r));
        Assert.True(info.IsMappedRam && info.DescriptionHasConfiguration);
        Assert.Null(info.DeviceStateProblem);

        // Back to plain: the capabilities subsection goes, the configuration object (now QEMU 8.2's shape) stays.
        var (again, _) = WriteBytes(w => ReadBytes(mapped, r => MigrationStream.Copy(r, w)));
        Assert.DoesNotContain("capabilities", Description(again));
        Assert.StartsWith("{\"configuration\": {", Description(again));
        Assert.EndsWith("\"size\": 13}]}, \"page_size\": 4096, " + devices + "}", Description(again));
    }

    private static string Description(byte[] stream)
    {
        for (int p = stream.Length - 5; p > 0; p--)
            if (stream[p] == 6 && stream[p - 1] == 0 && BinaryPrimitives.ReadUInt32BigEndian(stream.AsSpan(p + 1)) == stream.Length - p - 5)
                return System.Text.Encoding.UTF8.GetString(stream, p + 5, stream.Length - p - 5);
        throw new InvalidOperationException("no VM description");
    }

    [Fact]
    public void A_snapshot_sized_plain_area_needs_its_size()
    {
        byte[] plain = PlainStream(Blocks(6));
        var e = Assert.Throws<MigrationStreamException>(() => ReadBytes(plain, r => MigrationStream.Parse(r, plain.Length + 100)));
        Assert.Contains("ends at", e.Message);
    }
}
