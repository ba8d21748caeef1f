using System.Buffers.Binary;
using System.Runtime.CompilerServices;
using System.Text;
using Vmsnap.VmState;

namespace Vmsnap.Migration;

/// <summary>
/// Parses a migration stream from a <see cref="VmStateReader"/>: header, configuration, the RAM
/// section (start, parts, end) record by record, early-setup device sections and commands where they
/// come, then the device state to the end of the stream. Pages go to an optional <see cref="IRamSink"/>;
/// the stream can be copied to an optional <see cref="VmStateWriter"/>: byte for byte, or rewritten into
/// the other RAM layout (plain ↔ mapped-ram).
/// </summary>
/// <remarks>
/// <para>The stream runs to the end of the reader's backend, or to the length given (a snapshot's VM-state
/// size). Everything after the RAM section's end is held in memory (a few hundred KiB for a PC), up to
/// <see cref="MaxDeviceStateBytes"/>.</para>
/// <para>A mapped-ram stream (capability <c>mapped-ram</c>) places each block's bitmap and pages by offset
/// and continues after them; it is read from a positional backend only (a file or a VM-state area): the
/// pages are read, block by block, where the source's first RAM part begins, after the early-setup
/// sections. A snapshot's VM-state size counts what QEMU wrote (the stream's own bytes, the pages with
/// data and the bitmaps), not how far the layout reaches; the stream's end follows from it.</para>
/// </remarks>
internal sealed class MigrationStreamReader
{
    /// <summary>Bound on the device state after the RAM section that is held in memory.</summary>
    public const int MaxDeviceStateBytes = 256 << 20;

    /// <summary>Bound on one early-setup section (found by its footer: such sections carry no length).</summary>
    public const int MaxEarlySectionBytes = 1 << 20;

    private const int BatchBytes = 1 << 20;

    // The per-page paths below are compiled fully optimized from their first call: a load lasts about a
    // second per GiB, and tiering would run much of it in unoptimized code while the JIT competes for the CPU.
    private const long ProgressStep = 16 << 20;

    private readonly VmStateReader _in;
    private readonly IRamSink? _sink;
    private readonly VmStateWriter? _tee;
    private readonly MigrationStreamFormat _format;
    private readonly long? _length;
    private readonly IProgress<long>? _progress;
    private readonly CancellationToken _cancellation;

    private readonly List<MigrationSectionInfo> _sections = new();
    private readonly List<RamBlockInfo> _blocks = new();
    private readonly List<string> _capabilities = new();
    private readonly List<(long Offset, byte[] Bytes, string Name)> _early = new();
    private byte[][] _blockIds = [];
    private long[] _pages = [];
    private long[] _zeroPages = [];
    private bool _haveBlockList;
    private int _lastBlock = -1;
    private long _start;

    // Copying: raw bytes go to the destination while _forward is on; a rewrite turns it off where
    // the destination's layout differs and writes its own bytes there.
    private bool _forward = true;
    private RamOutput? _output;

    // RAM section bookkeeping.
    private bool _ramStarted;
    private bool _ramDataSeen;       // a PART, END or command came after the start: no early-setup section any more
    private uint _ramId;
    private long _ramOffset;
    private int _ramRecords;
    private long _ramBytes;

    // Mapped-ram source.
    private bool _mapped;
    private (long BitmapOffset, long PagesOffset)[] _placed = [];
    private bool _placedDelivered;
    private long _skippedByLayout;   // bytes of bitmaps, padding and pages the stream jumps over
    private long _placedBytesWritten; // what QEMU counts for them: bitmaps and pages with data

    // Batches of consecutive pages handed to the sink in one call.
    private byte[]? _batch;
    private int _dataBlock = -1;
    private long _dataStart;
    private int _dataLength;
    private int _zeroBlock = -1;
    private long _zeroStart;
    private long _zeroLength;
    private byte[]? _scratch;
    private ChunkPool? _chunks;

    private long _ramDone;
    private long _ramReported;

    /// <param name="input">The stream.</param>
    /// <param name="sink">Receives the RAM, or null.</param>
    /// <param name="tee">Receives a copy of the stream, or null.</param>
    /// <param name="progress">Bytes of RAM read so far.</param>
    /// <param name="cancellation">Stops between records.</param>
    /// <param name="format">The copy's RAM layout: plain (a plain source is copied byte for byte) or mapped-ram.</param>
    /// <param name="length">What the stream's writer counted (a snapshot's VM-state size), when the backend may reach further; null: to the backend's end.</param>
    public MigrationStreamReader(VmStateReader input, IRamSink? sink, VmStateWriter? tee, IProgress<long>? progress, CancellationToken cancellation,
        MigrationStreamFormat format = MigrationStreamFormat.Plain, long? length = null)
    {
        _in = input;
        _sink = sink;
        _tee = tee;
        _format = format;
        _length = length;
        _progress = progress;
        _cancellation = cancellation;
    }

    /// <summary>Machine type from the configuration section, or null.</summary>
    public string? MachineType { get; private set; }

    /// <summary>The configuration's subsections as a plain stream carries them (target page bits, UUID; no capabilities), for writing them back.</summary>
    public byte[] ConfigurationSubsections { get; private set; } = [];

