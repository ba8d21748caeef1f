using System.Buffers.Binary;
using System.Text;

namespace Vmsnap.Migration;

/// <summary>
/// One record of a migration stream, as <see cref="MigrationRecordReader"/> pulls it and <see cref="MigrationRecordWriter"/>
/// writes it: the stream header, the configuration, the RAM section's start (with its block list), parts and end, runs
/// of pages and of zero pages, the EOS and footer that close a RAM section record, device sections, commands, EOF and
/// the VM description.
/// </summary>
/// <remarks>
/// <see cref="Offset"/> is where the record starts in the stream it was read from (or written to); <see cref="Length"/>
/// is how many of the stream's own bytes it takes. A mapped-ram stream jumps over each block's bitmap and pages after
/// the block's header: those areas are not counted in the start's length, and a run of placed pages
/// (<see cref="RamRunRecord.Placed"/>) lies in them, outside the record sequence.
/// </remarks>
internal abstract class MigrationRecord(long offset, long length)
{
    public long Offset { get; } = offset;
    public long Length { get; } = length;
}

/// <summary>The magic "QEVM" and version 3.</summary>
internal sealed class StreamHeaderRecord(long offset) : MigrationRecord(offset, 8);

/// <summary>
/// The configuration section: the machine type, then the subsections QEMU writes (target page bits, capabilities,
/// UUID), each kept as its bytes were.
/// </summary>
internal sealed class ConfigurationRecord(long offset, long length, byte[] machineType, byte[]? pageBits, byte[]? capabilities,
    IReadOnlyList<string> capabilityNames, byte[]? uuid) : MigrationRecord(offset, length)
{
    /// <summary>The machine type name's bytes.</summary>
    public byte[] MachineTypeBytes { get; } = machineType;

    public string MachineType => Encoding.UTF8.GetString(MachineTypeBytes);

    /// <summary>The target-page-bits subsection, or null.</summary>
    public byte[]? PageBits { get; } = pageBits;

    /// <summary>The capabilities subsection, or null.</summary>
    public byte[]? CapabilitiesSubsection { get; } = capabilities;

    /// <summary>The capabilities it lists.</summary>
    public IReadOnlyList<string> Capabilities { get; } = capabilityNames;

    /// <summary>The UUID subsection, or null.</summary>
    public byte[]? Uuid { get; } = uuid;

    /// <summary>True when the stream's RAM is laid out by file offset (capability mapped-ram).</summary>
    public bool MappedRam => Capabilities.Contains(MigrationFormat.CapabilityMappedRam);

    /// <summary>The subsections a plain stream carries (page bits, UUID; no capabilities), in QEMU's order.</summary>
    public byte[] PlainSubsections => [.. PageBits ?? [], .. Uuid ?? []];

    /// <summary>The configuration a profile writes: <paramref name="subsections"/> are written as they are, after the name.</summary>
    public static ConfigurationRecord ForWriting(string machineType, byte[] subsections) =>
        new(-1, -1, Encoding.UTF8.GetBytes(machineType), subsections, null, [], null);
}

/// <summary>Where a mapped-ram block's bitmap and pages lie, from the stream's start.</summary>
internal readonly record struct MappedRamPlacement(long BitmapOffset, long PagesOffset);

/// <summary>
/// The RAM section's SECTION_START with its block list (MEM_SIZE): section id, instance, version, and each block's id
/// and length; in a mapped-ram stream also where each block's bitmap and pages lie.
/// </summary>
internal sealed class RamStartRecord(long offset, long length, uint sectionId, uint instance, uint version,
    IReadOnlyList<RamBlockInfo> blocks, byte[][] blockIds, IReadOnlyList<MappedRamPlacement>? placements) : MigrationRecord(offset, length)
{
    public uint SectionId { get; } = sectionId;
    public uint Instance { get; } = instance;
    public uint Version { get; } = version;
    public IReadOnlyList<RamBlockInfo> Blocks { get; } = blocks;

    /// <summary>Each block's id string as its bytes (page records name their block by these).</summary>
    public byte[][] BlockIds { get; } = blockIds;

    /// <summary>Mapped-ram: each block's bitmap and pages; null in a plain stream.</summary>
    public IReadOnlyList<MappedRamPlacement>? Placements { get; } = placements;

    /// <summary>The RAM's total length (what MEM_SIZE announces).</summary>
    public long RamBytes => Blocks.Sum(b => b.Length);

    public static RamStartRecord ForWriting(uint sectionId, uint instance, IReadOnlyList<RamBlockInfo> blocks) =>
        new(-1, -1, sectionId, instance, MigrationFormat.RamSectionVersion, blocks, blocks.Select(b => Encoding.UTF8.GetBytes(b.Id)).ToArray(), null);
}

