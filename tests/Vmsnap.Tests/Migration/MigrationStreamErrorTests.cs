using Vmsnap.Migration;
using static Vmsnap.Tests.Migration.StreamFiles;

namespace Vmsnap.Tests.Migration;

/// <summary>Bad input: every refusal is a <see cref="MigrationStreamException"/> naming the offset and what was expected.</summary>
[Trait("Category", "Unit")]
public class MigrationStreamErrorTests
{
    private static readonly byte[] Data = StreamBuilder.PageOf(0x11);

    /// <summary>Stream offsets of the valid stream's landmarks (built by <see cref="Valid"/>).</summary>
    private const int ConfigurationAt = 8, StartAt = 17, BlockListAt = 34, StartFooterAt = 63, PartAt = 68, FirstPageAt = 73;

    private static StreamBuilder UpToPart() => new StreamBuilder()
        .Header().Configuration("none")
        .Start(2).BlockList(("ram0", 2 * 4096)).EndOfRecords().Footer(2);

    private static byte[] Valid() => UpToPart()
        .Part(2).PageRecord(0, Data, "ram0").ZeroRecord(0x1000).EndOfRecords().Footer(2)
        .End(2).EndOfRecords().Footer(2)
        .Tail()
        .ToArray();

    private static MigrationStreamException Refused(byte[] stream, long offset, params string[] words)
    {
        var e = Assert.Throws<MigrationStreamException>(() => ReadBytes(stream, r => MigrationStream.Inspect(r)));
        Assert.Equal(offset, e.Offset);
        Assert.StartsWith($"migration stream offset {offset}: ", e.Message);
        foreach (string w in words) Assert.Contains(w, e.Message);
        return e;
    }

    private static byte[] WithPageFlags(ulong flags)
    {
        byte[] b = Valid();
        b[FirstPageAt + 6] |= (byte)(flags >> 8);
        b[FirstPageAt + 7] |= (byte)flags;
        return b;
    }

    [Fact]
    public void The_landmarks_of_the_valid_stream_are_where_the_tests_expect()
    {
        Assert.Equal(PartAt, UpToPart().Length);
        byte[] valid = Valid();
        Assert.Equal(0x07, valid[ConfigurationAt]);
        Assert.Equal(0x01, valid[StartAt]);
        Assert.Equal(0x7e, valid[StartFooterAt]);
        Assert.Equal(0x08, valid[FirstPageAt + 7]);
        MigrationStreamInfo info = ReadBytes(valid, r => MigrationStream.Inspect(r));
        Assert.Equal([new RamBlockSummary("ram0", 8192, 1, 1)], info.RamBlocks);
    }

    [Fact]
    public void Bad_magic_and_wrong_version()
    {
        byte[] magic = Valid();
        magic[3] = 0x4e;
        Refused(magic, 0, "not a QEMU migration stream", "0x5145564e");
        byte[] version = Valid();
        version[7] = 2;
        Refused(version, 4, "stream version 2, expected 3");
    }

    [Fact]
    public void Unknown_section_type()
    {
        byte[] b = Valid();
        b[StartAt] = 0x09;
        Refused(b, StartAt, "unknown section type 0x09");
    }

    [Theory]
    [InlineData(0x40ul, "XBZRLE (0x40)")]
    [InlineData(0x100ul, "COMPRESS_PAGE (0x100)")]
    [InlineData(0x200ul, "MULTIFD_FLUSH (0x200): the stream is the main channel of a multifd migration")]
    [InlineData(0x80ul, "RDMA hook (0x80)")]
    [InlineData(0x01ul, "FULL (0x01, obsolete)")]
    [InlineData(0x400ul, "unknown flag 0x400")]
    public void Unsupported_ram_flags_are_named(ulong flag, string name) =>
        Refused(WithPageFlags(flag), FirstPageAt, name);

    [Fact]
    public void Missing_or_wrong_section_footer()
    {
        byte[] valid = Valid();
        byte[] missing = [.. valid.AsSpan(0, StartFooterAt), .. valid.AsSpan(StartFooterAt + 5)];
        Refused(missing, StartFooterAt, "expected the footer (0x7e) of section 'ram' (id 2)", "SECTION_PART (0x02)");
        byte[] wrong = Valid();
        wrong[StartFooterAt + 4] = 3;
        Refused(wrong, StartFooterAt, "names section id 3, expected 2");
    }