    public uint RamSectionId => _ramId;
    public uint RamInstance { get; private set; }
    public IReadOnlyList<RamBlockInfo> Blocks => _blocks;

    /// <summary>The early-setup sections (between the RAM section's start and its first part), verbatim and in order.</summary>
    public IReadOnlyList<byte[]> EarlySections => _early.Select(e => e.Bytes).ToArray();

    /// <summary>True when a SWITCHOVER_START command came before the RAM section's end.</summary>
    public bool SwitchoverStart { get; private set; }

    /// <summary>Everything after the RAM section's end as a plain stream carries it (the VM description without a mapped-ram capability).</summary>
    public byte[] DeviceState { get; private set; } = [];

    private bool Rewriting => _tee is not null && (_mapped || _format == MigrationStreamFormat.MappedRam);

    /// <summary>Reads the whole stream, then completes the sink.</summary>
    public MigrationStreamInfo Read()
    {
        _start = _in.Position;
        if (_tee is not null && _format == MigrationStreamFormat.MappedRam && !_tee.CanSeek)
            throw new MigrationStreamException("a mapped-ram file is laid out by offset: write it to a file, not a pipe or socket");
        ReadHeader();
        bool configuration = false;
        bool ramEnded = false;
        while (!ramEnded)
        {
            _cancellation.ThrowIfCancellationRequested();
            ThrowIfCopyFailed();
            long at = _in.Position;
            byte type = PeekType();
            if (_mapped && !_placedDelivered && type is MigrationFormat.SectionPart or MigrationFormat.SectionEnd or MigrationFormat.Command)
                DeliverPlacedPages();
            U8("a section type");
            switch (type)
            {
                case MigrationFormat.Configuration:
                    if (configuration || _ramStarted)
                        throw new MigrationStreamException("a second or late configuration section; it must come once, right after the header", at);
                    configuration = true;
                    ReadConfiguration(at);
                    break;
                case MigrationFormat.SectionStart:
                    ReadSectionStart(at);
                    break;
                case MigrationFormat.SectionPart:
                case MigrationFormat.SectionEnd:
                {
                    uint id = Be32("a section id");
                    if (!_ramStarted || id != _ramId)
                        throw new MigrationStreamException(
                            $"{MigrationFormat.DescribeSectionType(type)} for section id {id}, which no SECTION_START opened" +
                            (_ramStarted ? $" (the RAM section is id {_ramId})" : ""), at);
                    _ramDataSeen = true;
                    long skipped = _skippedByLayout;
                    ReadRamRecords(at, start: false);
                    ReadFooter(id, "ram");
                    _ramRecords++;
                    _ramBytes += _in.Position - at - (_skippedByLayout - skipped);
                    ramEnded = type == MigrationFormat.SectionEnd;
                    break;
                }
                case MigrationFormat.SectionFull:
                    ReadEarlySection(at, configuration);
                    break;
                case MigrationFormat.Command:
                    ReadCommand(at);
                    break;
                case MigrationFormat.Eof:
                    throw new MigrationStreamException(
                        _ramStarted ? "EOF (0x00) before the RAM section's end (SECTION_END)" : "EOF (0x00) before any RAM section", at);
                default:
                    throw new MigrationStreamException(
                        $"{MigrationFormat.DescribeSectionType(type)} where a section was expected " +
                        "(CONFIGURATION 0x07, SECTION_START 0x01, SECTION_PART 0x02, SECTION_END 0x03)", at);
            }
        }
        FlushBatches();
        _sections.Add(new MigrationSectionInfo(MigrationSectionKind.Ram, _ramId, MigrationFormat.RamSectionName, RamInstance,
            MigrationFormat.RamSectionVersion, _ramOffset, _ramRecords, _ramBytes));

        long tailOffset = _in.Position;
        byte[] tail = ReadTail(tailOffset);
        DeviceStateTail analyzed = DeviceStateTail.Analyze(tail, tailOffset);
        _sections.AddRange(analyzed.Sections);
        string? problem = analyzed.Problem;
        foreach (var (offset, bytes, name) in _early)
            problem ??= DeviceStateTail.CheckEarlySection(bytes, offset, analyzed.Description, name);
        DeviceState = _mapped ? DeviceStateTail.WithDescription(tail, tailOffset, j => VmDescription.WithoutCapabilities(j, tailOffset)) : tail;
        ReportProgress(force: true);
        if (_tee is not null)
        {
            if (Rewriting)
            {
                _tee.PutBuffer(_format == MigrationStreamFormat.MappedRam
                    ? DeviceStateTail.WithDescription(tail, tailOffset, j => VmDescription.WithMappedRam(j, MachineType ?? "", tailOffset))
                    : DeviceState);
                _output!.Finish();
            }
            _tee.Flush();
            ThrowIfCopyFailed();
        }
        _sink?.Complete();

        var blocks = new RamBlockSummary[_blocks.Count];
        for (int i = 0; i < blocks.Length; i++)
            blocks[i] = new RamBlockSummary(_blocks[i].Id, _blocks[i].Length, _pages[i], _zeroPages[i],
                _mapped ? _placed[i].BitmapOffset : null, _mapped ? _placed[i].PagesOffset : null);
        return new MigrationStreamInfo(MachineType, _sections.OrderBy(s => s.Offset).ToArray(), blocks,
            analyzed.Description.ToDeviceInfos(), _in.Position - _start, tail.Length, problem, _capabilities.ToArray(),
            analyzed.Description.HasConfiguration);
    }

