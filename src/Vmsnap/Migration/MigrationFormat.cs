namespace Vmsnap.Migration;

/// <summary>
/// Constants of QEMU's migration stream, version 3 (the same bytes savevm writes into a snapshot's
/// VM-state area and <c>migrate "exec:cat &gt; FILE"</c> writes into a file).
/// </summary>
internal static class MigrationFormat
{
    /// <summary>"QEVM", big-endian.</summary>
    public const uint Magic = 0x5145564d;

    /// <summary>The only stream version QEMU writes since 2.x (2 was a compatibility version, never written now).</summary>
    public const uint Version = 3;

    // Section types: the byte that opens each top-level record.
    public const byte Eof = 0x00;
    public const byte SectionStart = 0x01;
    public const byte SectionPart = 0x02;
    public const byte SectionEnd = 0x03;
    public const byte SectionFull = 0x04;
    public const byte Subsection = 0x05;
    public const byte VmDescription = 0x06;
    public const byte Configuration = 0x07;
    public const byte Command = 0x08;
    public const byte SectionFooter = 0x7e;

    /// <summary>
    /// The one command a precopy stream carries (QEMU 10.0+, machine types 10.0+ and <c>none</c>, no payload): the
    /// switchover begins. Measured on QEMU 10.0.2: <c>migrate</c> and savevm both write it, after the last RAM part and
    /// before the RAM section's end; QEMU 7.2 refuses a stream with it ("MIG_CMD 0xb unknown"), QEMU 10.0 loads a
    /// stream without it.
    /// </summary>
    public const ushort CommandSwitchoverStart = 0x0b;

    /// <summary>Commands of the postcopy protocol (QEMU's MIG_CMD_*), as a postcopy source sends them.</summary>
    public const ushort CommandOpenReturnPath = 1, CommandPing = 2, CommandPostcopyAdvise = 3, CommandPostcopyListen = 4,
        CommandPostcopyRun = 5, CommandPostcopyRamDiscard = 6, CommandPackaged = 7, CommandPostcopyResume = 9, CommandRecvBitmap = 10;

    /// <summary>The capability that lays RAM out by file offset (QEMU 9.0+, <c>migrate file:</c>).</summary>
    public const string CapabilityMappedRam = "mapped-ram";

    /// <summary>The capability that leaves shared RAM blocks out of the stream (their entries carry a guest address instead).</summary>
    public const string CapabilityIgnoreShared = "x-ignore-shared";

    /// <summary>Configuration subsections QEMU writes, in the order it writes them.</summary>
    public const string SubsectionTargetPageBits = "configuration/target-page-bits";
    public const string SubsectionCapabilities = "configuration/capabilities";
    public const string SubsectionUuid = "configuration/uuid";

    /// <summary>Id string, version and instance of the RAM section.</summary>
    public const string RamSectionName = "ram";
    public const uint RamSectionVersion = 4;

    /// <summary>Target page size: the RAM section's unit (x86 and every 4 KiB-page target).</summary>
    public const int PageSize = 4096;
    public const int PageShift = 12;

    /// <summary>The low bits of a RAM record's be64 header hold the flags, the rest the offset in the block.</summary>
    public const ulong RamFlagMask = PageSize - 1;

    // RAM record flags (low 12 bits of the be64 header).
    public const ulong RamFull = 0x01;           // obsolete since QEMU 1.x
    public const ulong RamZero = 0x02;           // page filled with one byte (always 0 nowadays)
    public const ulong RamMemSize = 0x04;        // block list follows; the address part is the total RAM
    public const ulong RamPage = 0x08;           // 4096 bytes of page data follow
    public const ulong RamEos = 0x10;            // end of this section's RAM records
    public const ulong RamContinue = 0x20;       // same block as the previous record: no id string
    public const ulong RamXbzrle = 0x40;
    public const ulong RamHook = 0x80;           // RDMA
    public const ulong RamCompressPage = 0x100;
    public const ulong RamMultifdFlush = 0x200;

    /// <summary>The VM description QEMU would write for a machine without devices (its JSON writer's spacing).</summary>
    public const string EmptyVmDescription = "{\"page_size\": 4096, \"devices\": []}";

    /// <summary>Longest id string a section or RAM block can have (a u8 length prefix).</summary>
    public const int MaxIdLength = 255;

    /// <summary>A name for a RAM flag that a reader cannot handle, for error messages.</summary>
    public static string DescribeUnsupportedRamFlag(ulong flag) => flag switch
    {
        RamFull => "FULL (0x01, obsolete)",
        RamXbzrle => "XBZRLE (0x40)",
        RamHook => "RDMA hook (0x80)",
        RamCompressPage => "COMPRESS_PAGE (0x100)",
        RamMultifdFlush => "MULTIFD_FLUSH (0x200)",
        _ => $"unknown flag 0x{flag:x}",
    };

    /// <summary>QEMU's name of a migration command (a COMMAND record), for messages.</summary>
    public static string DescribeCommand(ushort command) => command switch
    {
        CommandOpenReturnPath => "OPEN_RETURN_PATH (1)",
        CommandPing => "PING (2)",
        CommandPostcopyAdvise => "POSTCOPY_ADVISE (3)",
        CommandPostcopyListen => "POSTCOPY_LISTEN (4)",
        CommandPostcopyRun => "POSTCOPY_RUN (5)",
        CommandPostcopyRamDiscard => "POSTCOPY_RAM_DISCARD (6)",
        CommandPackaged => "PACKAGED (7)",
        8 => "ENABLE_COLO (8)",
        CommandPostcopyResume => "POSTCOPY_RESUME (9)",
        CommandRecvBitmap => "RECV_BITMAP (10)",
        CommandSwitchoverStart => "SWITCHOVER_START (11)",
        _ => $"unknown command {command}",
    };

    /// <summary>Name of a section type byte, for messages.</summary>
    public static string DescribeSectionType(byte type) => type switch
    {
        Eof => "EOF (0x00)",
        SectionStart => "SECTION_START (0x01)",
        SectionPart => "SECTION_PART (0x02)",
        SectionEnd => "SECTION_END (0x03)",
        SectionFull => "SECTION_FULL (0x04)",
        Subsection => "SUBSECTION (0x05)",
        VmDescription => "VMDESCRIPTION (0x06)",
        Configuration => "CONFIGURATION (0x07)",
        Command => "COMMAND (0x08)",
        SectionFooter => "SECTION_FOOTER (0x7e)",
        _ => $"unknown section type 0x{type:x2}",
    };
}
