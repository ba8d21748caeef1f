using System.Buffers.Binary;
using System.Runtime.CompilerServices;

namespace Vmsnap.VmState.LowLevel;

/// <summary>
/// Reads a VM-state file: typed big-endian gets, exact reads, peek, skip, and a zero-copy
/// <see cref="ReadSpan"/>. A premature end is a <see cref="VmStateException"/> naming the offset
/// where data ran out. Positional backends are read ahead with several aligned requests in flight.
/// </summary>
/// <remarks>One consumer thread.</remarks>
public sealed class VmStateReader : IDisposable
{
    /// <summary>Read-ahead requests in flight on positional backends by default.</summary>
    /// <remarks>Eight: on a busy machine the consumer is off the CPU for milliseconds at a time, and the
    /// device keeps reading only while requests are queued.</remarks>
    public const int DefaultReadAhead = 8;

    private readonly ChunkSource _source;
    private ReadOnlyMemory<byte> _chunk;   // current data is _chunk[_offset..]
    private int _offset;
    private ReadOnlyMemory<byte> _pending; // rest of a source chunk that follows _chunk when _chunk is the stash
    private byte[] _stash = [];
    private long _position;
    private bool _disposed;

    /// <summary>Creates a reader on a backend, reading <paramref name="bufferSize"/> bytes per request.</summary>
    public VmStateReader(VmStateBackend backend, int bufferSize = 1 << 20) : this(backend, bufferSize, DefaultReadAhead) { }

    /// <summary>Creates a reader with <paramref name="readAhead"/> requests of <paramref name="bufferSize"/> bytes in flight on a positional backend.</summary>
    public VmStateReader(VmStateBackend backend, int bufferSize, int readAhead)
    {
        ArgumentNullException.ThrowIfNull(backend);
        ArgumentOutOfRangeException.ThrowIfLessThan(bufferSize, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(readAhead, 1);
        _source = backend.IsPositional
            ? new ReadAheadSource(backend, bufferSize, readAhead)
            : new SequentialSource(backend, bufferSize);
    }

    /// <summary>Offset in the stream of the next byte to be read.</summary>
    public long Position => _position;

    /// <summary>Reads one byte.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public byte GetByte()
    {
        if (_offset < _chunk.Length)
        {
            _position++;
            return _chunk.Span[_offset++];
        }
        return ReadSpan(1)[0];
    }

    /// <summary>Reads a big-endian 16-bit value.</summary>
    public ushort GetBe16() => BinaryPrimitives.ReadUInt16BigEndian(ReadSpan(2));

    /// <summary>Reads a big-endian 32-bit value.</summary>
    public uint GetBe32() => BinaryPrimitives.ReadUInt32BigEndian(ReadSpan(4));

    /// <summary>Reads a big-endian 64-bit value.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public ulong GetBe64() => BinaryPrimitives.ReadUInt64BigEndian(ReadSpan(8));

    /// <summary>Fills <paramref name="buffer"/> exactly, or throws naming the offset where data ran out.</summary>
    /// <exception cref="VmStateException">The stream ended first, or the backend failed.</exception>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public void Read(Span<byte> buffer)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        long start = _position;
        while (!buffer.IsEmpty)
        {
            if (_offset == _chunk.Length && !NextChunk()) throw Ended(start, buffer.Length + (_position - start));
            int n = Math.Min(buffer.Length, _chunk.Length - _offset);
            _chunk.Span.Slice(_offset, n).CopyTo(buffer);
            _offset += n;
            _position += n;
            buffer = buffer[n..];
        }
    }

