using Vmsnap.VmState;

namespace Vmsnap.Tests;

/// <summary>A VM-state file held in memory (tests, small streams): positional, thread-safe, growable.</summary>
internal sealed class MemoryVmStateBackend : VmStateBackend
{
    private readonly object _lock = new();
    private byte[] _data;
    private long _length;

    /// <summary>Creates an empty backend, or one holding a copy of <paramref name="initial"/> to read.</summary>
    public MemoryVmStateBackend(ReadOnlySpan<byte> initial = default)
    {
        _data = initial.ToArray();
        _length = initial.Length;
    }

    /// <summary>Ask writers for the buffered mode (default: false, gather mode).</summary>
    public bool PrefersBuffered { get; init; }

    /// <summary>The alignment reported to writers and readers (default 4096).</summary>
    public int BufferAlignment { get; init; } = 4096;

    /// <inheritdoc/>
    public override bool PrefersBufferedMode => PrefersBuffered;

    /// <inheritdoc/>
    public override int Alignment => BufferAlignment;

    /// <inheritdoc/>
    public override bool IsPositional => true;

    /// <summary>Number of bytes held (the end of the furthest write).</summary>
    public long Length { get { lock (_lock) return _length; } }

    /// <summary>A copy of the bytes held.</summary>
    public byte[] ToArray()
    {
        lock (_lock) return _data.AsSpan(0, (int)_length).ToArray();
    }

    /// <inheritdoc/>
    public override void WriteVectored(ReadOnlySpan<ReadOnlyMemory<byte>> segments, long position)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(position);
        long total = 0;
        foreach (ReadOnlyMemory<byte> s in segments) total += s.Length;
        lock (_lock)
        {
            long end = position + total;
            if (end > Array.MaxLength) throw new VmStateException($"an in-memory VM state cannot hold {end} bytes");
            if (end > _data.Length) Array.Resize(ref _data, (int)Math.Min(Array.MaxLength, Math.Max(end, 2L * _data.Length)));
            foreach (ReadOnlyMemory<byte> s in segments)
            {
                s.Span.CopyTo(_data.AsSpan((int)position));
                position += s.Length;
            }
            if (end > _length) _length = end;
        }
    }

    /// <inheritdoc/>
    public override int Read(Span<byte> buffer, long position)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(position);
        lock (_lock)
        {
            if (position >= _length) return 0;
            int n = (int)Math.Min(buffer.Length, _length - position);
            _data.AsSpan((int)position, n).CopyTo(buffer);
            return n;
        }
    }
}
