using Vmsnap.VmState;
using Vmsnap.VmState.LowLevel;

namespace Vmsnap.Migration;

/// <summary>
/// Writes migration stream records to a <see cref="VmStateWriter"/> in one of two RAM layouts: the plain stream
/// (PAGE and ZERO records, what savevm writes into a snapshot) or QEMU's mapped-ram file (each block's pages at a
/// fixed offset, a bitmap of the pages with data).
/// </summary>
/// <remarks>
/// <para>Plain: the records of a plain stream are written as they were read, so a plain stream is copied byte for
/// byte. Placed runs of pages (a mapped-ram source's, or RAM a profile writes) are encoded as QEMU's savevm encodes
/// RAM (zero pages as ZERO records) in RAM section parts of their own, closed before the next record; the block list
/// loses its mapped-ram headers, the configuration and the VM description their mapped-ram capability.</para>
/// <para>Mapped-ram: the configuration and the VM description list the capability; each block entry gets its header
/// and the stream skips the block's pages, which go to their offsets through the writer's placed writes (page after
/// page of a block makes large aligned requests); zero pages are not written and keep their bit clear; the bitmaps
/// are written last, by <see cref="Finish"/>, as QEMU does. Offsets count from position 0 of the writer, which must
/// be positional (a file).</para>
/// </remarks>
internal sealed class MigrationRecordWriter
{
    /// <summary>RAM a plain stream's parts of its own carry before the next part opens.</summary>
    public const long DefaultPartBytes = 64L << 20;

    /// <summary>A hole this short between placed pages that hold nothing is written as zeroes rather than split the request.</summary>
    private const long ZeroGapPages = 64;

    private readonly VmStateWriter _out;
    private readonly MigrationStreamFormat _layout;
    private readonly long _partBytes;
    private readonly MigrationStreamSummary? _written;
    private readonly RamPageEncoder _encoder;
    private readonly MigrationStreamIndex? _index;
    private int _encodingBlock;

    private bool _sourceMapped;
    private string _machineType = "";
    private RamStartRecord? _ram;

    // Plain: a RAM section part opened for placed pages.
    private bool _partOpen;
    private long _inPart;

    // Mapped-ram: where each block's bitmap and pages go, the bitmaps, the end of the last placed write.
    private MappedRamPlacement[] _placements = [];
    private ulong[][] _bitmaps = [];
    private int _lastBlock = -1;
    private long _lastEnd;

    /// <param name="output">Where the stream goes.</param>
    /// <param name="layout">The RAM layout to write.</param>
    /// <param name="partBytes">Plain: RAM per part of its own.</param>
    /// <param name="written">Plain: receives the records as written (offsets and lengths in the output), the encoded pages counted.</param>
    /// <param name="index">Plain: receives where each page and landmark of the output lies (what a postcopy source needs), as written.</param>
    /// <exception cref="MigrationStreamException">A mapped-ram file to a channel.</exception>
    public MigrationRecordWriter(VmStateWriter output, MigrationStreamFormat layout, long partBytes = DefaultPartBytes, MigrationStreamSummary? written = null,
        MigrationStreamIndex? index = null)
    {
        if (layout == MigrationStreamFormat.MappedRam && !output.CanSeek)
            throw new MigrationStreamException("a mapped-ram file is laid out by offset: write it to a file, not a pipe or socket");
        _out = output;
        _layout = layout;
        _partBytes = partBytes;
        _written = written;
        _encoder = new RamPageEncoder(output);
        if (layout == MigrationStreamFormat.Plain && index is not null)
        {
            _index = index;
            _encoder.Placed = (blockOffset, dataOffset) =>
            {
                if (dataOffset < 0) index.SetFilled(_encodingBlock, blockOffset / MigrationFormat.PageSize, 0);
                else index.SetData(_encodingBlock, blockOffset / MigrationFormat.PageSize, dataOffset);
            };
        }
    }

    private bool Mapped => _layout == MigrationStreamFormat.MappedRam;

