using System.Text;
using Microsoft.Win32.SafeHandles;
using Vmsnap.VmState;
using Vmsnap.VmState.LowLevel;

namespace Vmsnap.Migration;

/// <summary>
/// Writes a migration stream for a <see cref="MachineProfile"/>: header, configuration, the RAM section
/// (start with the block list, parts of pages, an empty end), then the profile's device state verbatim.
/// </summary>
/// <remarks>
/// RAM is read from the block files in large chunks, one read ahead of the encoder, and handed to the
/// page encoder by reference: in gather mode the writer references the chunk's pages and gives the
/// chunk back (its "may free" owner) once they are written; in buffered mode it copies them at once.
/// No per-page allocation; memory is a few chunks whatever the guest's size.
/// </remarks>
internal sealed class MigrationStreamWriter
{
    public const long DefaultPartBytes = MigrationRecordWriter.DefaultPartBytes;
    public const int DefaultChunkBytes = 2 << 20;
    private const long ProgressStep = 16 << 20;

    private readonly VmStateWriter _out;
    private readonly IProgress<long>? _progress;
    private readonly CancellationToken _cancellation;
    private readonly long _partBytes;
    private readonly ChunkPool _pool;
    private long _ramDone;
    private long _ramReported;

    public MigrationStreamWriter(VmStateWriter output, IProgress<long>? progress, CancellationToken cancellation,
        long partBytes = DefaultPartBytes, int chunkBytes = DefaultChunkBytes)
    {
        if (partBytes <= 0 || chunkBytes <= 0 || chunkBytes % MigrationFormat.PageSize != 0)
            throw new ArgumentOutOfRangeException(nameof(chunkBytes), "part and chunk sizes must be positive, chunks whole pages");
        _out = output;
        _progress = progress;
        _cancellation = cancellation;
        _partBytes = partBytes;
        _pool = new ChunkPool(chunkBytes);
    }

    public MigrationStreamInfo Write(MachineProfile profile, MigrationStreamIndex? index = null)
    {
        var written = new MigrationStreamSummary();
        var output = new MigrationRecordWriter(_out, MigrationStreamFormat.Plain, _partBytes, written, index);
        output.Write(new StreamHeaderRecord(_out.Tell()));
        if (profile.MachineType is not null) output.Write(ConfigurationRecord.ForWriting(profile.MachineType, profile.ConfigurationSubsections));
        uint id = profile.RamSectionId;
        output.Write(RamStartRecord.ForWriting(id, profile.RamInstance, profile.RamBlocks));
        output.Write(new RamSectionFooterRecord(-1, id));
        foreach (byte[] early in profile.EarlySections) output.Write(new DeviceSectionRecord(-1, MigrationSectionKind.EarlySetup, early));
        // The pages, encoded by the writer in RAM section parts of its own (closed by the next record).
        for (int b = 0; b < profile.RamBlocks.Count; b++)
            WriteBlock(profile.RamBlocks[b], profile.SourceOf(b), (offset, chunk, n) => output.Write(RamPagesRecord.ForWriting(b, offset, chunk.Buffer.AsMemory(0, n), chunk)));
        if (profile.SwitchoverStart) output.Write(new CommandRecord(-1, MigrationFormat.CommandSwitchoverStart, []));
        output.Write(new RamSectionRecord(-1, MigrationFormat.SectionEnd, id));
        output.Write(new RamSectionFooterRecord(-1, id));
        foreach (MigrationRecord record in DeviceStateTail.Records(profile.DeviceState, _out.Tell())) output.Write(record);
        output.Finish();

        // Referenced chunks must be written before the caller's buffers or files go away.
        _out.Flush();
        ThrowIfFailed();
        ReportProgress(force: true);
        return written.ToInfo();
    }

    /// <summary>Reads a block's file in chunks, one read ahead, and hands each chunk to <paramref name="write"/> (offset in the block, chunk, bytes), which owns it from then on.</summary>
    private void WriteBlock(RamBlockInfo block, string path, Action<long, ChunkPool.Chunk, int> write)
    {
        SafeFileHandle file;
        try
        {
            file = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite, FileOptions.SequentialScan);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new MigrationStreamException($"cannot open RAM file '{path}' for block '{block.Id}': {e.Message}", -1, e);
        }
        using (file)
        {
            long length = RandomAccess.GetLength(file);
            if (length != block.Length)
                throw new MigrationStreamException($"RAM file '{path}' for block '{block.Id}' is {length} bytes, expected {block.Length} (did it change?)");

            ChunkPool.Chunk? next = _pool.Rent();
            Task<int>? pending = ReadAhead(file, next, 0, (int)Math.Min(_pool.ChunkBytes, length));
            try
            {
                for (long offset = 0; offset < length;)
                {
                    int expected = (int)Math.Min(_pool.ChunkBytes, length - offset);
                    int n;
                    try
                    {
                        n = pending!.GetAwaiter().GetResult();
                    }
                    catch (IOException e)
                    {
                        throw new MigrationStreamException($"reading RAM file '{path}' for block '{block.Id}' at offset {offset} failed: {e.Message}", -1, e);
                    }
                    ChunkPool.Chunk chunk = next!;
                    next = null;
                    pending = null;
                    if (n != expected)
                    {
                        chunk.Dispose();
                        throw new MigrationStreamException(
                            $"RAM file '{path}' for block '{block.Id}' ended at offset {offset + n}, expected {length} bytes (did it change?)");
                    }
                    long following = offset + n;
                    if (following < length)
                    {
                        next = _pool.Rent();
                        pending = ReadAhead(file, next, following, (int)Math.Min(_pool.ChunkBytes, length - following));
                    }
                    write(offset, chunk, n);
                    offset = following;
                    _ramDone += n;
                    _cancellation.ThrowIfCancellationRequested();
                    ThrowIfFailed();
                    if (_ramDone - _ramReported >= ProgressStep) ReportProgress(force: false);
                }
            }
            finally
            {
                // Never leave a read running into a buffer or a handle that is going away.
                if (pending is not null)
                {
                    try { pending.GetAwaiter().GetResult(); } catch (IOException) { }
                }
                next?.Dispose();
            }
        }
    }

    private static Task<int> ReadAhead(SafeFileHandle file, ChunkPool.Chunk chunk, long offset, int count) =>
        Task.Run(() =>
        {
            int total = 0;
            while (total < count)
            {
                int n = RandomAccess.Read(file, chunk.Buffer.AsSpan(total, count - total), offset + total);
                if (n == 0) break;
                total += n;
            }
            return total;
        });

    private void ReportProgress(bool force)
    {
        _cancellation.ThrowIfCancellationRequested();
        ThrowIfFailed();
        if (_progress is null || (!force && _ramDone == _ramReported)) return;
        _ramReported = _ramDone;
        _progress.Report(_ramDone);
    }

    /// <summary>Stops at the writer's first failure instead of encoding gigabytes into a dead stream.</summary>
    private void ThrowIfFailed()
    {
        if (_out.Error is { } error)
            throw new VmStateException($"writing the migration stream failed at offset {_out.Tell()}: {error.Message}", error);
    }
}
