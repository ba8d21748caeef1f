using Vmsnap.VmState;
using Vmsnap.VmState.LowLevel;

namespace Vmsnap.Migration;

/// <summary>Where a page of a stream's RAM lies.</summary>
internal enum PageKind
{
    /// <summary>The stream does not carry the page (a source that never sent it): zero for a destination.</summary>
    Missing,

    /// <summary>A ZERO record (or a mapped-ram page whose bit is clear): the page is filled with <see cref="PageLocation.Fill"/>.</summary>
    Filled,

    /// <summary>The page's 4096 bytes lie at <see cref="PageLocation.Offset"/> of the stream.</summary>
    Data,
}

/// <summary>A page's place in a stream: its data's offset, or the byte it is filled with.</summary>
internal readonly record struct PageLocation(PageKind Kind, long Offset = -1, byte Fill = 0);

/// <summary>
/// Pages <see cref="First"/> to <see cref="First"/> + <see cref="Count"/> - 1 of a block: filled with <see cref="Fill"/> (0 to 255),
/// or (<see cref="Fill"/> -1) with their data at <see cref="Offset"/> + i × <see cref="Stride"/>.
/// </summary>
internal readonly record struct PageRun(long First, long Count, long Offset, long Stride, short Fill);

/// <summary>
/// Where each page of a stream's RAM and its device state lie, recorded in one pass over its records without
/// reading page data: what a source that serves single pages (postcopy) needs before it sends anything. The
/// last record of a page wins, as when QEMU re-sends a page dirtied during a migration.
/// </summary>
/// <remarks>
/// Memory: 8 bytes per page of RAM the stream carries, in tables of 2^18 pages made when first touched (16 MiB
/// per 8 GiB of RAM), whatever the blocks' declared lengths; an index recorded at save time keeps its runs instead
/// (32 bytes per run of pages, a lookup is a binary search).
/// </remarks>
internal sealed class MigrationStreamIndex
{
    internal const int TableShift = 18;
    internal const long TablePages = 1L << TableShift;

    // Per block, per page: 0 = missing, > 0 = data offset + 1, < 0 = filled with (-value - 1).
    private readonly List<Dictionary<long, long[]>> _pages = new();
    private long _deviceStateOffset = -1;
    private long _end;

    // A recorded index: each block's runs by first page (Find searches them; no per-page tables).
    private PageRun[][]? _runs;

    /// <summary>The stream's RAM blocks, in its block list's order.</summary>
    public IReadOnlyList<RamBlockInfo> Blocks { get; private set; } = [];

    /// <summary>True when the RAM is laid out by file offset (mapped-ram).</summary>
    public bool IsMappedRam { get; private set; }

    /// <summary>Stream offset of the RAM section's start record.</summary>
    public long RamStartOffset { get; private set; } = -1;

    /// <summary>The RAM section's start record (section id, instance, version, block list), or null.</summary>
    public RamStartRecord? RamStart { get; private set; }

    /// <summary>The RAM section's id.</summary>
    public uint RamSectionId => RamStart?.SectionId ?? 0;

    /// <summary>Where the configuration section ends (the stream's header and configuration come before), or -1.</summary>
    public long ConfigurationEnd { get; private set; } = -1;

    /// <summary>Stream offset of the EOF byte after the device sections, or -1.</summary>
    public long EofOffset { get; private set; } = -1;

    /// <summary>The early-setup sections (before the RAM section's parts): offset and length of each.</summary>
    public IReadOnlyList<(long Offset, long Length)> EarlySections => _early;
    private readonly List<(long, long)> _early = new();

    /// <summary>Where the device state starts: the first byte after the RAM section's end (device sections, EOF, VM description follow).</summary>
    public long DeviceStateOffset => _deviceStateOffset;

    /// <summary>Bytes from <see cref="DeviceStateOffset"/> to the stream's end.</summary>
    public long DeviceStateLength => _end - _deviceStateOffset;

    /// <summary>Makes the index of the stream <paramref name="source"/> holds (to <paramref name="length"/>, or to its backend's end).</summary>
    /// <exception cref="MigrationStreamException">The stream is malformed, truncated or uses something vmsnap does not read.</exception>
    public static MigrationStreamIndex Build(VmStateReader source, long? length = null, CancellationToken cancellationToken = default)
    {
        var index = new MigrationStreamIndex();
        var reader = new MigrationRecordReader(source, length, pageData: false);
        while (reader.Next() is { } record)
        {
            cancellationToken.ThrowIfCancellationRequested();
            index.Add(record);
        }
        return index;
    }

    /// <summary>Records what <paramref name="record"/> says about pages and landmarks (records in stream order).</summary>
    public void Add(MigrationRecord record) => Add(record, record.Offset, record.Length, pages: true);

    /// <summary>
    /// Records the landmarks of a record a writer wrote at <paramref name="offset"/> of its output (<paramref name="length"/>
    /// bytes); the writer places its pages itself (<see cref="SetData"/>, <see cref="SetFilled"/>), their offsets being its own.
    /// </summary>
    internal void AddWritten(MigrationRecord record, long offset, long length) => Add(record, offset, length, pages: false);

