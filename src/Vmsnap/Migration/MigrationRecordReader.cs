using System.Buffers.Binary;
using System.Runtime.CompilerServices;
using System.Text;
using Vmsnap.VmState;
using Vmsnap.VmState.LowLevel;

namespace Vmsnap.Migration;

/// <summary>
/// Pulls the records of a migration stream from a <see cref="VmStateReader"/>, one per <see cref="Next"/>, each
/// checked as it is read: header, configuration, the RAM section record by record (runs of pages and zero pages
/// inside its start, parts and end), early-setup device sections and commands where they come, then the device
/// state after the RAM section's end (device sections, EOF, the VM description).
/// </summary>
/// <remarks>
/// <para>The stream runs to the end of the reader's backend, or to the length given (a snapshot's VM-state size).
/// Everything after the RAM section's end is held in memory (a few hundred KiB for a PC), up to
/// <see cref="MaxDeviceStateBytes"/>.</para>
/// <para>A mapped-ram stream (capability <c>mapped-ram</c>) places each block's bitmap and pages by offset and
/// continues after them; it is read from a positional backend only. Its pages come as placed runs
/// (<see cref="RamRunRecord.Placed"/>), block by block, where the source's first RAM part begins (after the
/// early-setup sections). A snapshot's VM-state size counts what QEMU wrote (the stream's own bytes, the pages with
/// data and the bitmaps), not how far the layout reaches; the stream's end follows from it.</para>
/// <para>Page data is valid until the next call.</para>
/// </remarks>
internal sealed class MigrationRecordReader
{
    /// <summary>Bound on the device state after the RAM section that is held in memory.</summary>
    public const int MaxDeviceStateBytes = 256 << 20;

    /// <summary>Bound on one early-setup section (found by its footer: such sections carry no length).</summary>
    public const int MaxEarlySectionBytes = 1 << 20;

    /// <summary>
    /// Bytes of pages a run holds at most (a run also ends where the pages stop being consecutive): a load hands runs
    /// this long to its files, fewer and larger writes.
    /// </summary>
    public const int DefaultRunBytes = 1 << 20;

    /// <summary>Runs for a copy, which writes each page again: runs this short stay in the CPU's cache from the read to the write (measured: 13 % less CPU than 1 MiB runs).</summary>
    public const int CopyRunBytes = 64 << 10;

    private const int PageRecordStride = 8 + MigrationFormat.PageSize;

    private enum Phase { Header, Sections, RamRecords, Queued, Done }

    private readonly StreamInput _in;
    private readonly long? _length;
    private readonly bool _pageData;
    private readonly int _runBytes;
    private readonly long _start;
    private Phase _phase;

    // What the stream said so far.
    private ConfigurationRecord? _configuration;
    private RamStartRecord? _ram;
    private bool _ramDataSeen;       // a PART, END or command came after the start: no early-setup section any more
    private byte _section;           // the RAM section record being read: start, part or end
    private int _lastBlock = -1;     // the block a CONTINUE record means
    private MappedRamPages? _placed; // a mapped-ram stream's pages

    // Records made ahead (a mapped-ram stream's pages, the device state), and the phase after them.
    private IEnumerator<MigrationRecord>? _queued;
    private Phase _afterQueued;

    // A RAM record header a run read ahead and did not take (with a ZERO record's fill byte, when that was read too):
    // the next record starts with it.
    private long _aheadAt = -1;
    private ulong _ahead;
    private int _aheadFill = -1;

    private RamPagesRecord? _lastPages;
    private byte[]? _run;

