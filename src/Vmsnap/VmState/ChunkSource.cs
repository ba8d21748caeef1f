using Vmsnap.Storage;
using Vmsnap.Storage.LowLevel;

namespace Vmsnap.VmState.LowLevel;

/// <summary>
/// Hands a <see cref="VmStateReader"/> the stream's bytes in order, one chunk at a time. A chunk
/// stays valid until the next call to <see cref="TryNext"/>.
/// </summary>
internal abstract class ChunkSource : IDisposable
{
    /// <summary>The next chunk (never empty), or false at the end of the stream.</summary>
    internal abstract bool TryNext(out ReadOnlyMemory<byte> chunk);

    /// <summary>True when <see cref="Restart"/> works: reads may start anywhere (positional backends).</summary>
    internal virtual bool CanRestart => false;

    /// <summary>Bytes a source reads ahead: skipping fewer than these costs less than restarting.</summary>
    internal virtual long ReadAheadBytes => 0;

    /// <summary>
    /// Drops what was read ahead and continues at an aligned position at or before <paramref name="position"/>;
    /// returns that position (the caller skips the bytes up to <paramref name="position"/>).
    /// </summary>
    internal virtual long Restart(long position) => throw new NotSupportedException("this source reads in order only");

    public abstract void Dispose();

    protected static VmStateException ReadFailed(Exception e, long position) =>
        new($"reading the VM state at stream offset {position} failed: {e.Message}", e);
}

/// <summary>Reads a channel sequentially into one buffer.</summary>
internal sealed class SequentialSource(VmStateBackend backend, int size) : ChunkSource
{
    private readonly byte[] _buffer = GC.AllocateUninitializedArray<byte>(size);
    private long _position;
    private bool _ended;

    internal override bool TryNext(out ReadOnlyMemory<byte> chunk)
    {
        chunk = default;
        if (_ended) return false;
        int n;
        try
        {
            n = backend.Read(_buffer, _position);
        }
        catch (Exception e) when (e is not OperationCanceledException) // a cancel stays a cancel
        {
            throw ReadFailed(e, _position);
        }
        if (n == 0)
        {
            _ended = true;
            return false;
        }
        chunk = _buffer.AsMemory(0, n);
        _position += n;
        return true;
    }

    public override void Dispose() { }
}

/// <summary>
/// Reads a positional backend ahead: a ring of aligned buffers of equal size, each read at an
/// aligned position with several requests in flight (O_DIRECT friendly), so a loader streaming
/// gigabytes is not held up by one request at a time.
/// </summary>
internal sealed class ReadAheadSource : ChunkSource
{
    private readonly VmStateBackend _backend;
    private readonly int _size;
    private readonly int _alignment;
    private readonly AlignedBuffer[] _buffers;
    private readonly Task<int>?[] _reads;
    private readonly long[] _positions;
    private long _nextRead;          // position of the next read to issue
    private long _end = long.MaxValue; // known end of the stream (after a short read)
    private int _next;               // slot handed out next
    private int _given = -1;         // slot handed out last (reissued on the next call)
    private bool _ended;

    internal ReadAheadSource(VmStateBackend backend, int size, int depth)
    {
        _backend = backend;
        int alignment = Math.Max(4096, backend.Alignment);
        _alignment = alignment;
        _size = (size + alignment - 1) / alignment * alignment;
        _buffers = new AlignedBuffer[depth];
        _reads = new Task<int>?[depth];
        _positions = new long[depth];
        for (int i = 0; i < depth; i++) _buffers[i] = AlignedBuffer.ForReading(_size, alignment);
        for (int i = 0; i < depth; i++) Issue(i);
    }

    internal override bool TryNext(out ReadOnlyMemory<byte> chunk)
    {
        chunk = default;
        if (_ended) return false;
        if (_given >= 0)
        {
            Issue(_given);
            _given = -1;
        }
        int slot = _next;
        Task<int>? read = _reads[slot];
        if (read is null)
        {
            _ended = true;
            return false;
        }
        int n;
        try
        {
            n = read.GetAwaiter().GetResult();
        }
        catch (Exception e)
        {
            _ended = true;
            if (e is OperationCanceledException) throw; // a cancel stays a cancel
            throw ReadFailed(e, _positions[slot]);
        }
        finally
        {
            _reads[slot] = null;
        }
        if (n < _size) _end = Math.Min(_end, _positions[slot] + n);
        if (n == 0)
        {
            _ended = true;
            return false;
        }
        _given = slot;
        _next = (slot + 1) % _buffers.Length;
        chunk = _buffers[slot].Memory[..n];
        return true;
    }

    internal override bool CanRestart => true;

    internal override long ReadAheadBytes => (long)_size * _buffers.Length;

    internal override long Restart(long position)
    {
        WaitForReads();
        long start = position / _alignment * _alignment;
        _nextRead = start;
        _next = 0;
        _given = -1;
        _ended = false;
        for (int i = 0; i < _buffers.Length; i++) Issue(i);
        return start;
    }

    private void Issue(int slot)
    {
        if (_nextRead >= _end) return;
        long position = _nextRead;
        _nextRead += _size;
        _positions[slot] = position;
        try
        {
            _reads[slot] = _backend.ReadAsync(_buffers[slot].Memory, position).AsTask();
        }
        catch (Exception e)
        {
            _reads[slot] = Task.FromException<int>(e);
        }
    }

    public override void Dispose()
    {
        WaitForReads();
        foreach (AlignedBuffer b in _buffers) b.Dispose();
    }

    /// <summary>A read in flight still writes into its buffer: waits for every one before the buffers are reused or freed.</summary>
    private void WaitForReads()
    {
        foreach (Task<int>? read in _reads)
        {
            if (read is null) continue;
            try { read.GetAwaiter().GetResult(); }
            catch (Exception) { /* the data is not wanted any more */ }
        }
        Array.Clear(_reads);
    }
}