    private byte PeekType()
    {
        Span<byte> next = stackalloc byte[1];
        return _in.Peek(next) == 1 ? next[0] : U8("a section type"); // at the end: the read says so
    }

    private void ReadHeader()
    {
        long at = _in.Position;
        uint magic = Be32("the magic \"QEVM\"");
        if (magic != MigrationFormat.Magic)
            throw new MigrationStreamException($"not a QEMU migration stream: magic 0x{magic:x8}, expected 0x{MigrationFormat.Magic:x8} (\"QEVM\")", at);
        at = _in.Position;
        uint version = Be32("the stream version");
        if (version != MigrationFormat.Version)
            throw new MigrationStreamException($"stream version {version}, expected {MigrationFormat.Version}", at);
    }

    private void ReadConfiguration(long at)
    {
        uint length = Be32("the machine type's length");
        if (length > 256)
            throw new MigrationStreamException($"machine type name of {length} bytes in the configuration section (at most 256)", at + 1);
        byte[] name = new byte[length];
        Bytes(name, "the machine type name");
        MachineType = Encoding.UTF8.GetString(name);

        // Subsections follow as long as the next byte says so (QEMU peeks the same way). A copy writes
        // them back itself: a rewrite changes the capabilities.
        bool forward = _forward;
        _forward = false;
        byte[]? pageBits = null, capabilities = null, uuid = null;
        Span<byte> next = stackalloc byte[1];
        while (_in.Peek(next) == 1 && next[0] == MigrationFormat.Subsection)
        {
            long subAt = _in.Position;
            using var raw = new MemoryStream();
            U8("a subsection marker");
            string sub = IdString("a subsection name");
            uint version = Be32("a subsection version");
            raw.WriteByte(MigrationFormat.Subsection);
            WriteId(raw, sub);
            WriteBe32(raw, version);
            switch (sub)
            {
                case MigrationFormat.SubsectionTargetPageBits:
                {
                    uint bits = Be32("the target page bits");
                    if (bits != MigrationFormat.PageShift)
                        throw new MigrationStreamException(
                            $"target pages of 2^{bits} bytes; vmsnap reads streams of 4 KiB target pages (12 bits)", subAt);
                    WriteBe32(raw, bits);
                    pageBits = raw.ToArray();
                    break;
                }
                case MigrationFormat.SubsectionCapabilities:
                {
                    uint count = Be32("the capability count");
                    if (count > 64) throw new MigrationStreamException($"{count} migration capabilities in the configuration section (QEMU has fewer than 64)", subAt);
                    for (uint i = 0; i < count; i++) _capabilities.Add(IdString("a capability name"));
                    CheckCapabilities(subAt);
                    capabilities = raw.ToArray();
                    break;
                }
                case MigrationFormat.SubsectionUuid:
                {
                    byte[] id = new byte[16];
                    Bytes(id, "the UUID");
                    raw.Write(id);
                    uuid = raw.ToArray();
                    break;
                }
                default:
                    throw new MigrationStreamException($"unknown configuration subsection '{sub}'", subAt);
            }
        }
        _forward = forward;
        _mapped = _capabilities.Contains(MigrationFormat.CapabilityMappedRam);
        if (_mapped && !_in.CanSeek)
            throw new MigrationStreamException(
                "the stream was written with capability 'mapped-ram': its RAM is placed by file offset, so it is read from a file " +
                "(or a snapshot's VM-state area), not from a pipe or socket", at);
        ConfigurationSubsections = [.. pageBits ?? [], .. uuid ?? []];
        if (_tee is not null)
        {
            // QEMU's order: target page bits, capabilities, UUID.
            if (pageBits is not null) _tee.PutBuffer(pageBits);
            if (_format == MigrationStreamFormat.MappedRam) _tee.PutBuffer(MappedRamCapabilitySubsection());
            else if (!_mapped && capabilities is not null) _tee.PutBuffer(capabilities);
            if (uuid is not null) _tee.PutBuffer(uuid);
        }
        _sections.Add(new MigrationSectionInfo(MigrationSectionKind.Configuration, -1, "configuration", 0, 1, at, 1, _in.Position - at));
    }

    /// <summary>Known capabilities are checked (mapped-ram is read; x-ignore-shared is refused with why); unknown ones are refused by name.</summary>
    private void CheckCapabilities(long at)
    {
        foreach (string c in _capabilities)
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
        if (_capabilities.Distinct().Count() != _capabilities.Count)
            throw new MigrationStreamException($"the configuration section lists a capability twice ({string.Join(", ", _capabilities)})", at);
    }

    private static byte[] MappedRamCapabilitySubsection()
    {
        using var s = new MemoryStream();
        s.WriteByte(MigrationFormat.Subsection);
        WriteId(s, MigrationFormat.SubsectionCapabilities);
        WriteBe32(s, 1);
        WriteBe32(s, 1);
        WriteId(s, MigrationFormat.CapabilityMappedRam);
        return s.ToArray();
    }

