using System.Buffers.Binary;
using System.Text;
using Vmsnap.VmState;
using Vmsnap.VmState.LowLevel;

namespace Vmsnap.Migration;

internal static partial class RecordHeaders
{
    /// <summary>The capabilities subsection of a mapped-ram file: mapped-ram only.</summary>
    private static readonly byte[] MappedRamCapabilities =
    [
        MigrationFormat.Subsection, (byte)MigrationFormat.SubsectionCapabilities.Length, .. Encoding.ASCII.GetBytes(MigrationFormat.SubsectionCapabilities),
        0, 0, 0, 1,   // subsection version
        0, 0, 0, 1,   // one capability
        (byte)MigrationFormat.CapabilityMappedRam.Length, .. Encoding.ASCII.GetBytes(MigrationFormat.CapabilityMappedRam),
    ];

    public static void WriteStreamHeader(VmStateWriter output)
    {
        output.PutBe32(MigrationFormat.Magic);
        output.PutBe32(MigrationFormat.Version);
    }

    /// <summary>
    /// The configuration section in <paramref name="layout"/>: subsections in QEMU's order (target page bits, capabilities,
    /// UUID), the capabilities those of the layout (a plain stream keeps a plain source's, a mapped-ram file lists mapped-ram).
    /// </summary>
    public static void WriteConfiguration(VmStateWriter output, ConfigurationRecord configuration, MigrationStreamFormat layout)
    {
        output.PutByte(MigrationFormat.Configuration);
        output.PutBe32((uint)configuration.MachineTypeBytes.Length);
        output.PutBuffer(configuration.MachineTypeBytes);
        if (configuration.PageBits is { } pageBits) output.PutBuffer(pageBits);
        if (layout == MigrationStreamFormat.MappedRam) output.PutBuffer(MappedRamCapabilities);
        else if (!configuration.MappedRam && configuration.CapabilitiesSubsection is { } capabilities) output.PutBuffer(capabilities);
        if (configuration.Uuid is { } uuid) output.PutBuffer(uuid);
    }

    /// <summary>The RAM section's SECTION_START header (the block list follows).</summary>
    public static void WriteSectionStart(VmStateWriter output, RamStartRecord start)
    {
        output.PutByte(MigrationFormat.SectionStart);
        output.PutBe32(start.SectionId);
        WriteId(output, Encoding.ASCII.GetBytes(MigrationFormat.RamSectionName));
        output.PutBe32(start.Instance);
        output.PutBe32(start.Version);
    }

    /// <summary>The MEM_SIZE record: the RAM's total length; the block entries follow.</summary>
    public static void WriteMemSize(VmStateWriter output, IReadOnlyList<RamBlockInfo> blocks)
    {
        ulong total = 0;
        foreach (RamBlockInfo b in blocks) total += (ulong)b.Length;
        output.PutBe64(total | MigrationFormat.RamMemSize);
    }

    public static void WriteBlockEntry(VmStateWriter output, byte[] id, long length)
    {
        WriteId(output, id);
        output.PutBe64((ulong)length);
    }

    /// <summary>Where QEMU puts a block's pages when its bitmap starts at <paramref name="bitmapOffset"/>: at the next 1 MiB boundary after the bitmap.</summary>
    public static long MappedRamPagesOffset(long bitmapOffset, long blockLength)
    {
        long end = bitmapOffset + RamBitmap.ByteLength(blockLength);
        return (end + MappedRamPagesAlignment - 1) / MappedRamPagesAlignment * MappedRamPagesAlignment;
    }

    /// <summary>A block's mapped-ram header, 28 bytes big-endian: version 1, page size, bitmap offset, pages offset.</summary>
    public static void WriteMappedRamHeader(VmStateWriter output, MappedRamPlacement placement)
    {
        Span<byte> header = stackalloc byte[MappedRamHeaderBytes];
        BinaryPrimitives.WriteUInt32BigEndian(header, MappedRamHeaderVersion);
        BinaryPrimitives.WriteUInt64BigEndian(header[4..], MigrationFormat.PageSize);
        BinaryPrimitives.WriteUInt64BigEndian(header[12..], (ulong)placement.BitmapOffset);
        BinaryPrimitives.WriteUInt64BigEndian(header[20..], (ulong)placement.PagesOffset);
        output.PutBuffer(header);
    }

    /// <summary>A SECTION_PART or SECTION_END header.</summary>
    public static void WriteSectionHeader(VmStateWriter output, byte type, uint sectionId)
    {
        output.PutByte(type);
        output.PutBe32(sectionId);
    }

    /// <summary>EOS and the section footer: the end of every RAM section record (start, part, end).</summary>
    public static void WriteFooter(VmStateWriter output, uint sectionId, ulong eos = MigrationFormat.RamEos)
    {
        output.PutBe64(eos);
        output.PutByte(MigrationFormat.SectionFooter);
        output.PutBe32(sectionId);
    }

    public static void WriteCommand(VmStateWriter output, CommandRecord command)
    {
        output.PutByte(MigrationFormat.Command);
        output.PutBe16(command.Command);
        output.PutBe16((ushort)command.Payload.Length);
        output.PutBuffer(command.Payload);
    }

    public static void WriteVmDescription(VmStateWriter output, byte[] json)
    {
        output.PutByte(MigrationFormat.VmDescription);
        output.PutBe32((uint)json.Length);
        output.PutBuffer(json);
    }

    /// <summary>A u8 length and the id string's bytes.</summary>
    public static void WriteId(VmStateWriter output, ReadOnlySpan<byte> id)
    {
        output.PutByte((byte)id.Length);
        output.PutBuffer(id);
    }
}