    /// <param name="input">The stream, from its current position.</param>
    /// <param name="length">What the stream's writer counted (a snapshot's VM-state size), when the backend may reach further; null: to the backend's end.</param>
    /// <param name="pageData">Read the data of pages (false: skip it; runs come with empty data).</param>
    /// <param name="runBytes">Most bytes of pages in one run (a multiple of 4096).</param>
    public MigrationRecordReader(VmStateReader input, long? length = null, bool pageData = true, int runBytes = DefaultRunBytes)
    {
        if (runBytes < MigrationFormat.PageSize || runBytes % MigrationFormat.PageSize != 0)
            throw new ArgumentOutOfRangeException(nameof(runBytes), runBytes, "runs hold whole pages");
        _in = new StreamInput(input);
        _length = length;
        _pageData = pageData;
        _runBytes = runBytes;
        _start = input.Position;
    }

    /// <summary>The next record, or null after the VM description (the stream's last).</summary>
    /// <exception cref="MigrationStreamException">The stream is malformed, truncated or uses something vmsnap does not read.</exception>
    public MigrationRecord? Next()
    {
        _lastPages?.Release();
        _lastPages = null;
        MigrationRecord? record = _phase switch
        {
            Phase.Header => Header(),
            Phase.Sections => Section(),
            Phase.RamRecords => RamRecord(),
            Phase.Queued => Queued(),
            _ => null,
        };
        _lastPages = record as RamPagesRecord;
        return record;
    }

    private StreamHeaderRecord Header()
    {
        StreamHeaderRecord header = RecordHeaders.ReadStreamHeader(_in);
        _phase = Phase.Sections;
        return header;
    }

    /// <summary>A top-level record before the RAM section's end.</summary>
    private MigrationRecord? Section()
    {
        long at = _in.Position;
        byte type = _in.PeekByte("a section type");
        if (_placed is { Delivered: false } && type is MigrationFormat.SectionPart or MigrationFormat.SectionEnd or MigrationFormat.Command)
        {
            Queue(_placed.Records(), Phase.Sections);
            return Queued();
        }
        _in.U8("a section type");
        switch (type)
        {
            case MigrationFormat.Configuration:
            {
                if (_configuration is not null || _ram is not null)
                    throw new MigrationStreamException("a second or late configuration section; it must come once, right after the header", at);
                return _configuration = RecordHeaders.ReadConfiguration(_in, at);
            }
            case MigrationFormat.SectionStart:
                return SectionStart(at);
            case MigrationFormat.SectionPart:
            case MigrationFormat.SectionEnd:
            {
                uint id = _in.Be32("a section id");
                if (_ram is null || id != _ram.SectionId)
                    throw new MigrationStreamException(
                        $"{MigrationFormat.DescribeSectionType(type)} for section id {id}, which no SECTION_START opened" +
                        (_ram is not null ? $" (the RAM section is id {_ram.SectionId})" : ""), at);
                _ramDataSeen = true;
                OpenRamRecords(type);
                return new RamSectionRecord(at, type, id);
            }
            case MigrationFormat.SectionFull:
                return EarlySection(at);
            case MigrationFormat.Command:
            {
                CommandRecord command = RecordHeaders.ReadCommand(_in, at, _ram is not null);
                _ramDataSeen = true;
                return command;
            }
            case MigrationFormat.Eof:
                throw new MigrationStreamException(
                    _ram is not null ? "EOF (0x00) before the RAM section's end (SECTION_END)" : "EOF (0x00) before any RAM section", at);
            default:
                throw new MigrationStreamException(
                    $"{MigrationFormat.DescribeSectionType(type)} where a section was expected " +
                    "(CONFIGURATION 0x07, SECTION_START 0x01, SECTION_PART 0x02, SECTION_END 0x03)", at);
        }
    }

