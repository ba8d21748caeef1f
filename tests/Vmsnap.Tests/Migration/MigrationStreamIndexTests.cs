using Vmsnap.Migration;
using Vmsnap.Tests.Interop;
using static Vmsnap.Tests.Migration.StreamFiles;

namespace Vmsnap.Tests.Migration;

/// <summary>
/// The index of a stream (where each page and the device state lie), from one pass without page data: checked
/// against streams built by hand from the format facts and against QEMU's own streams and guest RAM.
/// </summary>
[Trait("Category", "Unit")]
public sealed class MigrationStreamIndexTests(QemuStreams streams) : IClassFixture<QemuStreams>
{
    private static MigrationStreamIndex Index(byte[] stream, long? length = null) =>
        ReadBytes(stream, r => MigrationStreamIndex.Build(r, length));

    /// <summary>The page a location says: the bytes at its offset, or a page of its fill byte; zero when missing.</summary>
    private static byte[] PageAt(byte[] stream, PageLocation location) => location.Kind switch
    {
        PageKind.Data => stream.AsSpan((int)location.Offset, 4096).ToArray(),
        PageKind.Filled => StreamBuilder.PageOf(location.Fill),
        _ => new byte[4096],
    };

    [Fact]
    public void Each_page_is_found_where_its_last_record_put_it_and_the_device_state_where_the_ram_section_ends()
    {
        var random = new Random(21);
        byte[] p0 = StreamBuilder.RandomPage(random), p1 = StreamBuilder.RandomPage(random), p2 = StreamBuilder.RandomPage(random),
            again = StreamBuilder.RandomPage(random), b1 = StreamBuilder.RandomPage(random);
        var builder = new StreamBuilder()
            .Header().Configuration("none")
            .Start(7).BlockList(("a", 5 * 4096), ("b", 2 * 4096)).EndOfRecords().Footer(7)
            .Part(7)
                .PageRecord(0, p0, "a").PageRecord(0x1000, p1).PageRecord(0x2000, p2)   // one run of three
                .ZeroRecord(0x3000)
                .PageRecord(0x1000, b1, "b")
                .EndOfRecords().Footer(7)
            .Part(7)
                .ZeroRecord(0, "a")                  // page 0 of a sent again as zero
                .PageRecord(0x2000, again)           // page 2 of a sent again with other data
                .ZeroRecord(0, "b", 0x5a)            // old QEMU's page of one byte
                .EndOfRecords().Footer(7)
            .End(7).EndOfRecords().Footer(7);
        int deviceState = builder.Length;
        byte[] stream = builder
            .Full(3, "timer", 0, 2).Raw(new byte[24]).Footer(3)
            .Tail("{\"page_size\": 4096, \"devices\": [{\"name\": \"timer\", \"instance_id\": 0, \"vmsd_name\": \"timer\", \"version\": 2, " +
                  "\"fields\": [{\"name\": \"a\", \"type\": \"buffer\", \"size\": 24}]}]}")
            .ToArray();

        MigrationStreamIndex index = Index(stream);
        Assert.Equal([new RamBlockInfo("a", 5 * 4096), new RamBlockInfo("b", 2 * 4096)], index.Blocks);
        Assert.Equal(17, index.RamStartOffset);
        Assert.Equal(deviceState, index.DeviceStateOffset);
        Assert.Equal(stream.Length - deviceState, index.DeviceStateLength);
        Assert.Equal(0x04, stream[index.DeviceStateOffset]);
        Assert.False(index.IsMappedRam);

        byte[][] a = [new byte[4096], p1, again, new byte[4096], new byte[4096]];
        PageKind[] aKinds = [PageKind.Filled, PageKind.Data, PageKind.Data, PageKind.Filled, PageKind.Missing];
        for (int page = 0; page < a.Length; page++)
        {
            PageLocation location = index.Find(0, page);
            Assert.Equal(aKinds[page], location.Kind);
            Assert.Equal(a[page], PageAt(stream, location));
        }
        Assert.Equal(new PageLocation(PageKind.Filled, Fill: 0x5a), index.Find(1, 0));
        Assert.Equal(b1, PageAt(stream, index.Find(1, 1)));
        Assert.Throws<ArgumentOutOfRangeException>(() => index.Find(1, 2));
        Assert.Throws<ArgumentOutOfRangeException>(() => index.Find(2, 0));
    }