/// <summary>A SECTION_PART or SECTION_END header of the RAM section; its RAM records and a <see cref="RamSectionFooterRecord"/> follow.</summary>
internal sealed class RamSectionRecord(long offset, byte type, uint sectionId) : MigrationRecord(offset, 5)
{
    /// <summary><see cref="MigrationFormat.SectionPart"/> or <see cref="MigrationFormat.SectionEnd"/>.</summary>
    public byte Type { get; } = type;

    public uint SectionId { get; } = sectionId;
}

/// <summary>EOS, then the section footer: the end of a RAM section's start, part or end.</summary>
internal sealed class RamSectionFooterRecord(long offset, uint sectionId, ulong eos = MigrationFormat.RamEos) : MigrationRecord(offset, 13)
{
    public uint SectionId { get; } = sectionId;

    /// <summary>The EOS record's be64 header as it was (QEMU writes 0x10; a reader does not look at its address bits).</summary>
    public ulong Eos { get; } = eos;
}

/// <summary>Consecutive pages of one RAM block.</summary>
internal abstract class RamRunRecord(long offset, long length, int block, long blockOffset, long ramBytes, bool namesBlock, bool placed)
    : MigrationRecord(offset, length)
{
    /// <summary>Index of the block in the start's block list.</summary>
    public int Block { get; } = block;

    /// <summary>Byte offset of the first page in its block.</summary>
    public long BlockOffset { get; } = blockOffset;

    /// <summary>Bytes of RAM the run covers (whole pages).</summary>
    public long RamBytes { get; } = ramBytes;

    public long PageCount => RamBytes / MigrationFormat.PageSize;

    /// <summary>The first page's record carries its block's id string; the others say CONTINUE.</summary>
    public bool NamesBlock { get; } = namesBlock;

    /// <summary>
    /// Pages of a mapped-ram stream, at their place outside the record sequence (or pages a writer is to frame in RAM
    /// section parts of its own); false for page records inside a RAM section record.
    /// </summary>
    public bool Placed { get; } = placed;
}

/// <summary>
/// A run of PAGE records (or of a mapped-ram block's pages with data): the page data, valid until the reader's next
/// record, unless the reader was told not to read page data (then empty).
/// </summary>
internal sealed class RamPagesRecord(long offset, long length, int block, long blockOffset, long ramBytes, bool namesBlock, bool placed,
    long dataOffset, int dataStride, ReadOnlyMemory<byte> data, IDisposable? owner = null)
    : RamRunRecord(offset, length, block, blockOffset, ramBytes, namesBlock, placed)
{
    private IDisposable? _owner = owner;

    /// <summary>Stream offset of the first page's data.</summary>
    public long DataOffset { get; } = dataOffset;

    /// <summary>Bytes from one page's data to the next page's in the stream (a record header and a page, or a page).</summary>
    public int DataStride { get; } = dataStride;

    public ReadOnlyMemory<byte> Data { get; } = data;

    /// <summary>Stream offset of page <paramref name="index"/>'s data.</summary>
    public long DataOffsetOf(long index) => DataOffset + index * DataStride;

    /// <summary>
    /// Takes over the memory of <see cref="Data"/>: the caller disposes the returned owner once it no longer needs the
    /// bytes (a writer that references them until written). Null when the memory cannot outlive the next record.
    /// </summary>
    public IDisposable? TakeOwner() => Interlocked.Exchange(ref _owner, null);

    /// <summary>Gives the memory back unless someone took it.</summary>
    internal void Release() => TakeOwner()?.Dispose();

    /// <summary>Pages a writer encodes itself (zero pages as ZERO records), framed in RAM section parts of its own.</summary>
    public static RamPagesRecord ForWriting(int block, long blockOffset, ReadOnlyMemory<byte> data, IDisposable? owner) =>
        new(-1, -1, block, blockOffset, data.Length, true, true, -1, MigrationFormat.PageSize, data, owner);
}