    /// <summary>The RAM section's start: its header, then its block list, which must be its first RAM record.</summary>
    private MigrationRecord SectionStart(long at)
    {
        (uint id, byte[] nameBytes, uint instance, uint version) = RecordHeaders.ReadSectionHeader(_in);
        string name = Encoding.UTF8.GetString(nameBytes);
        if (name != MigrationFormat.RamSectionName)
            throw new MigrationStreamException(
                $"iterative section '{name}' (id {id}); vmsnap reads streams whose only iterative section is 'ram' " +
                "(block migration, dirty bitmaps and VFIO devices are not supported)", at);
        if (_ram is not null)
            throw new MigrationStreamException($"a second RAM section (id {id}); the first one is id {_ram.SectionId}", at);
        if (version != MigrationFormat.RamSectionVersion)
            throw new MigrationStreamException($"RAM section version {version}, expected {MigrationFormat.RamSectionVersion}", at);
        OpenRamRecords(MigrationFormat.SectionStart);
        // The start's first RAM record: the block list, which makes the start's record.
        long headerAt = _in.Position;
        ulong header = _in.Be64("a RAM record header");
        if ((header & MigrationFormat.RamFlagMask) == MigrationFormat.RamEos)
            throw new MigrationStreamException("the RAM section's start has no block list (MEM_SIZE record)", at);
        if ((header & MigrationFormat.RamFlagMask) != MigrationFormat.RamMemSize)
            return RamRecord(headerAt, header);   // refused there: what it is says why
        bool mapped = _configuration?.MappedRam ?? false;
        RecordHeaders.BlockList list = RecordHeaders.ReadBlockList(_in, header & ~MigrationFormat.RamFlagMask, headerAt, mapped, _start);
        _ram = new RamStartRecord(at, _in.Position - at - list.Skipped, id, instance, version, list.Blocks, list.Ids, list.Placements);
        if (mapped) _placed = new MappedRamPages(_in, _start, _ram, list.Skipped, list.BitmapBytes, _pageData);
        return _ram;
    }

    private void OpenRamRecords(byte type)
    {
        _section = type;
        _phase = Phase.RamRecords;
    }

    /// <summary>The next record inside a RAM section record: a run of pages or zero pages, or the EOS and footer that end it.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private MigrationRecord RamRecord()
    {
        long at = _aheadAt;
        if (at >= 0)
        {
            _aheadAt = -1;
            return RamRecord(at, _ahead);
        }
        at = _in.Position;
        return RamRecord(at, _in.Be64("a RAM record header"));
    }

    private void Ahead(long at, ulong header, int fill = -1)
    {
        _aheadAt = at;
        _ahead = header;
        _aheadFill = fill;
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private MigrationRecord RamRecord(long at, ulong header)
    {
        ulong flags = header & MigrationFormat.RamFlagMask;
        ulong address = header & ~MigrationFormat.RamFlagMask;
        RecordHeaders.CheckRamFlags(flags, at, _configuration?.MappedRam ?? false);
        switch (flags & ~MigrationFormat.RamContinue)
        {
            case MigrationFormat.RamMemSize when flags == MigrationFormat.RamMemSize:
                throw new MigrationStreamException("a RAM block list (MEM_SIZE) outside the RAM section's start", at);
            case MigrationFormat.RamPage:
                return Pages(at, flags, BlockOf(flags, at, address), (long)address);
            case MigrationFormat.RamZero:
            {
                int block = BlockOf(flags, at, address);
                byte fill = _aheadFill >= 0 ? (byte)_aheadFill : _in.U8("a zero page's fill byte");
                _aheadFill = -1;
                return ZeroPages(at, flags, block, (long)address, fill);
            }
            case MigrationFormat.RamEos when flags == MigrationFormat.RamEos:
                RecordHeaders.ReadFooter(_in, _ram!.SectionId, MigrationFormat.RamSectionName);
                if (_section == MigrationFormat.SectionEnd) Queue(DeviceState(), Phase.Done);
                else _phase = Phase.Sections;
                return new RamSectionFooterRecord(at, _ram.SectionId, header);
            default:
                throw new MigrationStreamException(
                    $"RAM record with flags 0x{flags:x}, expected one of PAGE (0x08), ZERO (0x02) [with CONTINUE (0x20)], MEM_SIZE (0x04) or EOS (0x10)", at);
        }
    }

    /// <summary>The block a page record is for: the previous one (CONTINUE) or the one its id string names.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private int BlockOf(ulong flags, long at, ulong address)
    {
        RamStartRecord ram = _ram ?? throw new MigrationStreamException("a RAM page before the block list (MEM_SIZE)", at);
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
            int length = _in.U8("a RAM block id length");
            _in.Bytes(id[..length], "a RAM block id");
            block = -1;
            for (int i = 0; i < ram.BlockIds.Length; i++)
                if (id[..length].SequenceEqual(ram.BlockIds[i])) { block = i; break; }
            if (block < 0)
                throw new MigrationStreamException(
                    $"a page of RAM block '{Encoding.UTF8.GetString(id[..length])}', which is not in the stream's block list (MEM_SIZE)", at);
            _lastBlock = block;
        }
        RamBlockInfo info = ram.Blocks[block];
        if (address > (ulong)info.Length - MigrationFormat.PageSize)
            throw new MigrationStreamException(
                $"a page at offset 0x{address:x} of RAM block '{info.Id}', which is only {info.Length} bytes long", at);
        return block;
    }

