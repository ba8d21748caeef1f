using System.Buffers.Binary;
using System.Text;
using Vmsnap.VmState;

namespace Vmsnap.Migration;

/// <summary>
/// Parses a migration stream from a <see cref="VmStateReader"/>: header, configuration, the RAM
/// section (start, parts, end) record by record, then the device state to the end of the stream.
/// Pages go to an optional <see cref="IRamSink"/>; every byte read can be forwarded unchanged to an
/// optional <see cref="VmStateWriter"/> (a validating copy).
/// </summary>
/// <remarks>
/// The stream runs to the end of the reader's backend: a VM-state area must be bounded to the
/// snapshot's VM-state size. Everything after the RAM section's end is held in memory (a few hundred
/// KiB for a PC), up to <see cref="MaxDeviceStateBytes"/>.
/// </remarks>
internal sealed class MigrationStreamReader
{
    /// <summary>Bound on the device state after the RAM section that is held in memory.</summary>
    public const int MaxDeviceStateBytes = 256 << 20;

    private const int BatchBytes = 1 << 20;
    private const long ProgressStep = 16 << 20;

    private readonly VmStateReader _in;
    private readonly IRamSink? _sink;
    private readonly VmStateWriter? _tee;
    private readonly IProgress<long>? _progress;
    private readonly CancellationToken _cancellation;

    private readonly List<MigrationSectionInfo> _sections = new();
    private readonly List<RamBlockInfo> _blocks = new();
    private byte[][] _blockIds = [];
    private long[] _pages = [];
    private long[] _zeroPages = [];
    private bool _haveBlockList;
    private int _lastBlock = -1;

    // RAM section bookkeeping.
    private bool _ramStarted;
    private uint _ramId;
    private long _ramOffset;
    private int _ramRecords;
    private long _ramBytes;

    // Batches of consecutive pages handed to the sink in one call.
    private byte[]? _batch;
    private int _dataBlock = -1;
    private long _dataStart;
    private int _dataLength;
    private int _zeroBlock = -1;
    private long _zeroStart;
    private long _zeroLength;
    private byte[]? _scratch;

    private long _ramDone;
    private long _ramReported;

    public MigrationStreamReader(VmStateReader input, IRamSink? sink, VmStateWriter? tee, IProgress<long>? progress, CancellationToken cancellation)
    {
        _in = input;
        _sink = sink;
        _tee = tee;
        _progress = progress;
        _cancellation = cancellation;
    }

    /// <summary>Machine type from the configuration section, or null.</summary>
    public string? MachineType { get; private set; }

    /// <summary>The configuration's subsections (target page bits, UUID) as they were in the stream, for writing them back.</summary>
    public byte[] ConfigurationSubsections { get; private set; } = [];

    public uint RamSectionId => _ramId;
    public uint RamInstance { get; private set; }
    public IReadOnlyList<RamBlockInfo> Blocks => _blocks;

    /// <summary>Everything after the RAM section's end, verbatim.</summary>
    public byte[] DeviceState { get; private set; } = [];

