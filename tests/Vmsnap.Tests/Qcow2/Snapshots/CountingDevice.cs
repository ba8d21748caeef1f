using Vmsnap.Storage;

namespace Vmsnap.Tests.Qcow2.Snapshots;

/// <summary>
/// Wraps a block device, counts its writes and can make them fail: the write numbered
/// <see cref="FailAt"/> (0-based, counting Write, WriteAsync, SetLength and Discard), and with
/// <see cref="FailAfter"/> every later write and flush too (a disk that died); or only the flush
/// numbered <see cref="FailFlushAt"/> (0-based), once.
/// </summary>
internal sealed class CountingDevice(IBlockDevice inner) : IBlockDevice
{
    private int _writes;
    private volatile bool _failed;

    public IBlockDevice Inner => inner;

    /// <summary>Write calls so far (failed ones included).</summary>
    public int Writes => Volatile.Read(ref _writes);

    /// <summary>Bytes of successful writes so far.</summary>
    public long BytesWritten;

    /// <summary>Successful writes of exactly one cluster-aligned size (metadata-sized) so far.</summary>
    public int SmallWrites;

    public int Flushes;

    public int FailAt { get; set; } = int.MaxValue;

    public bool FailAfter { get; set; }

    public int FailFlushAt { get; set; } = int.MaxValue;

    /// <summary>True once a failure was injected.</summary>
    public bool Failed => _failed;

    /// <summary>Writes below this size count as small (metadata) writes.</summary>
    public int SmallWriteLimit { get; set; } = 64 << 10;

    public long Length => inner.Length;

    public bool IsReadOnly => inner.IsReadOnly;

    public int Alignment => inner.Alignment;

    /// <summary>Small writes as (offset, length), for failure messages.</summary>
    public System.Collections.Concurrent.ConcurrentQueue<(long Offset, int Length)> SmallLog { get; } = new();

    private void Count(int bytes, long offset = -1)
    {
        int n = Interlocked.Increment(ref _writes) - 1;
        if (n == FailAt || (FailAfter && n > FailAt))
        {
            _failed = true;
            throw new StorageException($"injected failure of write {n}", 5);
        }
        Interlocked.Add(ref BytesWritten, bytes);
        if (bytes <= SmallWriteLimit)
        {
            Interlocked.Increment(ref SmallWrites);
            SmallLog.Enqueue((offset, bytes));
        }
    }

    public int Read(Span<byte> buffer, long offset) => inner.Read(buffer, offset);

    public ValueTask<int> ReadAsync(Memory<byte> buffer, long offset, CancellationToken cancellationToken = default) =>
        inner.ReadAsync(buffer, offset, cancellationToken);

    public void Write(ReadOnlySpan<byte> buffer, long offset)
    {
        Count(buffer.Length, offset);
        inner.Write(buffer, offset);
    }

    public ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, long offset, CancellationToken cancellationToken = default)
    {
        try
        {
            Count(buffer.Length, offset);
        }
        catch (StorageException e)
        {
            return ValueTask.FromException(e);
        }
        return inner.WriteAsync(buffer, offset, cancellationToken);
    }

    public void Flush()
    {
        if (FailAfter && _failed) throw new StorageException("injected failure of a flush after a failed write", 5);
        if (Interlocked.Increment(ref Flushes) - 1 == FailFlushAt)
        {
            _failed = true;
            throw new StorageException($"injected failure of flush {FailFlushAt}", 5);
        }
        inner.Flush();
    }

    public void SetLength(long length)
    {
        Count(0);
        inner.SetLength(length);
    }

    public void Discard(long offset, long length)
    {
        Count(0);
        inner.Discard(offset, length);
    }

    public void Dispose() => inner.Dispose();
}
