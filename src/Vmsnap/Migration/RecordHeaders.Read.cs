using System.Buffers.Binary;
using System.Text;

namespace Vmsnap.Migration;

/// <summary>The fixed parts of a migration stream's records: reading and checking them (here), writing them (RecordHeaders.Write.cs).</summary>
internal static partial class RecordHeaders
{
    // QEMU's mapped-ram layout (9.0+, capability mapped-ram): each RAM block's entry in the block list (id string,
    // length) is followed by a header, and the stream continues after the block's pages, which lie at the offsets the
    // header gives (from the start of the file, QEMU 9.0-10.1 migrate file:, or of the VM-state area, QEMU 10.2
    // savevm): the bitmap right after the header, the pages at the next 1 MiB boundary after it, page N of the block
    // at pages offset + N x page size.
    public const uint MappedRamHeaderVersion = 1;
    public const int MappedRamHeaderBytes = 28;

    /// <summary>QEMU's alignment of each block's pages in the file (MAPPED_RAM_FILE_OFFSET_ALIGNMENT).</summary>
    public const long MappedRamPagesAlignment = 1 << 20;

    public static StreamHeaderRecord ReadStreamHeader(StreamInput input)
    {
        long start = input.Position;
        uint magic = input.Be32("the magic \"QEVM\"");
        if (magic != MigrationFormat.Magic)
            throw new MigrationStreamException($"not a QEMU migration stream: magic 0x{magic:x8}, expected 0x{MigrationFormat.Magic:x8} (\"QEVM\")", start);
        long at = input.Position;
        uint version = input.Be32("the stream version");
        if (version != MigrationFormat.Version)
            throw new MigrationStreamException($"stream version {version}, expected {MigrationFormat.Version}", at);
        return new StreamHeaderRecord(start);
    }

    /// <summary>The configuration section after its type byte at <paramref name="at"/>: the machine type, then subsections as long as the next byte says so (QEMU peeks the same way).</summary>
    public static ConfigurationRecord ReadConfiguration(StreamInput input, long at)
    {
        uint length = input.Be32("the machine type's length");
        if (length > 256)
            throw new MigrationStreamException($"machine type name of {length} bytes in the configuration section (at most 256)", at + 1);
        byte[] name = new byte[length];
        input.Bytes(name, "the machine type name");

        byte[]? pageBits = null, capabilities = null, uuid = null;
        var names = new List<string>();
        Span<byte> next = stackalloc byte[1];
        while (input.Peek(next) == 1 && next[0] == MigrationFormat.Subsection)
        {
            long subAt = input.Position;
            input.U8("a subsection marker");
            byte[] subName = input.IdBytes("a subsection name");
            uint version = input.Be32("a subsection version");
            byte[] head = [MigrationFormat.Subsection, (byte)subName.Length, .. subName, .. Be32(version)];
            switch (Encoding.UTF8.GetString(subName))
            {
                case MigrationFormat.SubsectionTargetPageBits:
                {
                    uint bits = input.Be32("the target page bits");
                    if (bits != MigrationFormat.PageShift)
                        throw new MigrationStreamException(
                            $"target pages of 2^{bits} bytes; vmsnap reads streams of 4 KiB target pages (12 bits)", subAt);
                    pageBits = [.. head, .. Be32(bits)];
                    break;
                }
                case MigrationFormat.SubsectionCapabilities:
                {
                    uint count = input.Be32("the capability count");
                    if (count > 64) throw new MigrationStreamException($"{count} migration capabilities in the configuration section (QEMU has fewer than 64)", subAt);
                    var raw = new List<byte>(head);
                    raw.AddRange(Be32(count));
                    for (uint i = 0; i < count; i++)
                    {
                        byte[] capability = input.IdBytes("a capability name");
                        raw.Add((byte)capability.Length);
                        raw.AddRange(capability);
                        names.Add(Encoding.UTF8.GetString(capability));
                    }
                    CheckCapabilities(names, subAt);
                    capabilities = [.. raw];
                    break;
                }
                case MigrationFormat.SubsectionUuid:
                {
                    byte[] id = new byte[16];
                    input.Bytes(id, "the UUID");
                    uuid = [.. head, .. id];
                    break;
                }
                default:
                    throw new MigrationStreamException($"unknown configuration subsection '{Encoding.UTF8.GetString(subName)}'", subAt);
            }
        }
        var record = new ConfigurationRecord(at, input.Position - at, name, pageBits, capabilities, names, uuid);
        if (record.MappedRam && !input.CanSeek)
            throw new MigrationStreamException(
                "the stream was written with capability 'mapped-ram': its RAM is placed by file offset, so it is read from a file " +
                "(or a snapshot's VM-state area), not from a pipe or socket", at);
        return record;
    }