    /// <summary>Writes one record (a placed run may be written later, or referenced until written: it takes the run's memory owner when it can).</summary>
    public void Write(MigrationRecord record)
    {
        if (_partOpen && record is not RamRunRecord { Placed: true }) EndPart();
        long at = _out.Tell();
        switch (record)
        {
            case StreamHeaderRecord:
                RecordHeaders.WriteStreamHeader(_out);
                break;
            case ConfigurationRecord configuration:
                _sourceMapped = configuration.MappedRam;
                _machineType = configuration.MachineType;
                RecordHeaders.WriteConfiguration(_out, configuration, _layout);
                break;
            case RamStartRecord start:
                WriteStart(start);
                break;
            case RamSectionRecord section:
                RecordHeaders.WriteSectionHeader(_out, section.Type, section.SectionId);
                break;
            case RamPagesRecord { Placed: true } pages when !Mapped:
                EncodePages(pages);
                return;
            case RamZeroPagesRecord { Placed: true } zero when !Mapped:
                EncodeZeroPages(zero);
                return;
            case RamPagesRecord pages:
                if (Mapped) Place(pages.Block, pages.BlockOffset, pages.Data.Span);
                else PutPageRecords(pages);
                pages.Release();
                break;
            case RamZeroPagesRecord zero:
                if (Mapped) PlaceZeroPages(zero);
                else PutZeroRecords(zero);
                break;
            case RamSectionFooterRecord footer:
                RecordHeaders.WriteFooter(_out, footer.SectionId, footer.Eos);
                break;
            case DeviceSectionRecord section:
                _out.PutBuffer(section.Bytes.Span);
                break;
            case UnwalkedDeviceStateRecord unwalked:
                _out.PutBuffer(unwalked.Bytes.Span);
                break;
            case CommandRecord command:
                RecordHeaders.WriteCommand(_out, command);
                break;
            case EofRecord:
                _out.PutByte(MigrationFormat.Eof);
                break;
            case VmDescriptionRecord description:
                RecordHeaders.WriteVmDescription(_out, DescriptionFor(description));
                break;
            default:
                throw new ArgumentException($"not a record the writer knows: {record.GetType().Name}", nameof(record));
        }
        _written?.Add(record, at, _out.Tell() - at);
        _index?.AddWritten(record, at, _out.Tell() - at);
    }

    /// <summary>The stream was written: closes a part of its own; a mapped-ram file gets its bitmaps.</summary>
    public void Finish()
    {
        if (_partOpen) EndPart();
        for (int b = 0; b < _bitmaps.Length; b++) _out.PutAt(_placements[b].BitmapOffset, RamBitmap.ToBytes(_bitmaps[b]));
    }

    /// <summary>Stops at the first failed write of the output instead of going on for nothing.</summary>
    public void ThrowIfFailed()
    {
        if (_out.Error is { } error)
            throw new VmStateException($"writing the copy failed at offset {_out.Tell()}: {error.Message}", error);
    }

    /// <summary>The VM description of the layout: a mapped-ram file's lists the capability, a plain stream's does not.</summary>
    private byte[] DescriptionFor(VmDescriptionRecord description)
    {
        if (Mapped) return VmDescription.WithMappedRam(description.Json, _machineType, description.Offset);
        return _sourceMapped ? VmDescription.WithoutCapabilities(description.Json, description.Offset) : description.Json;
    }

    /// <summary>The start's header and block list (MEM_SIZE, each block's id and length; mapped-ram: its header, then the stream goes on after its pages).</summary>
    private void WriteStart(RamStartRecord start)
    {
        _ram = start;
        RecordHeaders.WriteSectionStart(_out, start);
        RecordHeaders.WriteMemSize(_out, start.Blocks);
        if (Mapped)
        {
            _placements = new MappedRamPlacement[start.Blocks.Count];
            _bitmaps = new ulong[start.Blocks.Count][];
        }
        for (int i = 0; i < start.Blocks.Count; i++)
        {
            RecordHeaders.WriteBlockEntry(_out, start.BlockIds[i], start.Blocks[i].Length);
            if (!Mapped) continue;
            long bitmap = _out.Tell() + RecordHeaders.MappedRamHeaderBytes;
            var placement = new MappedRamPlacement(bitmap, RecordHeaders.MappedRamPagesOffset(bitmap, start.Blocks[i].Length));
            RecordHeaders.WriteMappedRamHeader(_out, placement);
            _placements[i] = placement;
            _bitmaps[i] = new ulong[(start.Blocks[i].Length / MigrationFormat.PageSize + 63) / 64];
            // The bitmap's bytes stay a hole until the end.
            _out.Seek(placement.PagesOffset + start.Blocks[i].Length);
        }
    }

    /// <summary>A run of PAGE records as read: the first names its block when it did, the others say CONTINUE.</summary>
    private void PutPageRecords(RamPagesRecord pages)
    {
        ReadOnlySpan<byte> data = pages.Data.Span;
        for (int i = 0; i < data.Length; i += MigrationFormat.PageSize)
        {
            bool named = i == 0 && pages.NamesBlock;
            _out.PutBe64((ulong)(pages.BlockOffset + i) | MigrationFormat.RamPage | (named ? 0 : MigrationFormat.RamContinue));
            if (named) RecordHeaders.WriteId(_out, _ram!.BlockIds[pages.Block]);
            _index?.SetData(pages.Block, (pages.BlockOffset + i) / MigrationFormat.PageSize, _out.Tell());
            _out.PutBuffer(data.Slice(i, MigrationFormat.PageSize));
        }
    }

    /// <summary>A run of ZERO records as read.</summary>
    private void PutZeroRecords(RamZeroPagesRecord zero)
    {
        for (long i = 0; i < zero.RamBytes; i += MigrationFormat.PageSize)
        {
            bool named = i == 0 && zero.NamesBlock;
            _out.PutBe64((ulong)(zero.BlockOffset + i) | MigrationFormat.RamZero | (named ? 0 : MigrationFormat.RamContinue));
            if (named) RecordHeaders.WriteId(_out, _ram!.BlockIds[zero.Block]);
            _index?.SetFilled(zero.Block, (zero.BlockOffset + i) / MigrationFormat.PageSize, zero.Fill);
            _out.PutByte(zero.Fill);
        }
    }