    /// <summary>
    /// A PAGE record and the ones right after it that continue it (CONTINUE, the next page of the block), up to
    /// the run's bytes: one run.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private RamPagesRecord Pages(long at, ulong flags, int block, long address)
    {
        long dataOffset = _in.Position;
        long last = _ram!.Blocks[block].Length - MigrationFormat.PageSize;
        int bytes = 0;
        long end;
        while (true)
        {
            if (_pageData)
            {
                _run ??= GC.AllocateUninitializedArray<byte>(_runBytes);
                _in.Bytes(_run.AsSpan(bytes, MigrationFormat.PageSize), "a RAM page");
            }
            else
            {
                _in.Skip(MigrationFormat.PageSize, "a RAM page");
            }
            bytes += MigrationFormat.PageSize;
            end = _in.Position;
            long following = address + bytes;
            if (bytes == _runBytes || following > last) break;
            ulong header = _in.Be64("a RAM record header");
            if (header != ((ulong)following | MigrationFormat.RamPage | MigrationFormat.RamContinue))
            {
                Ahead(end, header);
                break;
            }
        }
        return new RamPagesRecord(at, end - at, block, address, bytes, (flags & MigrationFormat.RamContinue) == 0, false,
            dataOffset, PageRecordStride, _pageData ? _run.AsMemory(0, bytes) : default);
    }

    /// <summary>A ZERO record and the ones right after it that continue it (CONTINUE, the next page, fill byte 0): one run. A page of another fill byte is a run of its own.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private RamZeroPagesRecord ZeroPages(long at, ulong flags, int block, long address, byte fill)
    {
        long last = _ram!.Blocks[block].Length - MigrationFormat.PageSize;
        long bytes = MigrationFormat.PageSize;
        long end = _in.Position;
        while (fill == 0)
        {
            long following = address + bytes;
            if (following > last) break;
            ulong header = _in.Be64("a RAM record header");
            if (header != ((ulong)following | MigrationFormat.RamZero | MigrationFormat.RamContinue))
            {
                Ahead(end, header);
                break;
            }
            byte nextFill = _in.U8("a zero page's fill byte");
            if (nextFill != 0)
            {
                Ahead(end, header, nextFill);
                break;
            }
            bytes += MigrationFormat.PageSize;
            end = _in.Position;
        }
        return new RamZeroPagesRecord(at, end - at, block, address, bytes, (flags & MigrationFormat.RamContinue) == 0, false, fill);
    }