    [Fact]
    public void A_mapped_ram_files_pages_are_found_at_their_place()
    {
        MappedRamStreamTests.Block[] blocks =
        [
            new("ram0", Enumerable.Range(0, 70).Select(i => i % 3 == 0 ? null : StreamBuilder.PageOf((byte)(i + 1))).ToArray()),
            new("pc.bios", [StreamBuilder.PageOf(0xee), null]),
        ];
        var (file, transferred) = MappedRamStreamTests.MappedRamFile(blocks);
        // As QEMU 10.2 leaves it in a snapshot: a larger area, the stream's end known from the size QEMU counted.
        byte[] area = [.. file, .. new byte[8192]];
        MigrationStreamIndex index = Index(area, transferred);
        Assert.True(index.IsMappedRam);
        MigrationStreamInfo info = ReadBytes(file, r => MigrationStream.Inspect(r));
        Assert.Equal(info.DeviceStateBytes, index.DeviceStateLength);
        Assert.Equal(file.Length - info.DeviceStateBytes, index.DeviceStateOffset);
        for (int b = 0; b < blocks.Length; b++)
        {
            for (int page = 0; page < blocks[b].Pages.Length; page++)
            {
                PageLocation location = index.Find(b, page);
                Assert.Equal(blocks[b].Pages[page] is null ? PageKind.Filled : PageKind.Data, location.Kind);
                Assert.Equal(blocks[b].Pages[page] ?? new byte[4096], PageAt(file, location));
                if (location.Kind == PageKind.Data) Assert.Equal(info.RamBlocks[b].PagesOffset + page * 4096L, location.Offset);
            }
        }
    }

    [QemuFact]
    public void In_qemus_streams_every_page_of_the_guest_ram_is_found_and_the_device_state_starts_with_its_first_section()
    {
        VersionStreams qemu = streams.ForCurrent();
        foreach ((string path, string ram) in new[] { (qemu.NoneStream, qemu.NoneRam), (qemu.PcStream, qemu.PcRam) })
        {
            byte[] stream = File.ReadAllBytes(path);
            MigrationStreamIndex index = Index(stream);
            Assert.Equal("ram0", index.Blocks[0].Id);
            // ram0 against the RAM file QEMU ran on; a page QEMU did not send is zero there.
            using (var guest = File.OpenRead(ram))
            {
                byte[] expected = new byte[4096];
                for (long page = 0; page < index.Blocks[0].Length / 4096; page++)
                {
                    guest.ReadExactly(expected);
                    Assert.Equal(expected, PageAt(stream, index.Find(0, page)));
                }
            }
            // Every block against what a load of the stream writes.
            using var dir = new TempDir();
            var files = index.Blocks.Select((b, i) => (b.Id, dir.File($"block{i}"))).ToArray();
            ReadInto(path, files);
            for (int b = 0; b < files.Length; b++)
            {
                byte[] loaded = File.ReadAllBytes(files[b].Item2);
                for (int page = 0; page < loaded.Length / 4096; page++)
                    Assert.Equal(loaded.AsSpan(page * 4096, 4096).ToArray(), PageAt(stream, index.Find(b, page)));
            }
            // The device state: where the first device section is, to the end of the stream.
            MigrationStreamInfo info = Inspect(path);
            Assert.Equal(info.Sections.First(s => s.Kind == MigrationSectionKind.Device).Offset, index.DeviceStateOffset);
            Assert.Equal(info.DeviceStateBytes, index.DeviceStateLength);
            Assert.Equal(stream.Length, index.DeviceStateOffset + index.DeviceStateLength);
        }
    }
}
