namespace Vmsnap.Migration;

/// <summary>
/// Reports the RAM a pass over a stream's records has covered (pages and zero pages), every 16 MiB and once at the
/// end; an <see cref="IRamProgress"/> also gets the stream's total RAM from its block list.
/// </summary>
internal sealed class RamProgress(IProgress<long>? progress)
{
    private const long Step = 16 << 20;
    private long _done;
    private long _reported;

    public void Add(MigrationRecord record)
    {
        if (progress is null) return;
        switch (record)
        {
            case RamStartRecord start:
                (progress as IRamProgress)?.ReportTotal(start.RamBytes);
                break;
            case RamRunRecord run:
                _done += run.RamBytes;
                if (_done - _reported >= Step) Report();
                break;
        }
    }

    /// <summary>The pass is over: the final figure, even when it did not change.</summary>
    public void Done()
    {
        if (progress is not null) Report();
    }

    private void Report()
    {
        _reported = _done;
        progress!.Report(_done);
    }
}

/// <summary>Hands the RAM of a stream's records to an <see cref="IRamSink"/>.</summary>
internal static class RamSinkRecords
{
    public static void Write(IRamSink sink, MigrationRecord record)
    {
        switch (record)
        {
            case RamStartRecord start:
                sink.BeginBlocks(start.Blocks);
                break;
            case RamPagesRecord pages:
                sink.WritePages(pages.Block, pages.BlockOffset, pages.Data.Span);
                break;
            case RamZeroPagesRecord { Fill: 0 } zero:
                sink.WriteZeroPages(zero.Block, zero.BlockOffset, zero.RamBytes);
                break;
            case RamZeroPagesRecord filled:
                // A ZERO record whose fill byte is not 0 (old QEMU's "compressed" page): a page of that byte.
                byte[] page = new byte[MigrationFormat.PageSize];
                page.AsSpan().Fill(filled.Fill);
                for (long i = 0; i < filled.RamBytes; i += MigrationFormat.PageSize) sink.WritePages(filled.Block, filled.BlockOffset + i, page);
                break;
        }
    }
}