    /// <summary>
    /// A device's full section before the RAM section's parts: QEMU 8.0+ saves <c>early_setup</c> devices
    /// (virtio-mem) there, right after the RAM section's start. It carries no length; its end is the first
    /// footer naming its section id that a record QEMU could write next follows.
    /// </summary>
    private DeviceSectionRecord EarlySection(long at)
    {
        (uint id, byte[] nameBytes, uint instance, uint version) = RecordHeaders.ReadSectionHeader(_in);
        string name = Encoding.UTF8.GetString(nameBytes);
        if (_ramDataSeen || _configuration is null)
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
        // The header as it was read (the id string's own bytes: decoding may not give them back), the fields, the footer.
        byte[] bytes = new byte[headerBytes + end];
        bytes[0] = MigrationFormat.SectionFull;
        BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(1), id);
        bytes[5] = (byte)nameBytes.Length;
        nameBytes.CopyTo(bytes, 6);
        BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(6 + nameBytes.Length), instance);
        BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(10 + nameBytes.Length), version);
        _in.Bytes(bytes.AsSpan(headerBytes, end - 5), $"early-setup section '{name}'");
        RecordHeaders.ReadFooter(_in, id, name);
        bytes[^5] = MigrationFormat.SectionFooter;
        BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(bytes.Length - 4), id);
        return new DeviceSectionRecord(at, MigrationSectionKind.EarlySetup, bytes);
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
            MigrationFormat.SectionPart or MigrationFormat.SectionEnd => _ram is not null && id == _ram.SectionId,
            MigrationFormat.SectionStart => _ram is null,
            MigrationFormat.SectionFull => next.Length >= 6 && next[5] > 0,
            MigrationFormat.Command => next[1] == 0 && next[2] == MigrationFormat.CommandSwitchoverStart,
            _ => false,
        };
    }

    /// <summary>Takes the next records from <paramref name="records"/> until they run out, then goes on in <paramref name="after"/>.</summary>
    private void Queue(IEnumerable<MigrationRecord> records, Phase after)
    {
        _queued = records.GetEnumerator();
        _afterQueued = after;
        _phase = Phase.Queued;
    }

    private MigrationRecord? Queued()
    {
        if (_queued!.MoveNext()) return _queued.Current;
        _queued.Dispose();
        _queued = null;
        _phase = _afterQueued;
        return _phase == Phase.Sections ? Section() : null;
    }

    /// <summary>The device state after the RAM section's end, read whole (when its first record is asked for), as records.</summary>
    private IEnumerable<MigrationRecord> DeviceState()
    {
        long tailOffset = _in.Position;
        foreach (MigrationRecord record in DeviceStateTail.Records(ReadTail(tailOffset), tailOffset)) yield return record;
    }

    /// <summary>
    /// The rest of the stream: device sections, EOF and the VM description. Its length is what is left of the
    /// backend, or follows from the length the stream's writer counted: for a mapped-ram stream that count
    /// covers the stream's own bytes plus the bitmaps and the pages with data, not the layout's holes.
    /// </summary>
    private byte[] ReadTail(long tailOffset)
    {
        if (_length is not long length) return ReadToEnd();
        long streamBytes = tailOffset - _start - (_placed is null ? 0 : _placed.SkippedBytes - _placed.CountedBytes);
        long tail = length - streamBytes;
        if (tail <= 0 || tail > MaxDeviceStateBytes)
            throw new MigrationStreamException(
                $"the VM-state size {length} leaves {tail} bytes for the device state after the RAM section" +
                (_placed is not null ? $" ({streamBytes} bytes of stream, bitmaps and pages before it)" : "") + "; the size does not fit the stream", tailOffset);
        byte[] bytes = new byte[tail];
        _in.Bytes(bytes, "the device state");
        return bytes;
    }

    private byte[] ReadToEnd()
    {
        byte[] chunk = new byte[64 << 10];
        using var all = new MemoryStream();
        while (true)
        {
            int n = _in.Peek(chunk);
            if (n == 0) break;
            _in.Bytes(chunk.AsSpan(0, n), "the device state");
            all.Write(chunk, 0, n);
            if (all.Length > MaxDeviceStateBytes)
                throw new MigrationStreamException(
                    $"more than {MaxDeviceStateBytes} bytes of device state after the RAM section; is the stream bounded to its length?", _in.Position);
        }
        return all.ToArray();
    }
}
