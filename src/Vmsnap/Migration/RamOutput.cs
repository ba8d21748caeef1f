using System.Text;
using Vmsnap.VmState;

namespace Vmsnap.Migration;

/// <summary>
/// Where a rewriting copy (<see cref="MigrationStreamReader"/> with a destination in another layout than
/// its source) puts the RAM: the block list and the pages, in the layout of the destination. Everything
/// else (framing, device sections, commands) the reader copies itself.
/// </summary>
internal abstract class RamOutput(VmStateWriter output)
{
    protected VmStateWriter Out { get; } = output;

    /// <summary>The MEM_SIZE record with the block list, at the writer's position (inside the RAM section's start).</summary>
    public abstract void BlockList(IReadOnlyList<RamBlockInfo> blocks);

    /// <summary>Page data of block <paramref name="block"/> from <paramref name="offset"/> (whole pages); <paramref name="owner"/> is disposed once the bytes are written or copied.</summary>
    public abstract void Pages(int block, long offset, ReadOnlyMemory<byte> pages, IDisposable? owner);

    /// <summary>Zero pages of block <paramref name="block"/>.</summary>
    public abstract void ZeroPages(int block, long offset, long length);

    /// <summary>Pages of a mapped-ram source are about to be delivered (before the record at the writer's position).</summary>
    public virtual void BeginPlacedPages() { }

    /// <summary>The pages of a mapped-ram source were delivered.</summary>
    public virtual void EndPlacedPages() { }

    /// <summary>The stream was copied: write what the layout keeps for last.</summary>
    public virtual void Finish() { }

    protected void PutId(string id)
    {
        byte[] bytes = Encoding.UTF8.GetBytes(id);
        Out.PutByte((byte)bytes.Length);
        Out.PutBuffer(bytes);
    }

    protected void PutMemSize(IReadOnlyList<RamBlockInfo> blocks)
    {
        ulong total = 0;
        foreach (RamBlockInfo b in blocks) total += (ulong)b.Length;
        Out.PutBe64(total | MigrationFormat.RamMemSize);
    }
}

/// <summary>
/// A plain stream from a mapped-ram source: the block list without mapped-ram headers, and the pages as
/// PAGE and ZERO records in RAM section parts of their own (as QEMU's savevm sends them: every page, zero
/// pages as ZERO records), written where the source's pages were first needed.
/// </summary>
internal sealed class PlainRamOutput(VmStateWriter output, uint sectionId, long partBytes = MigrationStreamWriter.DefaultPartBytes)
    : RamOutput(output)
{
    private readonly RamPageEncoder _encoder = new(output);
    private IReadOnlyList<RamBlockInfo> _blocks = [];
    private bool _partOpen;
    private long _inPart;

    /// <summary>RAM section parts written.</summary>
    public int Parts { get; private set; }

    public override void BlockList(IReadOnlyList<RamBlockInfo> blocks)
    {
        _blocks = blocks;
        PutMemSize(blocks);
        foreach (RamBlockInfo b in blocks)
        {
            PutId(b.Id);
            Out.PutBe64((ulong)b.Length);
        }
    }

    public override void Pages(int block, long offset, ReadOnlyMemory<byte> pages, IDisposable? owner)
    {
        Part();
        _encoder.EncodePages(_blocks[block].Id, offset, pages, owner);
        _inPart += pages.Length;
    }

    public override void ZeroPages(int block, long offset, long length)
    {
        // Long zero runs go into several parts too, so no part grows without bound.
        while (length > 0)
        {
            Part();
            long n = Math.Min(length, Math.Max(MigrationFormat.PageSize, partBytes - _inPart));
            _encoder.EncodeZeroPages(_blocks[block].Id, offset, n / MigrationFormat.PageSize);
            _inPart += n;
            offset += n;
            length -= n;
        }
    }

    public override void EndPlacedPages()
    {
        if (_partOpen) EndPart();
    }

    /// <summary>Opens a part when none is open or the open one is full (each part names its block again).</summary>
    private void Part()
    {
        if (_partOpen && _inPart < partBytes) return;
        if (_partOpen) EndPart();
        Out.PutByte(MigrationFormat.SectionPart);
        Out.PutBe32(sectionId);
        _encoder.ResetBlock();
        _partOpen = true;
        _inPart = 0;
    }

    private void EndPart()
    {
        Out.PutBe64(MigrationFormat.RamEos);
        Out.PutByte(MigrationFormat.SectionFooter);
        Out.PutBe32(sectionId);
        _partOpen = false;
        Parts++;
    }
}