    /// <summary>
    /// Consumes the next <paramref name="count"/> bytes and returns them without copying when they
    /// lie in one read buffer. The span is valid until the next call on the reader.
    /// </summary>
    /// <exception cref="VmStateException">The stream ended first, or the backend failed.</exception>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public ReadOnlySpan<byte> ReadSpan(int count)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentOutOfRangeException.ThrowIfNegative(count);
        int n = Ensure(count);
        if (n < count)
        {
            long start = _position;
            _position += n;
            _offset += n;
            throw Ended(start, count);
        }
        ReadOnlySpan<byte> span = _chunk.Span.Slice(_offset, count);
        _offset += count;
        _position += count;
        return span;
    }

    /// <summary>Copies up to <paramref name="buffer"/>.Length upcoming bytes without consuming them; returns how many there were (fewer only at the end).</summary>
    public int Peek(Span<byte> buffer)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        int n = Ensure(buffer.Length);
        _chunk.Span.Slice(_offset, n).CopyTo(buffer);
        return n;
    }

    /// <summary>Skips <paramref name="count"/> bytes.</summary>
    /// <exception cref="VmStateException">The stream ended first, or the backend failed.</exception>
    public void Skip(long count)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentOutOfRangeException.ThrowIfNegative(count);
        long start = _position, total = count;
        while (count > 0)
        {
            if (_offset == _chunk.Length && !NextChunk()) throw Ended(start, total);
            int n = (int)Math.Min(count, _chunk.Length - _offset);
            _offset += n;
            _position += n;
            count -= n;
        }
    }

    /// <summary>True when <see cref="Seek"/> may go backwards or far ahead cheaply (positional backends).</summary>
    public bool CanSeek => _source.CanRestart;

    /// <summary>
    /// Continues reading at stream offset <paramref name="position"/> (a file laid out by offset, such as
    /// QEMU's mapped-ram). Short hops forward read through; others drop the read-ahead and restart there.
    /// </summary>
    /// <exception cref="VmStateException">A channel cannot go back, or the stream ended first.</exception>
    public void Seek(long position)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentOutOfRangeException.ThrowIfNegative(position);
        long ahead = position - _position;
        if (ahead == 0) return;
        if (ahead > 0 && (!_source.CanRestart || ahead <= (_chunk.Length - _offset) + _pending.Length + _source.ReadAheadBytes / 2))
        {
            Skip(ahead);
            return;
        }
        if (!_source.CanRestart)
            throw new VmStateException($"a channel is read in order only: cannot go back from stream offset {_position} to {position}");
        _chunk = _pending = default;
        _offset = 0;
        _position = _source.Restart(position);
        Skip(position - _position);
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _chunk = _pending = default;
        _source.Dispose();
    }

    private VmStateException Ended(long start, long wanted) =>
        new($"the VM state ends at stream offset {_position + (_chunk.Length - _offset)}: {wanted} bytes were expected at offset {start}");

    /// <summary>Moves to the next data once the current chunk is used up.</summary>
    private bool NextChunk()
    {
        _offset = 0;
        if (!_pending.IsEmpty)
        {
            _chunk = _pending;
            _pending = default;
            return true;
        }
        if (_source.TryNext(out _chunk)) return true;
        _chunk = default;
        return false;
    }

    /// <summary>Makes up to <paramref name="count"/> upcoming bytes contiguous at _chunk[_offset..]; returns how many are there.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private int Ensure(int count)
    {
        int available = _chunk.Length - _offset;
        if (available >= count) return count;
        if (available == 0)
        {
            if (!NextChunk()) return 0;
            available = _chunk.Length;
            if (available >= count) return count;
        }
        // The bytes straddle chunks: gather them in the stash; the rest of the last chunk stays pending.
        byte[] stash = _stash.Length >= count ? _stash : new byte[Math.Max(count, Math.Min(2 * _stash.Length, Array.MaxLength))];
        _chunk.Span.Slice(_offset, available).CopyTo(stash);
        int have = available;
        while (have < count)
        {
            if (_pending.IsEmpty && !_source.TryNext(out _pending)) break;
            int n = Math.Min(count - have, _pending.Length);
            _pending.Span[..n].CopyTo(stash.AsSpan(have));
            _pending = _pending[n..];
            have += n;
        }
        _stash = stash;
        _chunk = stash.AsMemory(0, have);
        _offset = 0;
        return Math.Min(have, count);
    }
}