/// <summary>
/// A run of ZERO records (or of a mapped-ram block's pages without data): pages of one byte, <see cref="Fill"/>, which
/// is 0 except in streams of old QEMUs (a page of another byte is a run of its own).
/// </summary>
internal sealed class RamZeroPagesRecord(long offset, long length, int block, long blockOffset, long ramBytes, bool namesBlock, bool placed, byte fill = 0)
    : RamRunRecord(offset, length, block, blockOffset, ramBytes, namesBlock, placed)
{
    public byte Fill { get; } = fill;
}

/// <summary>
/// A device's full section (SECTION_FULL to its footer), kept as its bytes: early-setup sections before the RAM section's
/// parts, device sections after its end (walked with the VM description, whose layout for it comes along).
/// </summary>
internal sealed class DeviceSectionRecord(long offset, MigrationSectionKind kind, ReadOnlyMemory<byte> bytes, VmDescription.Layout? layout = null)
    : MigrationRecord(offset, bytes.Length)
{
    /// <summary><see cref="MigrationSectionKind.Device"/> or <see cref="MigrationSectionKind.EarlySetup"/>.</summary>
    public MigrationSectionKind Kind { get; } = kind;

    /// <summary>The whole section: SECTION_FULL, be32 id, id string, be32 instance, be32 version, fields, footer.</summary>
    public ReadOnlyMemory<byte> Bytes { get; } = bytes;

    /// <summary>The device's layout in the VM description (device sections only).</summary>
    public VmDescription.Layout? Layout { get; } = layout;

    public uint SectionId => BinaryPrimitives.ReadUInt32BigEndian(Bytes.Span[1..]);

    public string Name => Encoding.UTF8.GetString(Bytes.Span.Slice(6, Bytes.Span[5]));

    public uint Instance => BinaryPrimitives.ReadUInt32BigEndian(Bytes.Span[(6 + Bytes.Span[5])..]);

    public uint Version => BinaryPrimitives.ReadUInt32BigEndian(Bytes.Span[(10 + Bytes.Span[5])..]);

    /// <summary>Bytes of the header before the fields.</summary>
    public int HeaderLength => 14 + Bytes.Span[5];

    /// <summary>The same section with other bytes (as long as these), e.g. a field changed.</summary>
    public DeviceSectionRecord With(byte[] bytes) => new(Offset, Kind, bytes, Layout);
}

/// <summary>A COMMAND record: be16 command, be16 length, the payload.</summary>
internal sealed class CommandRecord(long offset, ushort command, byte[] payload) : MigrationRecord(offset, 5 + payload.Length)
{
    public ushort Command { get; } = command;
    public byte[] Payload { get; } = payload;
}

/// <summary>Device sections the VM description could not walk (from the first that did not fit up to EOF), carried as one block.</summary>
internal sealed class UnwalkedDeviceStateRecord(long offset, ReadOnlyMemory<byte> bytes, string problem) : MigrationRecord(offset, bytes.Length)
{
    public ReadOnlyMemory<byte> Bytes { get; } = bytes;

    /// <summary>Why the walk stopped.</summary>
    public string Problem { get; } = problem;
}

/// <summary>The EOF byte after the device sections.</summary>
internal sealed class EofRecord(long offset) : MigrationRecord(offset, 1);

/// <summary>The VM description: VMDESCRIPTION, be32 length, the JSON. The last record of a stream.</summary>
internal sealed class VmDescriptionRecord(long offset, byte[] json, VmDescription description) : MigrationRecord(offset, 5 + json.Length)
{
    public byte[] Json { get; } = json;
    public VmDescription Description { get; } = description;
}