    /// <summary>Known capabilities are checked (mapped-ram is read; x-ignore-shared is refused with why); unknown ones are refused by name.</summary>
    private static void CheckCapabilities(List<string> capabilities, long at)
    {
        foreach (string c in capabilities)
        {
            switch (c)
            {
                case MigrationFormat.CapabilityMappedRam:
                    break;
                case MigrationFormat.CapabilityIgnoreShared:
                    throw new MigrationStreamException(
                        "the stream was written with capability 'x-ignore-shared': the RAM of shared memory backends is not in it " +
                        "(it stays in the shared files) and each block entry carries a guest address; vmsnap reads streams that hold all RAM", at);
                default:
                    throw new MigrationStreamException(
                        $"the stream was written with migration capability '{c}', which vmsnap does not know; it reads plain and mapped-ram streams", at);
            }
        }
        if (capabilities.Distinct().Count() != capabilities.Count)
            throw new MigrationStreamException($"the configuration section lists a capability twice ({string.Join(", ", capabilities)})", at);
    }

    /// <summary>A full or start section's header after its type byte: id, id string, instance, version.</summary>
    public static (uint Id, byte[] Name, uint Instance, uint Version) ReadSectionHeader(StreamInput input) =>
        (input.Be32("a section id"), input.IdBytes("a section id string"), input.Be32("an instance id"), input.Be32("a section version"));

    /// <summary>Refuses RAM record flags vmsnap does not read, naming the first.</summary>
    public static void CheckRamFlags(ulong flags, long at, bool mappedRam)
    {
        const ulong known = MigrationFormat.RamZero | MigrationFormat.RamMemSize | MigrationFormat.RamPage
            | MigrationFormat.RamEos | MigrationFormat.RamContinue;
        ulong unsupported = flags & ~known;
        if (unsupported != 0)
        {
            ulong lowest = unsupported & (ulong)-(long)unsupported;
            if (lowest == MigrationFormat.RamMultifdFlush)
                throw new MigrationStreamException(
                    "RAM record MULTIFD_FLUSH (0x200): the stream is the main channel of a multifd migration, whose pages travel on " +
                    "separate multifd channels that are not in it; migrate without multifd, or with mapped-ram and multifd to a file: URI", at);
            throw new MigrationStreamException(
                $"RAM record with flag {MigrationFormat.DescribeUnsupportedRamFlag(lowest)} (flags 0x{flags:x}); vmsnap reads plain " +
                "precopy RAM (PAGE, ZERO, CONTINUE, MEM_SIZE, EOS) and mapped-ram files, not XBZRLE, compressed, multifd or RDMA streams", at);
        }
        if (mappedRam && (flags & (MigrationFormat.RamPage | MigrationFormat.RamZero)) != 0)
            throw new MigrationStreamException(
                $"RAM record with flags 0x{flags:x} in a mapped-ram stream, whose pages are placed by offset (QEMU refuses it too)", at);
    }

    /// <summary>What a block list (MEM_SIZE) holds, and for a mapped-ram stream the bytes its layout jumps over and the bitmaps' bytes.</summary>
    public sealed record BlockList(RamBlockInfo[] Blocks, byte[][] Ids, MappedRamPlacement[]? Placements, long Skipped, long BitmapBytes);