    [Fact]
    public void Pages_of_unknown_blocks_or_outside_their_block()
    {
        Refused(UpToPart().Part(2).PageRecord(0, Data, "ram9").ToArray(), FirstPageAt, "'ram9'", "not in the stream's block list");
        Refused(UpToPart().Part(2).ZeroRecord(0).ToArray(), FirstPageAt, "CONTINUE (0x20) but no previous page");
        Refused(UpToPart().Part(2).PageRecord(0x2000, Data, "ram0").ToArray(), FirstPageAt, "offset 0x2000 of RAM block 'ram0'", "8192 bytes");
    }

    [Fact]
    public void Sections_out_of_place()
    {
        Refused(UpToPart().Part(5).ToArray(), PartAt, "section id 5", "RAM section is id 2");
        Refused(UpToPart().U8(0x00).ToArray(), PartAt, "EOF (0x00) before the RAM section's end");
        // A device section after a part: only early-setup sections come before RAM's end, and before its first part.
        byte[] afterPart = UpToPart().Part(2).EndOfRecords().Footer(2).Full(3, "timer", 0, 2).ToArray();
        Refused(afterPart, PartAt + 18, "device section 'timer' (id 3) between the RAM section's parts");
        Refused(new StreamBuilder().Header().Full(3, "timer", 0, 2).ToArray(), ConfigurationAt, "device section 'timer' (id 3) before the configuration section");
        // Before the first part it is an early-setup section, which needs its footer.
        Refused(UpToPart().Full(3, "timer", 0, 2).Raw(new byte[40]).ToArray(), PartAt, "early-setup section 'timer' (id 3): no footer");
        Refused(UpToPart().U8(0x08).Be16(3).Be16(16).Raw(new byte[16]).ToArray(), PartAt, "command POSTCOPY_ADVISE (3) with 16 bytes");
        Refused(UpToPart().U8(0x08).Be16(11).Be16(4).Raw(new byte[4]).ToArray(), PartAt, "command SWITCHOVER_START (11) with 4 bytes");
        Refused(new StreamBuilder().Header().Configuration("none").U8(0x08).Be16(11).Be16(0).ToArray(), StartAt, "SWITCHOVER_START (11) before the RAM section's start");
        Refused(UpToPart().Start(4, "block", 0, 1).ToArray(), PartAt, "iterative section 'block'");
        Refused(UpToPart().Start(4).ToArray(), PartAt, "second RAM section");
        Refused(UpToPart().Configuration("pc").ToArray(), PartAt, "configuration section");
        Refused(new StreamBuilder().Header().Start(2, version: 3).ToArray(), ConfigurationAt, "RAM section version 3, expected 4");
        Refused(new StreamBuilder().Header().Start(2).EndOfRecords().Footer(2).ToArray(), ConfigurationAt, "no block list");
    }

    [Fact]
    public void Bad_block_lists()
    {
        StreamBuilder Start() => new StreamBuilder().Header().Configuration("none").Start(2);
        Refused(Start().Be64(4096 | 0x04).Id("ram0").Be64(8192).ToArray(), BlockListAt + 8, "past the total RAM (4096 bytes)", "x-ignore-shared");
        Refused(Start().Be64(8192 | 0x04).Id("ram0").Be64(4096).Id("ram0").Be64(4096).ToArray(), BlockListAt + 8 + 13, "'ram0' is listed twice");
        Refused(Start().Be64(4096 | 0x04).Id("ram0").Be64(100).ToArray(), BlockListAt + 8, "length 100, not a positive multiple of 4096");
        Refused(Start().Be64(0x04).EndOfRecords().Footer(2).ToArray(), BlockListAt, "block list is empty");
        Refused(UpToPart().Part(2).Be64(0x04).ToArray(), FirstPageAt, "block list (MEM_SIZE) outside the RAM section's start");
    }

