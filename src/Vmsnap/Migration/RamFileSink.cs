using Vmsnap.Storage;

namespace Vmsnap.Migration;

/// <summary>
/// An <see cref="IRamSink"/> that writes chosen RAM blocks into files (<c>--ram ID=FILE</c>): each file
/// ends up exactly the block's length, sparse where the stream's pages are zero. Blocks of the stream
/// that were not asked for are ignored.
/// </summary>
/// <remarks>
/// Each block is written into a new temporary file next to its target and renamed over it only in
/// <see cref="Complete"/>, so a stream that fails halfway leaves the targets untouched. A fresh file
/// needs no zero pages written; a page that had data and is later sent as zero is punched out.
/// </remarks>
public sealed class RamFileSink : IRamSink, IDisposable
{
    private readonly List<(string Id, string Path)> _requests = new();
    private Target?[] _targets = [];
    private bool _completed;
    private bool _disposed;

    /// <summary>Creates a sink for the given block id → file pairs.</summary>
    /// <exception cref="ArgumentException">An id or path is empty or given twice.</exception>
    public RamFileSink(IEnumerable<KeyValuePair<string, string>> files)
    {
        ArgumentNullException.ThrowIfNull(files);
        var ids = new HashSet<string>(StringComparer.Ordinal);
        var paths = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (id, path) in files)
        {
            if (string.IsNullOrEmpty(id)) throw new ArgumentException("a RAM block id is empty", nameof(files));
            if (string.IsNullOrEmpty(path)) throw new ArgumentException($"RAM block '{id}' has an empty file name", nameof(files));
            string full = System.IO.Path.GetFullPath(path);
            if (!ids.Add(id)) throw new ArgumentException($"RAM block '{id}' is given more than once", nameof(files));
            if (!paths.Add(full)) throw new ArgumentException($"file '{path}' is given for more than one RAM block", nameof(files));
            _requests.Add((id, full));
        }
    }

    /// <summary>Flush every file to stable storage (fdatasync) before it replaces its target. Default true.</summary>
    public bool SyncOnComplete { get; init; } = true;

    /// <inheritdoc/>
    public void BeginBlocks(IReadOnlyList<RamBlockInfo> blocks)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_targets.Length != 0) throw new InvalidOperationException("the block list was already given");
        var targets = new Target?[blocks.Count];
        var prepared = new List<(int Index, string Id, string Path)>();
        foreach (var (id, path) in _requests)
        {
            int index = -1;
            for (int i = 0; i < blocks.Count; i++)
                if (blocks[i].Id == id) { index = i; break; }
            if (index < 0)
                throw new MigrationStreamException(
                    $"RAM block '{id}' (given with file '{path}') is not in the stream; its RAM blocks are: {Describe(blocks)}");
            long length = blocks[index].Length;
            if (Directory.Exists(path))
                throw new MigrationStreamException($"'{path}' (for RAM block '{id}') is a directory");
            var existing = new FileInfo(path);
            if (existing.Exists && existing.Length != 0 && existing.Length != length)
                throw new MigrationStreamException(
                    $"'{path}' is {existing.Length} bytes but RAM block '{id}' is {length} bytes; give a file of the block's length, an empty file or a new name");
            string? dir = System.IO.Path.GetDirectoryName(path);
            if (dir is not null && !Directory.Exists(dir))
                throw new MigrationStreamException($"folder '{dir}' of '{path}' (for RAM block '{id}') does not exist");
            prepared.Add((index, id, path));
        }

        try
        {
            foreach (var (index, id, path) in prepared)
            {
                string temp = ScratchFile.Beside(path);
                var device = FileBlockDevice.Open(temp, new FileBlockDeviceOptions { Create = true, Exclusive = true });
                targets[index] = new Target(id, path, temp, device, blocks[index].Length);
                device.SetLength(blocks[index].Length);
            }
        }
        finally
        {
            _targets = targets;
        }
    }

    /// <inheritdoc/>
    public void WritePages(int block, long offset, ReadOnlySpan<byte> pages)
    {
        Target? t = TargetFor(block);
        if (t is null) return;
        t.CheckRange(offset, pages.Length);
        t.Device.Write(pages, offset);
        t.MarkData(offset, pages.Length);
    }

    /// <inheritdoc/>
    public void WriteZeroPages(int block, long offset, long length)
    {
        Target? t = TargetFor(block);
        if (t is null) return;
        t.CheckRange(offset, length);
        t.ClearData(offset, length);
    }

    /// <inheritdoc/>
    public void Complete()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_targets.Length == 0 && _requests.Count > 0) throw new InvalidOperationException("no block list was given");
        foreach (Target? t in _targets)
        {
            if (t is null) continue;
            if (SyncOnComplete) t.Device.Flush();
            t.Device.Dispose();
        }
        foreach (Target? t in _targets)
        {
            if (t is null) continue;
            File.Move(t.TempPath, t.Path, overwrite: true);
            t.Moved = true;
        }
        _completed = true;
    }

    /// <summary>Closes the files; without <see cref="Complete"/>, deletes the temporary files and leaves the targets as they were.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        foreach (Target? t in _targets)
        {
            if (t is null) continue;
            t.Device.Dispose();
            if (!_completed && !t.Moved)
            {
                try { File.Delete(t.TempPath); } catch (IOException) { } catch (UnauthorizedAccessException) { }
            }
        }
    }

    private Target? TargetFor(int block)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        return (uint)block < (uint)_targets.Length ? _targets[block] : null;
    }

    private static string Describe(IReadOnlyList<RamBlockInfo> blocks) =>
        blocks.Count == 0 ? "(none)" : string.Join(", ", blocks.Select(b => $"'{b.Id}' ({b.Length} bytes)"));

    private sealed class Target(string id, string path, string tempPath, FileBlockDevice device, long length)
    {
        // One bit per page that holds data in the temporary file: a later zero page must punch it out.
        private readonly ulong[] _data = new ulong[(length / MigrationFormat.PageSize + 63) / 64];

        public string Id { get; } = id;
        public string Path { get; } = path;
        public string TempPath { get; } = tempPath;
        public FileBlockDevice Device { get; } = device;
        public bool Moved { get; set; }

        public void CheckRange(long offset, long count)
        {
            if (offset < 0 || count < 0 || offset > length - count || (offset | count) % MigrationFormat.PageSize != 0)
                throw new ArgumentOutOfRangeException(nameof(offset), $"pages {offset}+{count} are outside RAM block '{Id}' ({length} bytes)");
        }

        public void MarkData(long offset, long count)
        {
            for (long p = offset >> MigrationFormat.PageShift, end = (offset + count) >> MigrationFormat.PageShift; p < end; p++)
                _data[p >> 6] |= 1UL << (int)(p & 63);
        }

        public void ClearData(long offset, long count)
        {
            long runStart = -1;
            long end = (offset + count) >> MigrationFormat.PageShift;
            for (long p = offset >> MigrationFormat.PageShift; p <= end; p++)
            {
                bool had = p < end && (_data[p >> 6] & (1UL << (int)(p & 63))) != 0;
                if (had)
                {
                    _data[p >> 6] &= ~(1UL << (int)(p & 63));
                    if (runStart < 0) runStart = p;
                }
                else if (runStart >= 0)
                {
                    Device.Discard(runStart << MigrationFormat.PageShift, (p - runStart) << MigrationFormat.PageShift);
                    runStart = -1;
                }
            }
        }
    }
}