/// <summary>
/// A mapped-ram file from any source: each block's entry gets its header and the stream skips the block's
/// pages, which go to their offsets through the writer's placed writes (page after page of a block makes
/// large aligned requests); zero pages are not written and keep their bit clear; the bitmaps are written
/// last, as QEMU does. Offsets count from position 0 of the writer.
/// </summary>
internal sealed class MappedRamOutput(VmStateWriter output) : RamOutput(output)
{
    /// <summary>A hole this short between placed pages that hold nothing is written as zeroes rather than split the request.</summary>
    private const long ZeroGapPages = 64;

    private Block[] _blocks = [];
    private int _lastBlock = -1;
    private long _lastEnd;

    private sealed class Block(string id, long length, long bitmapOffset, long pagesOffset)
    {
        public string Id { get; } = id;
        public long Length { get; } = length;
        public long BitmapOffset { get; } = bitmapOffset;
        public long PagesOffset { get; } = pagesOffset;
        public ulong[] Bitmap { get; } = new ulong[(length / MigrationFormat.PageSize + 63) / 64];
    }

    /// <summary>Data pages (bits set) of each block so far.</summary>
    public IEnumerable<(string Id, long Length, long Pages, long BitmapOffset, long PagesOffset)> Summary =>
        _blocks.Select(b => (b.Id, b.Length, MappedRam.CountSet(b.Bitmap), b.BitmapOffset, b.PagesOffset));

    public override void BlockList(IReadOnlyList<RamBlockInfo> blocks)
    {
        PutMemSize(blocks);
        _blocks = new Block[blocks.Count];
        Span<byte> header = stackalloc byte[MappedRam.HeaderBytes];
        for (int i = 0; i < blocks.Count; i++)
        {
            RamBlockInfo b = blocks[i];
            PutId(b.Id);
            Out.PutBe64((ulong)b.Length);
            long bitmap = Out.Tell() + MappedRam.HeaderBytes;
            long pages = MappedRam.PagesOffsetFor(bitmap, b.Length);
            MappedRam.WriteHeader(header, bitmap, pages);
            Out.PutBuffer(header);
            _blocks[i] = new Block(b.Id, b.Length, bitmap, pages);
            // The stream goes on after the block's pages; the bitmap's bytes stay a hole until the end.
            Out.Seek(pages + b.Length);
        }
    }

    public override void Pages(int block, long offset, ReadOnlyMemory<byte> pages, IDisposable? owner)
    {
        Block b = _blocks[block];
        ReadOnlySpan<byte> span = pages.Span;
        int runStart = -1;
        for (int at = 0; at <= span.Length; at += MigrationFormat.PageSize)
        {
            bool data = at < span.Length && !VmState.ZeroPage.IsZero(span.Slice(at, MigrationFormat.PageSize));
            long page = (offset + at) / MigrationFormat.PageSize;
            if (at < span.Length)
            {
                if (data) MappedRam.Set(b.Bitmap, page);
                else MappedRam.Clear(b.Bitmap, page);
            }
            if (data && runStart < 0) runStart = at;
            if (!data && runStart >= 0)
            {
                Place(block, offset + runStart, span[runStart..at]);
                runStart = -1;
            }
        }
        owner?.Dispose();
    }

    public override void ZeroPages(int block, long offset, long length)
    {
        Block b = _blocks[block];
        for (long p = offset / MigrationFormat.PageSize, end = (offset + length) / MigrationFormat.PageSize; p < end; p++)
            MappedRam.Clear(b.Bitmap, p);
    }

    /// <summary>Writes data pages at their offset; a short hole since the last placed pages of the block is filled when no page there holds data.</summary>
    private void Place(int block, long offset, ReadOnlySpan<byte> data)
    {
        Block b = _blocks[block];
        long position = b.PagesOffset + offset;
        bool zeroGap = false;
        if (block == _lastBlock && position > _lastEnd && position - _lastEnd <= ZeroGapPages * MigrationFormat.PageSize)
        {
            long from = (_lastEnd - b.PagesOffset) / MigrationFormat.PageSize;
            zeroGap = MappedRam.NoneSet(b.Bitmap, from, offset / MigrationFormat.PageSize);
        }
        Out.PutAt(position, data, zeroGap);
        _lastBlock = block;
        _lastEnd = position + data.Length;
    }

    public override void Finish()
    {
        foreach (Block b in _blocks) Out.PutAt(b.BitmapOffset, MappedRam.BitmapToBytes(b.Bitmap));
    }
}
