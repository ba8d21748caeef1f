using System.Text;
using Microsoft.Win32.SafeHandles;
using Vmsnap.VmState;

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
    public const long DefaultPartBytes = 64L << 20;
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

    public MigrationStreamInfo Write(MachineProfile profile)
    {
        var sections = new List<MigrationSectionInfo>();
        long start = _out.Tell();
        _out.PutBe32(MigrationFormat.Magic);
        _out.PutBe32(MigrationFormat.Version);

        if (profile.MachineType is not null)
        {
            long at = _out.Tell();
            byte[] name = Encoding.UTF8.GetBytes(profile.MachineType);
            _out.PutByte(MigrationFormat.Configuration);
            _out.PutBe32((uint)name.Length);
            _out.PutBuffer(name);
            _out.PutBuffer(profile.ConfigurationSubsections);
            sections.Add(new MigrationSectionInfo(MigrationSectionKind.Configuration,
                -1, "configuration", 0, 1, at, 1, _out.Tell() - at));
        }

        uint id = profile.RamSectionId;
        long ramAt = _out.Tell();
        int records = 1;
        StartRamSection(id, profile.RamInstance, profile.RamBlocks);
        long earlyAt = _out.Tell();
        foreach (byte[] early in profile.EarlySections) _out.PutBuffer(early);
        sections.AddRange(EarlySections(profile.EarlySections, earlyAt));

        var encoder = new RamPageEncoder(_out);
        var summaries = new RamBlockSummary[profile.RamBlocks.Count];
        long inPart = 0;
        bool partOpen = false;
        for (int b = 0; b < profile.RamBlocks.Count; b++)
        {
            RamBlockInfo block = profile.RamBlocks[b];
            long pages = encoder.Pages, zeroPages = encoder.ZeroPages;
            WriteBlock(block, profile.SourceOf(b), encoder, chunkBytes =>
            {
                // Called before each chunk: close a full part and open the next, which names its block again.
                if (partOpen && inPart < _partBytes) return;
                if (partOpen)
                {
                    EndRecords(id);
                    records++;
                }
                _out.PutByte(MigrationFormat.SectionPart);
                _out.PutBe32(id);
                encoder.ResetBlock();
                partOpen = true;
                inPart = 0;
            }, chunkBytes => inPart += chunkBytes);
            long zero = encoder.ZeroPages - zeroPages;
            summaries[b] = new RamBlockSummary(block.Id, block.Length, encoder.Pages - pages - zero, zero);
        }
        if (partOpen)
        {
            EndRecords(id);
            records++;
        }
        if (profile.SwitchoverStart)
        {
            sections.Add(new MigrationSectionInfo(MigrationSectionKind.Command, MigrationFormat.CommandSwitchoverStart, "SWITCHOVER_START", 0, 0, _out.Tell(), 1, 5));
            _out.PutByte(MigrationFormat.Command);
            _out.PutBe16(MigrationFormat.CommandSwitchoverStart);
            _out.PutBe16(0);
        }
        _out.PutByte(MigrationFormat.SectionEnd);
        _out.PutBe32(id);
        EndRecords(id);
        records++;
        sections.Add(new MigrationSectionInfo(MigrationSectionKind.Ram, id, MigrationFormat.RamSectionName, profile.RamInstance,
            MigrationFormat.RamSectionVersion, ramAt, records, _out.Tell() - ramAt - profile.EarlySections.Sum(e => e.Length) - (profile.SwitchoverStart ? 5 : 0)));

        long tailAt = _out.Tell();
        DeviceStateTail tail = DeviceStateTail.Analyze(profile.DeviceState.Span, tailAt);
        _out.PutBuffer(profile.DeviceState.Span);
        sections.AddRange(tail.Sections);

        // Referenced chunks must be written before the caller's buffers or files go away.
        _out.Flush();
        ThrowIfFailed();
        ReportProgress(force: true);
        return new MigrationStreamInfo(profile.MachineType, sections.OrderBy(s => s.Offset).ToArray(), summaries, tail.Description.ToDeviceInfos(),
            _out.Tell() - start, profile.DeviceState.Length, tail.Problem, [], tail.Description.HasConfiguration);
    }

    /// <summary>The early-setup sections of a profile, written one after another from <paramref name="offset"/>, as section entries.</summary>
    private static IEnumerable<MigrationSectionInfo> EarlySections(IReadOnlyList<byte[]> sections, long offset)
    {
        foreach (byte[] bytes in sections)
        {
            uint id = System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(1));
            int nameLength = bytes[5];
            string name = Encoding.UTF8.GetString(bytes, 6, nameLength);
            uint instance = System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(6 + nameLength));
            uint version = System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(10 + nameLength));
            yield return new MigrationSectionInfo(MigrationSectionKind.EarlySetup, id, name, instance, version, offset, 1, bytes.Length);
            offset += bytes.Length;
        }
    }

    private void StartRamSection(uint id, uint instance, IReadOnlyList<RamBlockInfo> blocks)
    {
        _out.PutByte(MigrationFormat.SectionStart);
        _out.PutBe32(id);
        PutId(MigrationFormat.RamSectionName);
        _out.PutBe32(instance);
        _out.PutBe32(MigrationFormat.RamSectionVersion);
        ulong total = 0;
        foreach (var b in blocks) total += (ulong)b.Length;
        _out.PutBe64(total | MigrationFormat.RamMemSize);
        foreach (var b in blocks)
        {
            PutId(b.Id);
            _out.PutBe64((ulong)b.Length);
        }
        EndRecords(id);
    }

    /// <summary>EOS and the section footer: the end of every RAM record (start, part, end).</summary>
    private void EndRecords(uint id)
    {
        _out.PutBe64(MigrationFormat.RamEos);
        _out.PutByte(MigrationFormat.SectionFooter);
        _out.PutBe32(id);
    }

    private void WriteBlock(RamBlockInfo block, string path, RamPageEncoder encoder, Action<int> beforeChunk, Action<int> afterChunk)
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
                    beforeChunk(n);
                    encoder.EncodePages(block.Id, offset, chunk.Buffer.AsMemory(0, n), chunk);
                    afterChunk(n);
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

    private void PutId(string id)
    {
        byte[] bytes = Encoding.UTF8.GetBytes(id);
        _out.PutByte((byte)bytes.Length);
        _out.PutBuffer(bytes);
    }
}
