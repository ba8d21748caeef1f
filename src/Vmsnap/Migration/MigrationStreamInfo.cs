namespace Vmsnap.Migration;

/// <summary>What a migration stream holds: machine type, sections, RAM blocks with page counts, and devices.</summary>
/// <remarks>Returned by every whole-stream operation of <see cref="MigrationStream"/> (read, inspect, copy, write).</remarks>
public sealed class MigrationStreamInfo
{
    internal MigrationStreamInfo(
        string? machineType,
        IReadOnlyList<MigrationSectionInfo> sections,
        IReadOnlyList<RamBlockSummary> ramBlocks,
        IReadOnlyList<MigrationDeviceInfo> devices,
        long totalBytes,
        long deviceStateBytes,
        string? deviceStateProblem,
        IReadOnlyList<string>? capabilities = null,
        bool descriptionHasConfiguration = false)
    {
        Capabilities = capabilities ?? [];
        DescriptionHasConfiguration = descriptionHasConfiguration;
        MachineType = machineType;
        Sections = sections;
        RamBlocks = ramBlocks;
        Devices = devices;
        TotalBytes = totalBytes;
        DeviceStateBytes = deviceStateBytes;
        DeviceStateProblem = deviceStateProblem;
    }

    /// <summary>Machine type from the configuration section (e.g. <c>pc-i440fx-7.2</c>, <c>none</c>), or null when the stream has none.</summary>
    public string? MachineType { get; }

    /// <summary>
    /// Sections in stream order: configuration, RAM (one entry at its start, with its record count), early-setup
    /// device sections and commands where they came, then device sections when they could be walked.
    /// </summary>
    public IReadOnlyList<MigrationSectionInfo> Sections { get; }

    /// <summary>
    /// Migration capabilities the configuration section lists (QEMU lists only those that change the stream's
    /// layout: <c>mapped-ram</c>, <c>x-ignore-shared</c>); empty for a plain stream.
    /// </summary>
    public IReadOnlyList<string> Capabilities { get; }

    /// <summary>True when the RAM is laid out by file offset (capability <c>mapped-ram</c>: QEMU's <c>migrate file:</c>, QEMU 10.2 savevm).</summary>
    public bool IsMappedRam => Capabilities.Contains(MigrationFormat.CapabilityMappedRam);

    /// <summary>True when the VM description has QEMU 8.2's shape (a <c>configuration</c> object first).</summary>
    public bool DescriptionHasConfiguration { get; }

    /// <summary>RAM blocks in the stream's block-list order, with page and zero-page record counts.</summary>
    public IReadOnlyList<RamBlockSummary> RamBlocks { get; }

    /// <summary>Devices listed in the VM description, in its order.</summary>
    public IReadOnlyList<MigrationDeviceInfo> Devices { get; }

    /// <summary>Length of the whole stream in bytes.</summary>
    public long TotalBytes { get; }

    /// <summary>Bytes after the RAM section's end: device sections, EOF and the VM description.</summary>
    public long DeviceStateBytes { get; }

    /// <summary>
    /// Why the device sections could not be listed one by one with the VM description (they are then
    /// carried as one opaque block, which QEMU still accepts), or null when they were all walked.
    /// </summary>
    public string? DeviceStateProblem { get; }

    /// <summary>Total page-data records over all blocks.</summary>
    public long Pages => RamBlocks.Sum(b => b.Pages);

    /// <summary>Total zero-page records over all blocks.</summary>
    public long ZeroPages => RamBlocks.Sum(b => b.ZeroPages);

    /// <summary>Total RAM in bytes (the sum of the block lengths).</summary>
    public long RamBytes => RamBlocks.Sum(b => b.Length);
}

/// <summary>What kind of top-level record a <see cref="MigrationSectionInfo"/> describes.</summary>
public enum MigrationSectionKind
{
    /// <summary>The configuration section (machine type).</summary>
    Configuration,

    /// <summary>The iterative RAM section (start, parts, end).</summary>
    Ram,

    /// <summary>A device's full section.</summary>
    Device,

    /// <summary>A device's full section saved before RAM's pages (QEMU 8.0+ <c>early_setup</c>, e.g. virtio-mem), carried verbatim.</summary>
    EarlySetup,

    /// <summary>A command record (QEMU 10.0's SWITCHOVER_START before the final device state); <see cref="MigrationSectionInfo.Id"/> is the command number.</summary>
    Command,
}

/// <summary>One section of a stream. An iterative section (RAM) is one entry whose <see cref="Count"/> is the number of its start/part/end records.</summary>
/// <param name="Kind">Configuration, RAM or device.</param>
/// <param name="Id">Section id (the number part/end records and footers refer to); -1 for the configuration.</param>
/// <param name="Name">Id string (<c>ram</c>, <c>timer</c>, <c>0000:00:01.1/ide</c>), or <c>configuration</c>.</param>
/// <param name="Instance">Instance id.</param>
/// <param name="Version">Section version.</param>
/// <param name="Offset">Stream offset of the section's first record.</param>
/// <param name="Count">Number of records (1 for a full section; start + parts + end for RAM).</param>
/// <param name="Bytes">Bytes of all its records, headers and footers included.</param>
public sealed record MigrationSectionInfo(
    MigrationSectionKind Kind, long Id, string Name, uint Instance, uint Version, long Offset, int Count, long Bytes);

/// <summary>A RAM block of a stream with what its records held.</summary>
/// <param name="Id">The block's id string.</param>
/// <param name="Length">The block's length in bytes.</param>
/// <param name="Pages">Number of PAGE records (4096 bytes of data each) for this block.</param>
/// <param name="ZeroPages">Number of ZERO records for this block (in a mapped-ram stream: pages whose bit is clear).</param>
/// <param name="BitmapOffset">Mapped-ram: where the block's bitmap lies (from the stream's start); null in a plain stream.</param>
/// <param name="PagesOffset">Mapped-ram: where the block's first page lies (from the stream's start); null in a plain stream.</param>
public sealed record RamBlockSummary(string Id, long Length, long Pages, long ZeroPages, long? BitmapOffset = null, long? PagesOffset = null);

/// <summary>A device of the VM description: the layout QEMU wrote for one device section.</summary>
/// <param name="Name">Section id string.</param>
/// <param name="Instance">Instance id.</param>
/// <param name="Version">Version of the device's state description.</param>
/// <param name="Fields">Top-level fields with their sizes in the stream.</param>
/// <param name="Subsections">Names of the subsections written for this device.</param>
public sealed record MigrationDeviceInfo(
    string Name, uint Instance, uint Version, IReadOnlyList<MigrationDeviceField> Fields, IReadOnlyList<string> Subsections)
{
    /// <summary>Bytes of the top-level fields (subsections not included).</summary>
    public long FieldBytes => MigrationDeviceField.Total(Fields);
}

/// <summary>A field of a device section as the VM description gives it.</summary>
/// <param name="Name">Field name (<c>env.regs</c>, <c>cmos_data</c>).</param>
/// <param name="Type">QEMU's type name (<c>uint32</c>, <c>buffer</c>, <c>struct</c>).</param>
/// <param name="Bytes">Bytes the field takes in the stream (all array elements).</param>
public sealed record MigrationDeviceField(string Name, string Type, long Bytes)
{
    /// <summary>The fields' bytes added up, held at the limits of a long (a damaged description may give any sizes).</summary>
    internal static long Total(IEnumerable<MigrationDeviceField> fields)
    {
        Int128 sum = 0;
        foreach (MigrationDeviceField f in fields) sum += f.Bytes;
        return (long)Int128.Clamp(sum, long.MinValue, long.MaxValue);
    }
}
