using Vmsnap.Migration;
using Vmsnap.Tests.Interop;
using Vmsnap.VmState;
using static Vmsnap.Tests.Migration.StreamFiles;

namespace Vmsnap.Tests.Migration;

/// <summary>Whole streams written and read against hand-built bytes, and round trips.</summary>
[Trait("Category", "Unit")]
public class MigrationStreamTests
{
    /// <summary>QEMU 7.2's VM description of a machine without device sections.</summary>
    private const string EmptyDescription = "{\"page_size\": 4096, \"devices\": []}";

    /// <summary>
    /// QEMU 8.2+'s: a configuration object first, describing the configuration section (as QEMU 10.0.2 writes it for
    /// <c>-machine none</c>; the name's size is the machine type's length).
    /// </summary>
    internal static string DescriptionWithConfiguration(string machine) =>
        "{\"configuration\": {\"vmsd_name\": \"configuration\", \"version\": 1, \"fields\": [{\"name\": \"len\", \"type\": \"uint32\", \"size\": 4}, " +
        $"{{\"name\": \"name\", \"type\": \"buffer\", \"size\": {machine.Length}}}]}}, \"page_size\": 4096, \"devices\": []}}";

    [Theory]
    [InlineData(null)]
    [InlineData("10.0")]
    [InlineData("7.2")]
    public void Write_for_machine_none_gives_the_bytes_the_format_prescribes(string? qemu)
    {
        using var dir = new TempDir();
        var random = new Random(2);
        byte[] p0 = StreamBuilder.RandomPage(random), p2 = StreamBuilder.RandomPage(random);
        string ram = dir.File("ram0");
        File.WriteAllBytes(ram, [.. p0, .. new byte[4096], .. p2]);

        using var profile = MachineProfile.Create("none", Ram(("ram0", ram)), qemu is null ? null : Version.Parse(qemu));
        var (bytes, info) = WriteBytes(w => MigrationStream.Write(w, profile));

        uint id = qemu == "7.2" ? 2u : 1u;   // as QEMU 7.2 and 10.0 number the RAM section of machine none
        byte[] expected = new StreamBuilder()
            .Header()
            .Configuration("none")
            .Start(id).BlockList(("ram0", 3 * 4096)).EndOfRecords().Footer(id)
            .Part(id).PageRecord(0, p0, "ram0").ZeroRecord(0x1000).PageRecord(0x2000, p2).EndOfRecords().Footer(id)
            .End(id).EndOfRecords().Footer(id)
            .Tail(qemu == "7.2" ? EmptyDescription : DescriptionWithConfiguration("none"))
            .ToArray();
        Assert.Equal(expected, bytes);
        Assert.Equal(qemu != "7.2", info.DescriptionHasConfiguration);
        Assert.Equal(expected.Length, info.TotalBytes);
        Assert.Equal("none", info.MachineType);
        Assert.Equal([new RamBlockSummary("ram0", 3 * 4096, 2, 1)], info.RamBlocks);
        Assert.Equal(["configuration", "ram"], info.Sections.Select(s => s.Name));
        Assert.Equal(3, info.Sections[1].Count); // start, one part, end
    }

    [Fact]
    public void Each_part_names_its_block_again()
    {
        using var dir = new TempDir();
        var random = new Random(3);
        byte[] a0 = StreamBuilder.RandomPage(random), a1 = StreamBuilder.RandomPage(random), b0 = StreamBuilder.RandomPage(random);
        string a = dir.File("a"), b = dir.File("b");
        File.WriteAllBytes(a, [.. a0, .. a1]);
        File.WriteAllBytes(b, b0);

        using var profile = MachineProfile.Create("pc", Ram(("a", a), ("b", b)), new Version(7, 2));
        var (bytes, info) = WriteBytes(w => TestHooks.WriteInParts(w, profile, partBytes: 4096, chunkBytes: 4096));

        byte[] expected = new StreamBuilder()
            .Header()
            .Configuration("pc")
            .Start(2).BlockList(("a", 8192), ("b", 4096)).EndOfRecords().Footer(2)
            .Part(2).PageRecord(0, a0, "a").EndOfRecords().Footer(2)
            .Part(2).PageRecord(0x1000, a1, "a").EndOfRecords().Footer(2)
            .Part(2).PageRecord(0, b0, "b").EndOfRecords().Footer(2)
            .End(2).EndOfRecords().Footer(2)
            .Tail(EmptyDescription)
            .ToArray();
        Assert.Equal(expected, bytes);
        Assert.Equal(5, info.Sections[1].Count);
    }