    [Fact]
    public void Configuration_subsections_that_change_the_layout()
    {
        StreamBuilder Config() => new StreamBuilder().Header().Configuration("none");
        Refused(Config().U8(0x05).Id("configuration/capabilities").Be32(1).Be32(1).Id("x-ignore-shared").ToArray(),
            StartAt, "capability 'x-ignore-shared'", "shared memory backends");
        // Known with one unknown: refused by the unknown one's name.
        Refused(Config().U8(0x05).Id("configuration/capabilities").Be32(1).Be32(2).Id("mapped-ram").Id("zero-copy-future").ToArray(),
            StartAt, "capability 'zero-copy-future', which vmsnap does not know");
        Refused(Config().U8(0x05).Id("configuration/capabilities").Be32(1).Be32(2).Id("mapped-ram").Id("mapped-ram").ToArray(),
            StartAt, "lists a capability twice");
        Refused(Config().U8(0x05).Id("configuration/target-page-bits").Be32(1).Be32(16).ToArray(), StartAt, "2^16");
        Refused(Config().U8(0x05).Id("configuration/foo").Be32(1).ToArray(), StartAt, "unknown configuration subsection 'configuration/foo'");
        Refused(new StreamBuilder().Header().U8(0x07).Be32(300).ToArray(), ConfigurationAt + 1, "300 bytes");
    }

    [Fact]
    public void A_stream_must_end_with_eof_and_the_vm_description()
    {
        byte[] valid = Valid();
        int tailAt = valid.Length - (6 + "{\"page_size\": 4096, \"devices\": []}".Length);
        Refused(valid[..(tailAt + 1)], tailAt + 1, "does not end with EOF (0x00) followed by the VM description");
        Refused([.. valid, 0], valid.Length + 1, "does not end with EOF");
        byte[] badJson = [.. valid[..(tailAt + 2)], .. new StreamBuilder().Be32(3).Raw("{x}"u8).ToArray()];
        Refused(badJson, tailAt + 6, "not valid JSON");
        Refused(valid[..tailAt], tailAt, "ends right after the RAM section");
    }

    private static byte[] WithDescription(string json) =>
        UpToPart().End(2).EndOfRecords().Footer(2).Tail(json).ToArray();

    [Fact]
    public void A_vm_description_of_the_wrong_shape_is_refused_or_read_never_a_crash()
    {
        int descriptionAt = UpToPart().End(2).EndOfRecords().Footer(2).Length + 6;
        Refused(WithDescription("{\"devices\": [1]}"), descriptionAt, "device 0 is not a JSON object");
        Refused(WithDescription("{\"devices\": [{\"name\": \"timer\", \"fields\": [\"x\"]}]}"), descriptionAt, "field 0 of 'timer' is not a JSON object");
        Refused(WithDescription("{\"devices\": [{\"name\": \"timer\", \"subsections\": [null]}]}"), descriptionAt, "subsection 0 of 'timer' is not a JSON object");

        // Values of the wrong type count as missing; sizes that overflow stay at the largest value.
        MigrationStreamInfo info = ReadBytes(WithDescription(
            "{\"page_size\": \"4k\", \"devices\": [{\"name\": \"timer\", \"instance_id\": \"0\", \"version_id\": 2, \"fields\": [" +
            "{\"name\": \"a\", \"size\": \"8\"}, {\"name\": \"b\", \"size\": 8, \"array_len\": \"x\"}, " +
            "{\"name\": \"c\", \"size\": 9223372036854775807, \"array_len\": 4}, {\"name\": \"d\", \"size\": 9223372036854775807}]}]}"),
            r => MigrationStream.Inspect(r));
        MigrationDeviceInfo timer = Assert.Single(info.Devices);
        Assert.Equal(0u, timer.Instance);
        Assert.Equal([0, 8, long.MaxValue, long.MaxValue], timer.Fields.Select(f => f.Bytes));
        Assert.Equal(long.MaxValue, timer.FieldBytes);
    }

    [Fact]
    public void Truncation_at_any_byte_is_refused_with_an_offset_no_later_than_the_cut()
    {
        byte[] valid = Valid();
        // The whole stream fits in the reader's first buffer, at the default size as at this one: the same reads, without
        // allocating the default's 8 MiB of read-ahead buffers once per cut (minutes over thousands of cuts).
        const int bufferSize = 64 << 10;
        Assert.True(valid.Length < bufferSize);
        for (int cut = 0; cut < valid.Length; cut++)
        {
            var e = Assert.Throws<MigrationStreamException>(() => ReadBytes(valid[..cut], r => MigrationStream.Inspect(r), bufferSize));
            Assert.InRange(e.Offset, 0, cut);
        }
    }
}