    /// <summary>Reads the whole stream, then completes the sink.</summary>
    public MigrationStreamInfo Read()
    {
        long start = _in.Position;
        ReadHeader();
        bool configuration = false;
        bool ramEnded = false;
        while (!ramEnded)
        {
            _cancellation.ThrowIfCancellationRequested();
            ThrowIfCopyFailed();
            long at = _in.Position;
            byte type = U8("a section type");
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
                    ReadRamRecords(at, start: false);
                    ReadFooter(id, "ram");
                    _ramRecords++;
                    _ramBytes += _in.Position - at;
                    ramEnded = type == MigrationFormat.SectionEnd;
                    break;
                }
                case MigrationFormat.SectionFull:
                {
                    uint id = Be32("a section id");
                    string name = IdString("a section id string");
                    throw new MigrationStreamException(
                        $"device section '{name}' (id {id}) before the RAM section's end; vmsnap reads streams whose RAM section " +
                        "comes first and ends before the device sections (as savevm and precopy migration write them)", at);
                }
                case MigrationFormat.Command:
                {
                    ushort command = Be16("a command number");
                    ushort length = Be16("a command length");
                    if (command == MigrationFormat.CommandSwitchoverStart && length == 0) break;
                    throw new MigrationStreamException(
                        $"command section (command {command}, {length} bytes) is not supported; streams of postcopy, COLO or " +
                        "return-path migrations cannot be read", at);
                }
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
        DeviceState = ReadToEnd();
        DeviceStateTail tail = DeviceStateTail.Analyze(DeviceState, tailOffset);
        _sections.AddRange(tail.Sections);
        ReportProgress(force: true);
        if (_tee is not null)
        {
            _tee.Flush();
            ThrowIfCopyFailed();
        }
        _sink?.Complete();

        var blocks = new RamBlockSummary[_blocks.Count];
        for (int i = 0; i < blocks.Length; i++)
            blocks[i] = new RamBlockSummary(_blocks[i].Id, _blocks[i].Length, _pages[i], _zeroPages[i]);
        return new MigrationStreamInfo(MachineType, _sections.ToArray(), blocks,
            tail.Description.ToDeviceInfos(), _in.Position - start, DeviceState.Length, tail.Problem);
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

        // Subsections follow as long as the next byte says so (QEMU peeks the same way).
        using var raw = new MemoryStream();
        Span<byte> next = stackalloc byte[1];
        while (_in.Peek(next) == 1 && next[0] == MigrationFormat.Subsection)
        {
            long subAt = _in.Position;
            U8("a subsection marker");
            string sub = IdString("a subsection name");
            uint version = Be32("a subsection version");
            raw.WriteByte(MigrationFormat.Subsection);
            WriteId(raw, sub);
            WriteBe32(raw, version);
            switch (sub)
            {
                case "configuration/target-page-bits":
                {
                    uint bits = Be32("the target page bits");
                    if (bits != MigrationFormat.PageShift)
                        throw new MigrationStreamException(
                            $"target pages of 2^{bits} bytes; vmsnap reads streams of 4 KiB target pages (12 bits)", subAt);
                    WriteBe32(raw, bits);
                    break;
                }
                case "configuration/capabilities":
                {
                    uint count = Be32("the capability count");
                    var names = new List<string>();
                    for (uint i = 0; i < count && i < 64; i++) names.Add(IdString("a capability name"));
                    if (count > 0)
                        throw new MigrationStreamException(
                            $"the stream was written with migration capabilities {string.Join(", ", names.Select(n => $"'{n}'"))}, " +
                            "which change the RAM section's layout; vmsnap reads streams written without them", subAt);
                    WriteBe32(raw, count);
                    break;
                }
                case "configuration/uuid":
                {
                    byte[] uuid = new byte[16];
                    Bytes(uuid, "the UUID");
                    raw.Write(uuid);
                    break;
                }
                default:
                    throw new MigrationStreamException($"unknown configuration subsection '{sub}'", subAt);
            }
        }
        ConfigurationSubsections = raw.ToArray();
        _sections.Add(new MigrationSectionInfo(MigrationSectionKind.Configuration, -1, "configuration", 0, 1, at, 1, _in.Position - at));
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
        ReadRamRecords(at, start: true);
        if (!_haveBlockList)
            throw new MigrationStreamException("the RAM section's start has no block list (MEM_SIZE record)", at);
        ReadFooter(id, name);
        _ramRecords = 1;
        _ramBytes = _in.Position - at;
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

    private void ReadRamRecords(long sectionAt, bool start)
    {
        const ulong known = MigrationFormat.RamZero | MigrationFormat.RamMemSize | MigrationFormat.RamPage
            | MigrationFormat.RamEos | MigrationFormat.RamContinue;
        while (true)
        {
            long at = _in.Position;
            ulong header = Be64("a RAM record header");
            ulong flags = header & MigrationFormat.RamFlagMask;
            ulong address = header & ~MigrationFormat.RamFlagMask;
            ulong unsupported = flags & ~known;
            if (unsupported != 0)
            {
                ulong lowest = unsupported & (ulong)-(long)unsupported;
                throw new MigrationStreamException(
                    $"RAM record with flag {MigrationFormat.DescribeUnsupportedRamFlag(lowest)} (flags 0x{flags:x}); vmsnap reads plain " +
                    "precopy RAM (PAGE, ZERO, CONTINUE, MEM_SIZE, EOS), not XBZRLE, compressed, multifd or RDMA streams", at);
            }
            switch (flags & ~MigrationFormat.RamContinue)
            {
                case MigrationFormat.RamMemSize when flags == MigrationFormat.RamMemSize:
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
                    FlushBatches();
                    return;
                default:
                    throw new MigrationStreamException(
                        $"RAM record with flags 0x{flags:x}, expected one of PAGE (0x08), ZERO (0x02) [with CONTINUE (0x20)], MEM_SIZE (0x04) or EOS (0x10)", at);
            }
        }
    }

    private void ReadBlockList(ulong total, long at)
    {
        ulong remaining = total;
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
            remaining -= length;
        }
        _blockIds = _blocks.Select(b => Encoding.UTF8.GetBytes(b.Id)).ToArray();
        _pages = new long[_blocks.Count];
        _zeroPages = new long[_blocks.Count];
        _haveBlockList = true;
        if (_blocks.Count == 0) throw new MigrationStreamException("the RAM block list is empty (MEM_SIZE of 0)", at);
        _sink?.BeginBlocks(_blocks.ToArray());
        (_progress as IRamProgress)?.ReportTotal((long)total);
    }

    /// <summary>The block a page record is for: the previous one (CONTINUE) or the one its id string names.</summary>
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

    private void AddZero(int block, long offset)
    {
        _zeroPages[block]++;
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
        if (_sink is not null)
        {
            FlushBatches();
            byte[] page = new byte[MigrationFormat.PageSize];
            page.AsSpan().Fill(fill);
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

    /// <summary>The rest of the stream: device sections, EOF and the VM description.</summary>
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

    // Typed reads: each forwards what it read to the copy target, and turns a premature end into an
    // error that says what was being read.

    private byte U8(string what)
    {
        long at = _in.Position;
        try
        {
            byte b = _in.GetByte();
            _tee?.PutByte(b);
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
            _tee?.PutBe16(v);
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
            _tee?.PutBe32(v);
            return v;
        }
        catch (VmStateException e) { throw Truncated(what, at, e); }
    }

    private ulong Be64(string what)
    {
        long at = _in.Position;
        try
        {
            ulong v = _in.GetBe64();
            _tee?.PutBe64(v);
            return v;
        }
        catch (VmStateException e) { throw Truncated(what, at, e); }
    }

    private void Bytes(Span<byte> buffer, string what)
    {
        long at = _in.Position;
        try
        {
            _in.Read(buffer);
            _tee?.PutBuffer(buffer);
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