    private void ReadSectionStart(long at)
    {
        uint id = Be32("a section id");
        string name = IdString("a section id string");
        uint instance = Be32("an instance id");
        uint version = Be32("a section version");
        if (name != MigrationFormat.RamSectionName)
            throw new MigrationStreamException(
                $"iterative section '{name}' (id {id}); vmsnap reads streams whose only iterative section is 'ram' " +
                "(block migration, dirty bitmaps and VFIO devices are not supported)", at);
        if (_ramStarted)
            throw new MigrationStreamException($"a second RAM section (id {id}); the first one is id {_ramId}", at);
        if (version != MigrationFormat.RamSectionVersion)
            throw new MigrationStreamException($"RAM section version {version}, expected {MigrationFormat.RamSectionVersion}", at);
        _ramStarted = true;
        _ramId = id;
        RamInstance = instance;
        _ramOffset = at;
        if (_tee is not null)
        {
            _output = _format == MigrationStreamFormat.MappedRam ? new MappedRamOutput(_tee)
                : _mapped ? new PlainRamOutput(_tee, id) : null;
        }
        ReadRamRecords(at, start: true);
        if (!_haveBlockList)
            throw new MigrationStreamException("the RAM section's start has no block list (MEM_SIZE record)", at);
        ReadFooter(id, name);
        _ramRecords = 1;
        _ramBytes = _in.Position - at - _skippedByLayout;
    }