    /// <summary>
    /// The blocks after a MEM_SIZE record announcing <paramref name="total"/> bytes; in a mapped-ram stream each block's
    /// header follows its entry, and the stream goes on after the block's pages (from <paramref name="streamStart"/>).
    /// </summary>
    public static BlockList ReadBlockList(StreamInput input, ulong total, long at, bool mappedRam, long streamStart)
    {
        ulong remaining = total;
        var blocks = new List<RamBlockInfo>();
        var ids = new List<byte[]>();
        var placed = new List<MappedRamPlacement>();
        long skipped = 0, bitmaps = 0;
        while (remaining > 0)
        {
            long blockAt = input.Position;
            byte[] idBytes = input.IdBytes("a RAM block id");
            string id = Encoding.UTF8.GetString(idBytes);
            if (idBytes.Length == 0) throw new MigrationStreamException("a RAM block with an empty id in the block list", blockAt);
            ulong length = input.Be64($"the length of RAM block '{id}'");
            if (length == 0 || length % MigrationFormat.PageSize != 0 || length > long.MaxValue)
                throw new MigrationStreamException($"RAM block '{id}' has length {length}, not a positive multiple of 4096", blockAt);
            if (length > remaining)
                throw new MigrationStreamException(
                    $"RAM block '{id}' ({length} bytes) takes the block list past the total RAM ({total} bytes) that MEM_SIZE announced; " +
                    "the stream may carry per-block fields of a capability (postcopy-ram with huge pages, x-ignore-shared) that vmsnap does not read", blockAt);
            if (ids.Any(b => b.AsSpan().SequenceEqual(idBytes)))
                throw new MigrationStreamException($"RAM block '{id}' is listed twice", blockAt);
            blocks.Add(new RamBlockInfo(id, (long)length));
            ids.Add(idBytes);
            if (mappedRam)
            {
                MappedRamPlacement p = ReadMappedRamHeader(input, id, (long)length, streamStart);
                long headerEnd = input.Position;
                long next = streamStart + p.PagesOffset + (long)length;
                skipped += next - headerEnd;
                bitmaps += RamBitmap.ByteLength((long)length);
                input.Seek(next);
                placed.Add(p);
            }
            remaining -= length;
        }
        if (blocks.Count == 0) throw new MigrationStreamException("the RAM block list is empty (MEM_SIZE of 0)", at);
        return new BlockList([.. blocks], [.. ids], mappedRam ? [.. placed] : null, skipped, bitmaps);
    }

    /// <summary>A block's mapped-ram header: version 1, 4 KiB pages, the bitmap after the header and the pages 4 KiB-aligned after it (QEMU writes them in that order; reading relies on it).</summary>
    private static MappedRamPlacement ReadMappedRamHeader(StreamInput input, string id, long length, long streamStart)
    {
        long at = input.Position;
        string where = $"the mapped-ram header of RAM block '{id}'";
        uint version = input.Be32(where);
        ulong pageSize = input.Be64(where);
        ulong bitmap = input.Be64(where);
        ulong pages = input.Be64(where);
        long headerEnd = input.Position;
        if (version != MappedRamHeaderVersion)
            throw new MigrationStreamException($"{where} has version {version}; vmsnap reads version {MappedRamHeaderVersion}", at);
        if (pageSize != MigrationFormat.PageSize)
            throw new MigrationStreamException($"{where} gives pages of {pageSize} bytes; vmsnap reads 4 KiB target pages", at);
        long bitmapBytes = RamBitmap.ByteLength(length);
        if (bitmap < (ulong)(headerEnd - streamStart) || bitmap > long.MaxValue / 2
            || pages % MigrationFormat.PageSize != 0 || pages < bitmap + (ulong)bitmapBytes || pages > long.MaxValue / 2)
            throw new MigrationStreamException(
                $"{where} places the bitmap at {bitmap} and the pages at {pages}; expected the bitmap after the header (at {headerEnd - streamStart} or later) " +
                $"and the pages 4 KiB-aligned after the bitmap's {bitmapBytes} bytes", at);
        return new MappedRamPlacement((long)bitmap, (long)pages);
    }

    /// <summary>A command after its type byte at <paramref name="at"/>: a precopy stream's only one is SWITCHOVER_START, inside the RAM section.</summary>
    public static CommandRecord ReadCommand(StreamInput input, long at, bool ramStarted)
    {
        ushort command = input.Be16("a command number");
        ushort length = input.Be16("a command length");
        if (command != MigrationFormat.CommandSwitchoverStart || length != 0)
            throw new MigrationStreamException(
                $"command {MigrationFormat.DescribeCommand(command)} with {length} bytes; vmsnap reads precopy streams, whose only command is " +
                "SWITCHOVER_START (11, no payload): streams of postcopy, COLO or return-path migrations cannot be read", at);
        if (!ramStarted)
            throw new MigrationStreamException("command SWITCHOVER_START (11) before the RAM section's start", at);
        return new CommandRecord(at, command, []);
    }

    public static void ReadFooter(StreamInput input, uint id, string name)
    {
        long at = input.Position;
        byte b = input.U8($"the footer of section '{name}'");
        if (b != MigrationFormat.SectionFooter)
            throw new MigrationStreamException(
                $"expected the footer (0x7e) of section '{name}' (id {id}), found {MigrationFormat.DescribeSectionType(b)}", at);
        uint footerId = input.Be32($"the footer of section '{name}'");
        if (footerId != id)
            throw new MigrationStreamException($"the footer of section '{name}' names section id {footerId}, expected {id}", at);
    }

    private static byte[] Be32(uint value)
    {
        byte[] b = new byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(b, value);
        return b;
    }
}
