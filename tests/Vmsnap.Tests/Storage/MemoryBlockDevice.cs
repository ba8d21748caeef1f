using Vmsnap.Storage;

namespace Vmsnap.Tests;

/// <summary>An in-memory, growable <see cref="IBlockDevice"/> (tests: images built and damaged in memory).</summary>
internal sealed class MemoryBlockDevice : IBlockDevice
{
    private readonly object _lock = new();
    private byte[] _data;
    private long _length;

    /// <summary>Creates an empty device, or one holding a copy of <paramref name="initial"/>.</summary>
    public MemoryBlockDevice(ReadOnlySpan<byte> initial = default)
    {
        _data = initial.ToArray();
        _length = initial.Length;
    }

    /// <summary>A copy of the device's bytes.</summary>
    public byte[] ToArray()
    {
        lock (_lock) return _data.AsSpan(0, (int)_length).ToArray();
    }

    /// <inheritdoc/>
    public long Length { get { lock (_lock) return _length; } }

    /// <inheritdoc/>
    public bool IsReadOnly { get; init; }

    /// <inheritdoc/>
    public int Alignment => 1;

    /// <inheritdoc/>
    public int Read(Span<byte> buffer, long offset)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(offset);
        lock (_lock)
        {
            if (offset >= _length) return 0;
            int n = (int)Math.Min(buffer.Length, _length - offset);
            _data.AsSpan((int)offset, n).CopyTo(buffer);
            return n;
        }
    }

    /// <inheritdoc/>
    public void Write(ReadOnlySpan<byte> buffer, long offset)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(offset);
        if (IsReadOnly) throw new StorageException("memory device is read-only");
        lock (_lock)
        {
            long end = offset + buffer.Length;
            if (end > Array.MaxLength) throw new StorageException($"memory device cannot hold {end} bytes", NativeFile.ENOSPC);
            Grow(end);
            buffer.CopyTo(_data.AsSpan((int)offset));
            if (end > _length) _length = end;
        }
    }

    private void Grow(long end)
    {
        if (end <= _data.Length) return;
        long size = Math.Max(end, Math.Min((long)_data.Length * 2, Array.MaxLength));
        Array.Resize(ref _data, (int)size);
    }

    /// <inheritdoc/>
    public ValueTask<int> ReadAsync(Memory<byte> buffer, long offset, CancellationToken cancellationToken = default) =>
        ValueTask.FromResult(Read(buffer.Span, offset));

    /// <inheritdoc/>
    public ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, long offset, CancellationToken cancellationToken = default)
    {
        Write(buffer.Span, offset);
        return ValueTask.CompletedTask;
    }

    /// <inheritdoc/>
    public void Flush() { }

    /// <inheritdoc/>
    public void SetLength(long length)
    {
        if (IsReadOnly) throw new StorageException("memory device is read-only");
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        if (length > Array.MaxLength) throw new StorageException($"memory device cannot hold {length} bytes", NativeFile.EFBIG);
        lock (_lock)
        {
            Grow(length);
            if (length < _length) _data.AsSpan((int)length, (int)(_length - length)).Clear();
            _length = length;
        }
    }

    /// <inheritdoc/>
    public void Discard(long offset, long length)
    {
        lock (_lock)
        {
            long end = Math.Min(offset + length, _length);
            if (end > offset) _data.AsSpan((int)offset, (int)(end - offset)).Clear();
        }
    }

    /// <inheritdoc/>
    public void Dispose() { }
}