    /// <summary>
    /// A device's full section before the RAM section's parts: QEMU 8.0+ saves <c>early_setup</c> devices
    /// (virtio-mem) there, right after the RAM section's start. It carries no length; its end is the first
    /// footer naming its section id that a record QEMU could write next follows.
    /// </summary>
    private void ReadEarlySection(long at, bool configuration)
    {
        uint id = Be32("a section id");
        byte[] idBytes = IdBytes("a section id string");
        string name = Encoding.UTF8.GetString(idBytes);
        uint instance = Be32("an instance id");
        uint version = Be32("a section version");
        if (_ramDataSeen || !configuration)
            throw new MigrationStreamException(
                $"device section '{name}' (id {id}) " + (_ramDataSeen ? "between the RAM section's parts" : "before the configuration section") +
                "; vmsnap reads streams whose device sections come after the RAM section's end, or before its first part " +
                "(early-setup devices), as savevm and precopy migration write them", at);
        int headerBytes = (int)(_in.Position - at);
        byte[] window = new byte[MaxEarlySectionBytes];
        int have = _in.Peek(window);
        int end = FindEarlySectionEnd(window.AsSpan(0, have), id);
        if (end < 0)
            throw new MigrationStreamException(
                $"early-setup section '{name}' (id {id}): no footer naming its id followed by a RAM part, section or command " +
                $"within {MaxEarlySectionBytes} bytes", at);
        byte[] bytes = new byte[headerBytes + end];
        Bytes(bytes.AsSpan(headerBytes, end - 5), $"early-setup section '{name}'");
        ReadFooter(id, name);
        // The header as it was, for the record kept of it: the id string's own bytes (decoding it may not give them back).
        bytes[0] = MigrationFormat.SectionFull;
        BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(1), id);
        bytes[5] = (byte)idBytes.Length;
        idBytes.CopyTo(bytes, 6);
        BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(6 + idBytes.Length), instance);
        BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(10 + idBytes.Length), version);
        bytes[^5] = MigrationFormat.SectionFooter;
        BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(bytes.Length - 4), id);
        _early.Add((at, bytes, name));
        _sections.Add(new MigrationSectionInfo(MigrationSectionKind.EarlySetup, id, name, instance, version, at, 1, bytes.Length));
    }

    /// <summary>Bytes up to and including the section's footer, or -1.</summary>
    private int FindEarlySectionEnd(ReadOnlySpan<byte> data, uint id)
    {
        Span<byte> footer = stackalloc byte[5];
        footer[0] = MigrationFormat.SectionFooter;
        BinaryPrimitives.WriteUInt32BigEndian(footer[1..], id);
        for (int from = 0; from < data.Length;)
        {
            int i = data[from..].IndexOf(footer);
            if (i < 0) return -1;
            int end = from + i + 5;
            if (PlausibleNextRecord(data[end..])) return end;
            from += i + 1;
        }
        return -1;
    }

    /// <summary>What may follow an early-setup section: another one, the RAM section's start, part or end, or a command.</summary>
    private bool PlausibleNextRecord(ReadOnlySpan<byte> next)
    {
        if (next.Length < 5) return false;
        uint id = BinaryPrimitives.ReadUInt32BigEndian(next[1..]);
        return next[0] switch
        {
            MigrationFormat.SectionPart or MigrationFormat.SectionEnd => _ramStarted && id == _ramId,
            MigrationFormat.SectionStart => !_ramStarted,
            MigrationFormat.SectionFull => next.Length >= 6 && next[5] > 0,
            MigrationFormat.Command => next[1] == 0 && next[2] == MigrationFormat.CommandSwitchoverStart,
            _ => false,
        };
    }

    private void ReadCommand(long at)
    {
        ushort command = Be16("a command number");
        ushort length = Be16("a command length");
        if (command != MigrationFormat.CommandSwitchoverStart || length != 0)
            throw new MigrationStreamException(
                $"command {MigrationFormat.DescribeCommand(command)} with {length} bytes; vmsnap reads precopy streams, whose only command is " +
                "SWITCHOVER_START (11, no payload): streams of postcopy, COLO or return-path migrations cannot be read", at);
        if (!_ramStarted)
            throw new MigrationStreamException("command SWITCHOVER_START (11) before the RAM section's start", at);
        _ramDataSeen = true;
        SwitchoverStart = true;
        _sections.Add(new MigrationSectionInfo(MigrationSectionKind.Command, command, "SWITCHOVER_START", 0, 0, at, 1, _in.Position - at));
    }

    private void ReadFooter(uint id, string name)
    {
        long at = _in.Position;
        byte b = U8($"the footer of section '{name}'");
        if (b != MigrationFormat.SectionFooter)
            throw new MigrationStreamException(
                $"expected the footer (0x7e) of section '{name}' (id {id}), found {MigrationFormat.DescribeSectionType(b)}", at);
        uint footerId = Be32($"the footer of section '{name}'");
        if (footerId != id)
            throw new MigrationStreamException($"the footer of section '{name}' names section id {footerId}, expected {id}", at);
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private void ReadRamRecords(long sectionAt, bool start)
    {
        const ulong known = MigrationFormat.RamZero | MigrationFormat.RamMemSize | MigrationFormat.RamPage
            | MigrationFormat.RamEos | MigrationFormat.RamContinue;
        while (true)
        {
            long at = _in.Position;
            // A rewrite decides from the header whether to copy the record, so it looks before it reads;
            // reading, inspecting and byte-for-byte copies just read.
            bool rewriting = Rewriting;
            ulong header = rewriting ? PeekBe64() : Be64("a RAM record header");
            ulong flags = header & MigrationFormat.RamFlagMask;
            ulong address = header & ~MigrationFormat.RamFlagMask;
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
            bool pageRecord = (flags & (MigrationFormat.RamPage | MigrationFormat.RamZero)) != 0;
            if (_mapped && pageRecord)
                throw new MigrationStreamException(
                    $"RAM record with flags 0x{flags:x} in a mapped-ram stream, whose pages are placed by offset (QEMU refuses it too)", at);
            // A rewrite into mapped-ram places pages itself; MEM_SIZE is written anew by every rewrite.
            bool forward = _forward;
            bool memSize = flags == MigrationFormat.RamMemSize;
            if (rewriting)
            {
                if (memSize || (pageRecord && _format == MigrationStreamFormat.MappedRam)) _forward = false;
                Be64("a RAM record header");
            }
            switch (flags & ~MigrationFormat.RamContinue)
            {
                case MigrationFormat.RamMemSize when memSize:
                    if (!start || _haveBlockList)
                        throw new MigrationStreamException("a RAM block list (MEM_SIZE) outside the RAM section's start", at);
                    ReadBlockList(address, at);
                    break;
                case MigrationFormat.RamPage:
                {
                    int block = BlockOf(flags, at, address);
                    AddData(block, (long)address);
                    break;
                }
                case MigrationFormat.RamZero:
                {
                    int block = BlockOf(flags, at, address);
                    byte fill = U8("a zero page's fill byte");
                    if (fill == 0) AddZero(block, (long)address);
                    else AddFilled(block, (long)address, fill);
                    break;
                }
                case MigrationFormat.RamEos when flags == MigrationFormat.RamEos:
                    _forward = forward;
                    FlushBatches();
                    return;
                default:
                    throw new MigrationStreamException(
                        $"RAM record with flags 0x{flags:x}, expected one of PAGE (0x08), ZERO (0x02) [with CONTINUE (0x20)], MEM_SIZE (0x04) or EOS (0x10)", at);
            }
            _forward = forward;
        }
    }

    private ulong PeekBe64()
    {
        Span<byte> b = stackalloc byte[8];
        return _in.Peek(b) == 8 ? BinaryPrimitives.ReadUInt64BigEndian(b) : Be64("a RAM record header"); // short: the read says where
    }

    private void ReadBlockList(ulong total, long at)
    {
        ulong remaining = total;
        var placed = new List<(long, long)>();
        while (remaining > 0)
        {
            long blockAt = _in.Position;
            string id = IdString("a RAM block id");
            if (id.Length == 0) throw new MigrationStreamException("a RAM block with an empty id in the block list", blockAt);
            ulong length = Be64($"the length of RAM block '{id}'");
            if (length == 0 || length % MigrationFormat.PageSize != 0 || length > long.MaxValue)
                throw new MigrationStreamException($"RAM block '{id}' has length {length}, not a positive multiple of 4096", blockAt);
            if (length > remaining)
                throw new MigrationStreamException(
                    $"RAM block '{id}' ({length} bytes) takes the block list past the total RAM ({total} bytes) that MEM_SIZE announced; " +
                    "the stream may carry per-block fields of a capability (postcopy-ram with huge pages, x-ignore-shared) that vmsnap does not read", blockAt);
            if (_blocks.Any(b => b.Id == id))
                throw new MigrationStreamException($"RAM block '{id}' is listed twice", blockAt);
            _blocks.Add(new RamBlockInfo(id, (long)length));
            if (_mapped) placed.Add(ReadMappedRamHeader(id, (long)length));
            remaining -= length;
        }
        _blockIds = _blocks.Select(b => Encoding.UTF8.GetBytes(b.Id)).ToArray();
        _pages = new long[_blocks.Count];
        _zeroPages = new long[_blocks.Count];
        _placed = placed.ToArray();
        _haveBlockList = true;
        if (_blocks.Count == 0) throw new MigrationStreamException("the RAM block list is empty (MEM_SIZE of 0)", at);
        _sink?.BeginBlocks(_blocks.ToArray());
        _output?.BlockList(_blocks.ToArray());
        (_progress as IRamProgress)?.ReportTotal((long)total);
    }

    /// <summary>A block's mapped-ram header; the stream goes on after the block's pages.</summary>
    private (long BitmapOffset, long PagesOffset) ReadMappedRamHeader(string id, long length)
    {
        long at = _in.Position;
        uint version = Be32($"the mapped-ram header of RAM block '{id}'");
        ulong pageSize = Be64($"the mapped-ram header of RAM block '{id}'");
        ulong bitmap = Be64($"the mapped-ram header of RAM block '{id}'");
        ulong pages = Be64($"the mapped-ram header of RAM block '{id}'");
        long headerEnd = _in.Position;
        string where = $"the mapped-ram header of RAM block '{id}'";
        if (version != MappedRam.HeaderVersion)
            throw new MigrationStreamException($"{where} has version {version}; vmsnap reads version {MappedRam.HeaderVersion}", at);
        if (pageSize != MigrationFormat.PageSize)
            throw new MigrationStreamException($"{where} gives pages of {pageSize} bytes; vmsnap reads 4 KiB target pages", at);
        long bitmapBytes = MappedRam.BitmapBytes(length);
        // QEMU writes bitmap then pages after the header, in that order; reading relies on it.
        if (bitmap < (ulong)(headerEnd - _start) || bitmap > long.MaxValue / 2
            || pages % MigrationFormat.PageSize != 0 || pages < bitmap + (ulong)bitmapBytes || pages > long.MaxValue / 2)
            throw new MigrationStreamException(
                $"{where} places the bitmap at {bitmap} and the pages at {pages}; expected the bitmap after the header (at {headerEnd - _start} or later) " +
                $"and the pages 4 KiB-aligned after the bitmap's {bitmapBytes} bytes", at);
        long next = _start + (long)pages + length;
        _skippedByLayout += next - headerEnd;
        _placedBytesWritten += bitmapBytes;
        _in.Seek(next);
        return ((long)bitmap, (long)pages);
    }

    /// <summary>
    /// A mapped-ram source's RAM, block by block: the bitmap, then the runs of pages with data (read where they
    /// lie) and of zero pages, to the sink and the copy; then back to where the stream goes on.
    /// </summary>
    private void DeliverPlacedPages()
    {
        _placedDelivered = true;
        long resume = _in.Position;
        bool forward = _forward;
        _forward = false;
        bool wantPages = _sink is not null || _output is not null;
        _output?.BeginPlacedPages();
        for (int b = 0; b < _blocks.Count; b++)
        {
            _cancellation.ThrowIfCancellationRequested();
            ThrowIfCopyFailed();
            RamBlockInfo block = _blocks[b];
            long pageCount = block.Length / MigrationFormat.PageSize;
            var (bitmapOffset, pagesOffset) = _placed[b];
            _in.Seek(_start + bitmapOffset);
            byte[] bitmapBytes = new byte[MappedRam.BitmapBytes(block.Length)];
            Bytes(bitmapBytes, $"the bitmap of RAM block '{block.Id}'");
            ulong[] bitmap = MappedRam.ParseBitmap(bitmapBytes, pageCount);
            long set = MappedRam.CountSet(bitmap);
            _pages[b] = set;
            _zeroPages[b] = pageCount - set;
            _placedBytesWritten += set * MigrationFormat.PageSize;
            if (!wantPages)
            {
                _ramDone += block.Length;
                if (_ramDone - _ramReported >= ProgressStep) ReportProgress(force: false);
                continue;
            }
            foreach (var (first, count, data) in MappedRam.Runs(bitmap, pageCount))
            {
                long offset = first * MigrationFormat.PageSize, length = count * MigrationFormat.PageSize;
                if (!data)
                {
                    _sink?.WriteZeroPages(b, offset, length);
                    _output?.ZeroPages(b, offset, length);
                    _ramDone += length;
                    continue;
                }
                _in.Seek(_start + pagesOffset + offset);
                _chunks ??= new ChunkPool(MigrationStreamWriter.DefaultChunkBytes);
                for (long done = 0; done < length;)
                {
                    _cancellation.ThrowIfCancellationRequested();
                    ThrowIfCopyFailed();
                    int n = (int)Math.Min(_chunks.ChunkBytes, length - done);
                    ChunkPool.Chunk chunk = _chunks.Rent();
                    try
                    {
                        Bytes(chunk.Buffer.AsSpan(0, n), $"pages of RAM block '{block.Id}'");
                        _sink?.WritePages(b, offset + done, chunk.Buffer.AsSpan(0, n));
                    }
                    catch
                    {
                        chunk.Dispose();
                        throw;
                    }
                    if (_output is not null) _output.Pages(b, offset + done, chunk.Buffer.AsMemory(0, n), chunk);
                    else chunk.Dispose();
                    done += n;
                    _ramDone += n;
                    if (_ramDone - _ramReported >= ProgressStep) ReportProgress(force: false);
                }
            }
        }
        _output?.EndPlacedPages();
        _in.Seek(resume);
        _forward = forward;
    }

    /// <summary>The block a page record is for: the previous one (CONTINUE) or the one its id string names.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private int BlockOf(ulong flags, long at, ulong address)
    {
        if (!_haveBlockList)
            throw new MigrationStreamException("a RAM page before the block list (MEM_SIZE)", at);
        int block;
        if ((flags & MigrationFormat.RamContinue) != 0)
        {
            if (_lastBlock < 0)
                throw new MigrationStreamException("a RAM page with CONTINUE (0x20) but no previous page named a block", at);
            block = _lastBlock;
        }
        else
        {
            Span<byte> id = stackalloc byte[MigrationFormat.MaxIdLength];
            int length = U8("a RAM block id length");
            Bytes(id[..length], "a RAM block id");
            block = -1;
            for (int i = 0; i < _blockIds.Length; i++)
                if (id[..length].SequenceEqual(_blockIds[i])) { block = i; break; }
            if (block < 0)
                throw new MigrationStreamException(
                    $"a page of RAM block '{Encoding.UTF8.GetString(id[..length])}', which is not in the stream's block list (MEM_SIZE)", at);
            _lastBlock = block;
        }
        if (address > (ulong)_blocks[block].Length - MigrationFormat.PageSize)
            throw new MigrationStreamException(
                $"a page at offset 0x{address:x} of RAM block '{_blocks[block].Id}', which is only {_blocks[block].Length} bytes long", at);
        return block;
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private void AddData(int block, long offset)
    {
        _pages[block]++;
        if (_sink is null)
        {
            if (_tee is null)
            {
                Skip(MigrationFormat.PageSize, "a RAM page");
            }
            else
            {
                _scratch ??= new byte[MigrationFormat.PageSize];
                Bytes(_scratch, "a RAM page");
                if (_output is MappedRamOutput placed) placed.Pages(block, offset, _scratch, null);
            }
            Done();
            return;
        }
        if (_zeroLength > 0) FlushZero();
        if (_dataLength > 0 && (block != _dataBlock || offset != _dataStart + _dataLength || _dataLength == BatchBytes))
            FlushData();
        if (_dataLength == 0)
        {
            _dataBlock = block;
            _dataStart = offset;
        }
        _batch ??= GC.AllocateUninitializedArray<byte>(BatchBytes);
        Bytes(_batch.AsSpan(_dataLength, MigrationFormat.PageSize), "a RAM page");
        _dataLength += MigrationFormat.PageSize;
        Done();
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private void AddZero(int block, long offset)
    {
        _zeroPages[block]++;
        if (_output is MappedRamOutput placed) placed.ZeroPages(block, offset, MigrationFormat.PageSize);
        if (_sink is not null)
        {
            if (_dataLength > 0) FlushData();
            if (_zeroLength > 0 && (block != _zeroBlock || offset != _zeroStart + _zeroLength)) FlushZero();
            if (_zeroLength == 0)
            {
                _zeroBlock = block;
                _zeroStart = offset;
            }
            _zeroLength += MigrationFormat.PageSize;
        }
        Done();
    }

    /// <summary>A ZERO record whose fill byte is not 0 (old QEMU's "compressed" page): a page of that byte.</summary>
    private void AddFilled(int block, long offset, byte fill)
    {
        _zeroPages[block]++;
        byte[] page = new byte[MigrationFormat.PageSize];
        page.AsSpan().Fill(fill);
        if (_output is MappedRamOutput placed) placed.Pages(block, offset, page, null);
        if (_sink is not null)
        {
            FlushBatches();
            _sink.WritePages(block, offset, page);
        }
        Done();
    }

    private void Done()
    {
        _ramDone += MigrationFormat.PageSize;
        if (_ramDone - _ramReported >= ProgressStep) ReportProgress(force: false);
    }

    private void ReportProgress(bool force)
    {
        _cancellation.ThrowIfCancellationRequested();
        ThrowIfCopyFailed();
        if (_progress is null || (!force && _ramDone == _ramReported)) return;
        _ramReported = _ramDone;
        _progress.Report(_ramDone);
    }

    /// <summary>A copy stops at the first failed write of its target instead of parsing on for nothing.</summary>
    private void ThrowIfCopyFailed()
    {
        if (_tee?.Error is { } error)
            throw new VmStateException($"writing the copy failed at offset {_tee.Tell()}: {error.Message}", error);
    }

    private void FlushBatches()
    {
        if (_dataLength > 0) FlushData();
        if (_zeroLength > 0) FlushZero();
    }

    private void FlushData()
    {
        _sink!.WritePages(_dataBlock, _dataStart, _batch.AsSpan(0, _dataLength));
        _dataLength = 0;
    }

    private void FlushZero()
    {
        _sink!.WriteZeroPages(_zeroBlock, _zeroStart, _zeroLength);
        _zeroLength = 0;
    }

    /// <summary>
    /// The rest of the stream: device sections, EOF and the VM description. Its length is what is left of the
    /// backend, or follows from the length the stream's writer counted: for a mapped-ram stream that count
    /// covers the stream's own bytes plus the bitmaps and the pages with data, not the layout's holes.
    /// </summary>
    private byte[] ReadTail(long tailOffset)
    {
        bool forward = _forward;
        if (Rewriting) _forward = false;
        try
        {
            if (_length is not long length) return ReadToEnd();
            long streamBytes = tailOffset - _start - _skippedByLayout + (_mapped ? _placedBytesWritten : 0);
            long tail = length - streamBytes;
            if (tail <= 0 || tail > MaxDeviceStateBytes)
                throw new MigrationStreamException(
                    $"the VM-state size {length} leaves {tail} bytes for the device state after the RAM section" +
                    (_mapped ? $" ({streamBytes} bytes of stream, bitmaps and pages before it)" : "") + "; the size does not fit the stream", tailOffset);
            byte[] bytes = new byte[tail];
            Bytes(bytes, "the device state");
            return bytes;
        }
        finally
        {
            _forward = forward;
        }
    }

    private byte[] ReadToEnd()
    {
        byte[] chunk = new byte[64 << 10];
        using var all = new MemoryStream();
        while (true)
        {
            int n = _in.Peek(chunk);
            if (n == 0) break;
            Bytes(chunk.AsSpan(0, n), "the device state");
            all.Write(chunk, 0, n);
            if (all.Length > MaxDeviceStateBytes)
                throw new MigrationStreamException(
                    $"more than {MaxDeviceStateBytes} bytes of device state after the RAM section; is the stream bounded to its length?", _in.Position);
        }
        return all.ToArray();
    }

    // Typed reads: each forwards what it read to the copy target (while forwarding is on), and turns a
    // premature end into an error that says what was being read.

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private byte U8(string what)
    {
        long at = _in.Position;
        try
        {
            byte b = _in.GetByte();
            if (_forward) _tee?.PutByte(b);
            return b;
        }
        catch (VmStateException e) { throw Truncated(what, at, e); }
    }

    private ushort Be16(string what)
    {
        long at = _in.Position;
        try
        {
            ushort v = _in.GetBe16();
            if (_forward) _tee?.PutBe16(v);
            return v;
        }
        catch (VmStateException e) { throw Truncated(what, at, e); }
    }

    private uint Be32(string what)
    {
        long at = _in.Position;
        try
        {
            uint v = _in.GetBe32();
            if (_forward) _tee?.PutBe32(v);
            return v;
        }
        catch (VmStateException e) { throw Truncated(what, at, e); }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private ulong Be64(string what)
    {
        long at = _in.Position;
        try
        {
            ulong v = _in.GetBe64();
            if (_forward) _tee?.PutBe64(v);
            return v;
        }
        catch (VmStateException e) { throw Truncated(what, at, e); }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private void Bytes(Span<byte> buffer, string what)
    {
        long at = _in.Position;
        try
        {
            _in.Read(buffer);
            if (_forward) _tee?.PutBuffer(buffer);
        }
        catch (VmStateException e) { throw Truncated(what, at, e); }
    }

    private void Skip(int count, string what)
    {
        long at = _in.Position;
        try
        {
            _in.Skip(count);
        }
        catch (VmStateException e) { throw Truncated(what, at, e); }
    }

    private string IdString(string what)
    {
        Span<byte> id = stackalloc byte[MigrationFormat.MaxIdLength];
        int length = U8(what + "'s length");
        Bytes(id[..length], what);
        return Encoding.UTF8.GetString(id[..length]);
    }

    private byte[] IdBytes(string what)
    {
        byte[] id = new byte[U8(what + "'s length")];
        Bytes(id, what);
        return id;
    }

    private static MigrationStreamException Truncated(string what, long at, VmStateException e) =>
        new($"could not read {what}: {e.Message}", at, e);

    private static void WriteId(Stream s, string id)
    {
        byte[] bytes = Encoding.UTF8.GetBytes(id);
        s.WriteByte((byte)bytes.Length);
        s.Write(bytes);
    }

    private static void WriteBe32(Stream s, uint value)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(b, value);
        s.Write(b);
    }
}

/// <summary>How a copy lays out the RAM of the stream it writes.</summary>
public enum MigrationStreamFormat
{
    /// <summary>
    /// A plain stream (PAGE and ZERO records), what savevm writes into a snapshot and <c>-incoming</c> reads: a plain
    /// source is copied byte for byte, a mapped-ram source is rewritten.
    /// </summary>
    Plain,

    /// <summary>
    /// A mapped-ram file (QEMU 9.0+, <c>migrate-incoming file:PATH</c> with capability mapped-ram, optionally multifd and
    /// direct-io): each block's pages at 1 MiB-aligned offsets, zero pages left out, the bitmaps written last.
    /// </summary>
    MappedRam,
}