    private void Add(MigrationRecord record, long offset, long length, bool pages)
    {
        switch (record)
        {
            case ConfigurationRecord configuration:
                IsMappedRam = configuration.MappedRam;
                ConfigurationEnd = offset + length;
                break;
            case RamStartRecord start:
                SetRamStart(start, offset, length);
                break;
            case RamPagesRecord run when pages:
                for (long i = 0; i < run.PageCount; i++) Set(run.Block, run.BlockOffset / MigrationFormat.PageSize + i, run.DataOffsetOf(i) + 1);
                break;
            case RamZeroPagesRecord zero when pages:
                for (long i = 0; i < zero.PageCount; i++) Set(zero.Block, zero.BlockOffset / MigrationFormat.PageSize + i, -zero.Fill - 1);
                break;
            case DeviceSectionRecord { Kind: MigrationSectionKind.EarlySetup }:
                _early.Add((offset, length));
                break;
            case DeviceSectionRecord or UnwalkedDeviceStateRecord or EofRecord:
                if (_deviceStateOffset < 0) _deviceStateOffset = offset;
                if (record is EofRecord) EofOffset = offset;
                break;
            case VmDescriptionRecord:
                _end = offset + length;
                break;
        }
    }

    /// <summary>Stream offset one past the RAM section's start record (its block list), or -1.</summary>
    public long RamStartEnd { get; private set; } = -1;

    /// <summary>Bytes of the stream, to the end of its VM description (0 until it was seen).</summary>
    public long StreamEnd => _end;

    private void SetRamStart(RamStartRecord start, long offset, long length)
    {
        RamStartOffset = offset;
        RamStartEnd = offset + length;
        RamStart = start;
        Blocks = start.Blocks;
        _pages.Clear();
        foreach (var _ in start.Blocks) _pages.Add(new Dictionary<long, long[]>());
    }

    /// <summary>Page <paramref name="page"/> of block <paramref name="block"/> has its data at <paramref name="offset"/> (the last record of a page wins).</summary>
    internal void SetData(int block, long page, long offset) => Set(block, page, offset + 1);

    /// <summary>Page <paramref name="page"/> of block <paramref name="block"/> is filled with <paramref name="fill"/> (a ZERO record).</summary>
    internal void SetFilled(int block, long page, byte fill) => Set(block, page, -fill - 1);

    /// <summary>
    /// An index recorded earlier (<see cref="LowLevel.RecordedPostcopyIndex"/>): its landmarks; the pages follow through
    /// <see cref="SetData"/> and <see cref="SetFilled"/>.
    /// </summary>
    internal static MigrationStreamIndex FromLandmarks(long configurationEnd, RamStartRecord start, IEnumerable<(long, long)> early,
        long deviceStateOffset, long eofOffset, long end)
    {
        var index = new MigrationStreamIndex { ConfigurationEnd = configurationEnd, EofOffset = eofOffset };
        index.SetRamStart(start, start.Offset, start.Length);
        index._early.AddRange(early);
        index._deviceStateOffset = deviceStateOffset;
        index._end = end;
        return index;
    }

    /// <summary>Where page <paramref name="page"/> (its index: byte offset / 4096) of block <paramref name="block"/> lies.</summary>
    public PageLocation Find(int block, long page)
    {
        if ((uint)block >= (uint)_pages.Count) throw new ArgumentOutOfRangeException(nameof(block), block, $"the stream has {_pages.Count} RAM blocks");
        if (page < 0 || page >= Blocks[block].Length / MigrationFormat.PageSize)
            throw new ArgumentOutOfRangeException(nameof(page), page, $"RAM block '{Blocks[block].Id}' has {Blocks[block].Length / MigrationFormat.PageSize} pages");
        if (_runs is not null) return FindInRuns(_runs[block], page);
        long value = _pages[block].TryGetValue(page >> TableShift, out long[]? table) ? table[page & (TablePages - 1)] : 0;
        return value switch
        {
            0 => new PageLocation(PageKind.Missing),
            > 0 => new PageLocation(PageKind.Data, value - 1),
            _ => new PageLocation(PageKind.Filled, Fill: (byte)(-value - 1)),
        };
    }

    /// <summary>
    /// The raw values of pages [<paramref name="table"/> × 2^18, ...) of a scanned or written index (0 missing, &gt; 0 data
    /// offset + 1, &lt; 0 filled with -value - 1), or false when none of them was set.
    /// </summary>
    internal bool TryGetTable(int block, long table, out long[] values)
    {
        if (_pages[block].TryGetValue(table, out long[]? found))
        {
            values = found;
            return true;
        }
        values = [];
        return false;
    }

    /// <summary>Block <paramref name="block"/>'s pages are <paramref name="runs"/> (sorted by first page, disjoint); the others are missing.</summary>
    internal void SetRuns(int block, PageRun[] runs)
    {
        _runs ??= Blocks.Select(_ => Array.Empty<PageRun>()).ToArray();
        _runs[block] = runs;
    }

    private static PageLocation FindInRuns(PageRun[] runs, long page)
    {
        int lo = 0, hi = runs.Length - 1;
        while (lo <= hi)
        {
            int mid = (lo + hi) >>> 1;
            PageRun run = runs[mid];
            if (page < run.First) hi = mid - 1;
            else if (page >= run.First + run.Count) lo = mid + 1;
            else return run.Fill < 0 ? new PageLocation(PageKind.Data, run.Offset + (page - run.First) * run.Stride) : new PageLocation(PageKind.Filled, Fill: (byte)run.Fill);
        }
        return new PageLocation(PageKind.Missing);
    }

    private void Set(int block, long page, long value)
    {
        Dictionary<long, long[]> tables = _pages[block];
        if (!tables.TryGetValue(page >> TableShift, out long[]? table))
        {
            table = new long[Math.Min(TablePages, Blocks[block].Length / MigrationFormat.PageSize - (page >> TableShift << TableShift))];
            tables.Add(page >> TableShift, table);
        }
        table[page & (TablePages - 1)] = value;
    }
}