    /// <summary>Two blocks; a page re-sent as zero; CONTINUE across a part boundary; a ZERO record with a fill byte.</summary>
    private static (byte[] Stream, byte[] A, byte[] B, byte[] P1, byte[] P3) HandBuiltStream()
    {
        var random = new Random(4);
        byte[] p0 = StreamBuilder.RandomPage(random), p1 = StreamBuilder.RandomPage(random), p3 = StreamBuilder.RandomPage(random);
        byte[] stream = new StreamBuilder()
            .Header()
            .Configuration("none")
            .Start(7).BlockList(("a", 4 * 4096), ("b", 2 * 4096)).EndOfRecords().Footer(7)
            .Part(7)
                .PageRecord(0, p0, "a").PageRecord(0x1000, p1)
                .ZeroRecord(0, "b")
                .PageRecord(0x3000, p3, "a")
                .EndOfRecords().Footer(7)
            .Part(7)
                .ZeroRecord(0x2000)              // CONTINUE: still block a
                .ZeroRecord(0)                   // page 0 of a re-sent as zero
                .ZeroRecord(0x1000, "b", 0x5a)   // old-style filled page
                .EndOfRecords().Footer(7)
            .End(7).EndOfRecords().Footer(7)
            .Full(3, "timer", 0, 2).Raw(new byte[24]).Footer(3)
            .Tail("{\"page_size\": 4096, \"devices\": [{\"name\": \"timer\", \"instance_id\": 0, \"vmsd_name\": \"timer\", \"version\": 2, " +
                  "\"fields\": [{\"name\": \"cpu_ticks_offset\", \"type\": \"int64\", \"size\": 8}, {\"name\": \"unused\", \"type\": \"unused_buffer\", \"size\": 8}, " +
                  "{\"name\": \"cpu_clock_offset\", \"type\": \"int64\", \"size\": 8}]}]}")
            .ToArray();
        byte[] a = [.. new byte[4096], .. p1, .. new byte[4096], .. p3];
        byte[] b = [.. new byte[4096], .. StreamBuilder.PageOf(0x5a)];
        return (stream, a, b, p1, p3);
    }

    private sealed class RecordingSink : IRamSink
    {
        public List<string> Calls { get; } = new();
        public void BeginBlocks(IReadOnlyList<RamBlockInfo> blocks) => Calls.Add("blocks " + string.Join(",", blocks.Select(b => $"{b.Id}:{b.Length}")));
        public void WritePages(int block, long offset, ReadOnlySpan<byte> pages) => Calls.Add($"data {block} {offset:x} {pages.Length:x}");
        public void WriteZeroPages(int block, long offset, long length) => Calls.Add($"zero {block} {offset:x} {length:x}");
        public void Complete() => Calls.Add("complete");
    }

    [Fact]
    public void Read_hands_pages_to_the_sink_in_runs_in_stream_order()
    {
        var (stream, _, _, _, _) = HandBuiltStream();
        var sink = new RecordingSink();
        MigrationStreamInfo info = ReadBytes(stream, r => MigrationStream.Read(r, sink));
        Assert.Equal(
        [
            "blocks a:16384,b:8192",
            "data 0 0 2000",      // a@0 and a@0x1000 batched
            "zero 1 0 1000",
            "data 0 3000 1000",
            "zero 0 2000 1000",   // end of part flushes; CONTINUE refers to a
            "zero 0 0 1000",
            "data 1 1000 1000",   // the 0x5a page
            "complete",
        ], sink.Calls);
        Assert.Equal([new RamBlockSummary("a", 16384, 3, 2), new RamBlockSummary("b", 8192, 0, 2)], info.RamBlocks);
        Assert.Equal(stream.Length, info.TotalBytes);
        Assert.Equal(["configuration", "ram", "timer"], info.Sections.Select(s => s.Name));
        Assert.Equal([-1L, 7L, 3L], info.Sections.Select(s => s.Id));
        Assert.Null(info.DeviceStateProblem);
        MigrationDeviceInfo timer = Assert.Single(info.Devices);
        Assert.Equal(("timer", 0u, 2u, 24L), (timer.Name, timer.Instance, timer.Version, timer.FieldBytes));
    }