    /// <summary>Placed pages into a plain stream: encoded (zero pages as ZERO records) in a part of its own; the memory is referenced until written when the run's owner can be taken.</summary>
    private void EncodePages(RamPagesRecord pages)
    {
        Part();
        long encoded = _encoder.Pages, zero = _encoder.ZeroPages, at = _out.Tell();
        _encodingBlock = pages.Block;
        _encoder.EncodePages(_ram!.BlockIds[pages.Block], pages.BlockOffset, pages.Data, pages.TakeOwner());
        _inPart += pages.RamBytes;
        long zeroPages = _encoder.ZeroPages - zero;
        _written?.AddEncodedPages(pages.Block, _encoder.Pages - encoded - zeroPages, zeroPages, _out.Tell() - at);
    }

    /// <summary>Placed zero pages into a plain stream: ZERO records; long runs go into several parts too, so no part grows without bound.</summary>
    private void EncodeZeroPages(RamZeroPagesRecord zero)
    {
        for (long offset = zero.BlockOffset, length = zero.RamBytes; length > 0;)
        {
            Part();
            long n = Math.Min(length, Math.Max(MigrationFormat.PageSize, _partBytes - _inPart));
            long at = _out.Tell();
            _encodingBlock = zero.Block;
            _encoder.EncodeZeroPages(_ram!.BlockIds[zero.Block], offset, n / MigrationFormat.PageSize);
            _written?.AddEncodedPages(zero.Block, 0, n / MigrationFormat.PageSize, _out.Tell() - at);
            _inPart += n;
            offset += n;
            length -= n;
        }
    }

    /// <summary>Opens a part when none is open or the open one is full (each part names its block again).</summary>
    private void Part()
    {
        if (_partOpen && _inPart < _partBytes) return;
        if (_partOpen) EndPart();
        var part = new RamSectionRecord(_out.Tell(), MigrationFormat.SectionPart, _ram!.SectionId);
        RecordHeaders.WriteSectionHeader(_out, part.Type, part.SectionId);
        _written?.Add(part);
        _encoder.ResetBlock();
        _partOpen = true;
        _inPart = 0;
    }

    private void EndPart()
    {
        var footer = new RamSectionFooterRecord(_out.Tell(), _ram!.SectionId);
        RecordHeaders.WriteFooter(_out, footer.SectionId);
        _written?.Add(footer);
        _partOpen = false;
    }

    private void PlaceZeroPages(RamZeroPagesRecord zero)
    {
        if (zero.Fill != 0)
        {
            // Old QEMU's page of one byte: a page with data.
            byte[] page = new byte[MigrationFormat.PageSize];
            page.AsSpan().Fill(zero.Fill);
            for (long i = 0; i < zero.RamBytes; i += MigrationFormat.PageSize) Place(zero.Block, zero.BlockOffset + i, page);
            return;
        }
        ulong[] bitmap = _bitmaps[zero.Block];
        for (long p = zero.BlockOffset / MigrationFormat.PageSize, end = (zero.BlockOffset + zero.RamBytes) / MigrationFormat.PageSize; p < end; p++)
            RamBitmap.Clear(bitmap, p);
    }

    /// <summary>Pages at their place in a mapped-ram file: the runs with data written, zero pages only cleared in the bitmap.</summary>
    private void Place(int block, long offset, ReadOnlySpan<byte> pages)
    {
        ulong[] bitmap = _bitmaps[block];
        int runStart = -1;
        for (int at = 0; at <= pages.Length; at += MigrationFormat.PageSize)
        {
            bool data = at < pages.Length && !ZeroPage.IsZero(pages.Slice(at, MigrationFormat.PageSize));
            long page = (offset + at) / MigrationFormat.PageSize;
            if (at < pages.Length)
            {
                if (data) RamBitmap.Set(bitmap, page);
                else RamBitmap.Clear(bitmap, page);
            }
            if (data && runStart < 0) runStart = at;
            if (!data && runStart >= 0)
            {
                PutPlaced(block, offset + runStart, pages[runStart..at]);
                runStart = -1;
            }
        }
    }

    /// <summary>Writes data pages at their offset; a short hole since the last placed pages of the block is filled when no page there holds data.</summary>
    private void PutPlaced(int block, long offset, ReadOnlySpan<byte> data)
    {
        long position = _placements[block].PagesOffset + offset;
        bool zeroGap = false;
        if (block == _lastBlock && position > _lastEnd && position - _lastEnd <= ZeroGapPages * MigrationFormat.PageSize)
        {
            long from = (_lastEnd - _placements[block].PagesOffset) / MigrationFormat.PageSize;
            zeroGap = RamBitmap.NoneSet(_bitmaps[block], from, offset / MigrationFormat.PageSize);
        }
        _out.PutAt(position, data, zeroGap);
        _lastBlock = block;
        _lastEnd = position + data.Length;
    }
}