    [Fact]
    public void Ram_file_sink_writes_each_block_and_punches_pages_sent_again_as_zero()
    {
        var (stream, a, b, _, _) = HandBuiltStream();
        using var dir = new TempDir();
        string fa = dir.File("a"), fb = dir.File("b");
        File.WriteAllBytes(fb, []); // an existing empty file is fine
        using (var sink = new RamFileSink(Ram(("a", fa), ("b", fb))))
            ReadBytes(stream, r => MigrationStream.Read(r, sink));
        Assert.Equal(a, File.ReadAllBytes(fa));
        Assert.Equal(b, File.ReadAllBytes(fb));
        Assert.Equal([Path.GetFileName(fa), Path.GetFileName(fb)], Directory.GetFiles(dir.Path).Select(Path.GetFileName).Order());
    }

    [Fact]
    public void Inspect_and_copy_agree_with_read()
    {
        var (stream, _, _, _, _) = HandBuiltStream();
        MigrationStreamInfo inspected = ReadBytes(stream, r => MigrationStream.Inspect(r));
        var (copy, copied) = WriteBytes(w => ReadBytes(stream, r => MigrationStream.Copy(r, w)));
        Assert.Equal(stream, copy);
        Assert.Equal(inspected.RamBlocks, copied.RamBlocks);
        Assert.Equal(inspected.Sections, copied.Sections);
        Assert.Equal(stream.Length, copied.TotalBytes);
    }

    [Fact]
    public void A_template_keeps_configuration_blocks_and_device_state_and_replaces_the_blocks_given()
    {
        var (template, _, b, _, _) = HandBuiltStream();
        // Add a UUID subsection to the configuration: it must be written back as it was.
        int configEnd = 8 + 1 + 4 + 4;
        byte[] uuid = new StreamBuilder().U8(0x05).Id("configuration/uuid").Be32(1).Raw(Enumerable.Range(1, 16).Select(i => (byte)i).ToArray()).ToArray();
        template = [.. template.AsSpan(0, configEnd), .. uuid, .. template.AsSpan(configEnd)];

        using var dir = new TempDir();
        string newA = dir.File("new-a");
        byte[] a = new byte[4 * 4096];
        new Random(5).NextBytes(a.AsSpan(4096, 4096));
        File.WriteAllBytes(newA, a);

        using var profile = ReadBytes(template, r => MachineProfile.FromTemplate(r, Ram(("a", newA)), dir.Path));
        Assert.Equal("none", profile.MachineType);
        Assert.Equal([new RamBlockInfo("a", 4 * 4096), new RamBlockInfo("b", 2 * 4096)], profile.RamBlocks);
        var (written, _) = WriteBytes(w => MigrationStream.Write(w, profile));

        Assert.Equal(template.AsSpan(0, configEnd + uuid.Length).ToArray(), written[..(configEnd + uuid.Length)]);
        byte[] tail = template[^(profile.DeviceState.Length)..];
        Assert.Equal(tail, written[^tail.Length..]);
        Assert.Equal(0x04, tail[0]); // the tail starts with the timer's full section

        string ra = dir.File("ra"), rb = dir.File("rb");
        using (var sink = new RamFileSink(Ram(("a", ra), ("b", rb))))
            ReadBytes(written, r => MigrationStream.Read(r, sink));
        Assert.Equal(a, File.ReadAllBytes(ra));
        Assert.Equal(b, File.ReadAllBytes(rb));
    }

    [Fact]
    public void Profiles_from_options_refuse_bad_files_and_ids()
    {
        using var dir = new TempDir();
        string odd = dir.File("odd"), good = dir.File("good"), empty = dir.File("empty");
        File.WriteAllBytes(odd, new byte[5000]);
        File.WriteAllBytes(good, new byte[8192]);
        File.WriteAllBytes(empty, []);
        MigrationStreamException Refuse(params (string, string)[] ram) =>
            Assert.Throws<MigrationStreamException>(() => MachineProfile.Create("none", Ram(ram)));

        Assert.Contains("5000 bytes", Refuse(("ram0", odd)).Message);
        Assert.Contains("0 bytes", Refuse(("ram0", empty)).Message);
        Assert.Contains("does not exist", Refuse(("ram0", dir.File("missing"))).Message);
        Assert.Contains("more than once", Refuse(("ram0", good), ("ram0", good)).Message);
        Assert.Contains("longer than 255", Refuse((new string('x', 256), good)).Message);
        Assert.Contains("no RAM block", Refuse().Message);
        Assert.Throws<MigrationStreamException>(() => MachineProfile.Create("", Ram(("ram0", good))));
    }

    [Fact]
    public void A_ram_file_that_changes_length_before_the_write_is_refused()
    {
        using var dir = new TempDir();
        string ram = dir.File("ram0");
        File.WriteAllBytes(ram, new byte[8192]);
        using var profile = MachineProfile.Create("none", Ram(("ram0", ram)));
        File.WriteAllBytes(ram, new byte[4096]);
        var e = Assert.Throws<MigrationStreamException>(() => WriteBytes(w => MigrationStream.Write(w, profile)));
        Assert.Contains("4096 bytes, expected 8192", e.Message);
    }

    [Fact]
    public void A_failing_destination_stops_the_write_with_its_error()
    {
        using var dir = new TempDir();
        string ram = dir.File("ram0");
        File.WriteAllBytes(ram, Enumerable.Range(0, 64 * 4096).Select(i => (byte)(i * 7 + 1)).ToArray());
        using var profile = MachineProfile.Create("none", Ram(("ram0", ram)));
        using var backend = new FailingBackend(failAfter: 100_000);
        using var writer = new VmStateWriter(backend);
        var e = Assert.Throws<VmStateException>(() => TestHooks.WriteInParts(writer, profile, 1 << 20, 8192));
        Assert.Same(backend.Failure, e.InnerException);
    }

    [Fact]
    public void Cancellation_stops_a_read_and_leaves_the_files_alone()
    {
        var (stream, _, _, _, _) = HandBuiltStream();
        using var dir = new TempDir();
        using var cancel = new CancellationTokenSource();
        cancel.Cancel();
        using (var sink = new RamFileSink(Ram(("a", dir.File("a")))))
            Assert.ThrowsAny<OperationCanceledException>(() => ReadBytes(stream, r => MigrationStream.Read(r, sink, null, cancel.Token)));
        Assert.Empty(Directory.GetFileSystemEntries(dir.Path));
    }

    [Fact]
    public void Random_profiles_round_trip_through_write_read_inspect_and_copy()
    {
        for (int seed = 0; seed < 25; seed++)
        {
            var random = new Random(seed);
            using var dir = new TempDir();
            int blockCount = random.Next(1, 4);
            var ram = new List<(string Id, string File)>();
            long zero = 0;
            for (int i = 0; i < blockCount; i++)
            {
                string id = i == 0 ? "ram0" : $"/rom@etc/block{i}";
                int pages = random.Next(1, 40);
                byte[] data = new byte[pages * 4096];
                for (int p = 0; p < pages; p++)
                {
                    if (random.Next(3) == 0) { zero++; continue; }
                    random.NextBytes(data.AsSpan(p * 4096, 4096));
                    data[p * 4096 + random.Next(4096)] = 0xff;
                }
                File.WriteAllBytes(dir.File($"src{i}"), data);
                ram.Add((id, dir.File($"src{i}")));
            }
            long partBytes = 4096L * random.Next(1, 20);
            int chunkBytes = 4096 * random.Next(1, 10);

            using var profile = MachineProfile.Create(random.Next(2) == 0 ? "none" : "pc-i440fx-7.2", Ram([.. ram]));
            var (bytes, written) = WriteBytes(w => TestHooks.WriteInParts(w, profile, partBytes, chunkBytes), VmStateWriteMode.Gather);
            var (buffered, _) = WriteBytes(w => TestHooks.WriteInParts(w, profile, partBytes, chunkBytes), VmStateWriteMode.Buffered);
            Assert.Equal(bytes, buffered);
            Assert.Equal(zero, written.ZeroPages);

            var outputs = ram.Select((r, i) => (r.Id, dir.File($"out{i}"))).ToArray();
            using (var sink = new RamFileSink(Ram(outputs)))
                ReadBytes(bytes, r => MigrationStream.Read(r, sink));
            for (int i = 0; i < ram.Count; i++)
                Assert.Equal(File.ReadAllBytes(ram[i].File), File.ReadAllBytes(outputs[i].Item2));

            MigrationStreamInfo inspected = ReadBytes(bytes, r => MigrationStream.Inspect(r));
            Assert.Equal(written.RamBlocks, inspected.RamBlocks);
            Assert.Equal(written.Sections, inspected.Sections);
            var (copy, _) = WriteBytes(w => ReadBytes(bytes, r => MigrationStream.Copy(r, w)));
            Assert.Equal(bytes, copy);
        }
    }

    /// <summary>A backend whose writes fail once <c>failAfter</c> bytes have been written.</summary>
    private sealed class FailingBackend(long failAfter) : VmStateBackend
    {
        private long _written;

        public IOException Failure { get; } = new("injected write failure");

        public override void WriteVectored(ReadOnlySpan<ReadOnlyMemory<byte>> segments, long position)
        {
            foreach (var s in segments) _written += s.Length;
            if (_written > failAfter) throw Failure;
        }

        public override int Read(Span<byte> buffer, long position) => 0;
    }
}
