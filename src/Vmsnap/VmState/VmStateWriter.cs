using System.Buffers.Binary;

namespace Vmsnap.VmState.LowLevel;

/// <summary>
/// Writes a VM-state file with QEMU's QEMUFile semantics: typed big-endian puts, buffers (copied,
/// or referenced until the next flush), <see cref="Tell"/>, <see cref="Flush"/>, <see cref="Close"/>
/// and a sticky first error. Gather mode suits channels; buffered mode (K aligned buffers written
/// asynchronously at fixed positions) suits block devices. Both produce the same bytes.
/// </summary>
/// <remarks>
/// One producer thread. After the first error every call is a no-op and <see cref="Close"/>
/// reports it. <see cref="Dispose"/> without <see cref="Close"/> abandons the stream: it waits for
/// writes in flight and drops what was not written.
/// </remarks>
public sealed class VmStateWriter : IDisposable
{
    private readonly VmStateBackend _backend;
    private readonly WriteSink _sink;
    private bool _closed;
    private bool _disposed;

    /// <summary>Creates a writer on a backend; the mode is the backend's preference unless <see cref="VmStateWriterOptions.Mode"/> forces one.</summary>
    /// <exception cref="ArgumentException">The options are out of range (buffer count or size, rate limit).</exception>
    public VmStateWriter(VmStateBackend backend, VmStateWriterOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(backend);
        _backend = backend;
        Options = options ?? new VmStateWriterOptions();
        ArgumentOutOfRangeException.ThrowIfNegative(Options.RateLimit, "options.RateLimit");
        Mode = Options.Mode ?? (backend.PrefersBufferedMode ? VmStateWriteMode.Buffered : VmStateWriteMode.Gather);
        if (Mode == VmStateWriteMode.Buffered)
        {
            int alignment = Math.Max(4096, backend.Alignment);
            if ((alignment & (alignment - 1)) != 0)
                throw new ArgumentException($"the backend's alignment {backend.Alignment} is not a power of two", nameof(backend));
            if (Options.BufferCount is < 1 or > 1024)
                throw new ArgumentOutOfRangeException(nameof(options), Options.BufferCount, "BufferCount must be between 1 and 1024");
            if (Options.BufferSize <= 0 || Options.BufferSize % alignment != 0)
                throw new ArgumentOutOfRangeException(nameof(options), Options.BufferSize, $"BufferSize must be a positive multiple of the alignment ({alignment})");
            _sink = new BufferedSink(backend, Options.RateLimit, Options.BufferCount, Options.BufferSize, alignment);
        }
        else
        {
            _sink = new GatherSink(backend, Options.RateLimit);
        }
    }

    /// <summary>The options in force.</summary>
    public VmStateWriterOptions Options { get; }

    /// <summary>The mode in use.</summary>
    public VmStateWriteMode Mode { get; }

    /// <summary>The first error met, or null. Once set, every later call is a no-op.</summary>
    public Exception? Error => _sink.Error;

    /// <summary>Bytes the backend has written so far (completed writes); equals <see cref="Tell"/> after a successful <see cref="Close"/>.</summary>
    public long BytesTransferred => _sink.BytesTransferred;

    /// <summary>Writes one byte.</summary>
    public void PutByte(byte value)
    {
        ReadOnlySpan<byte> b = [value];
        PutBuffer(b);
    }

    /// <summary>Writes a big-endian 16-bit value.</summary>
    public void PutBe16(ushort value)
    {
        Span<byte> b = stackalloc byte[2];
        BinaryPrimitives.WriteUInt16BigEndian(b, value);
        PutBuffer(b);
    }

    /// <summary>Writes a big-endian 32-bit value.</summary>
    public void PutBe32(uint value)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(b, value);
        PutBuffer(b);
    }

    /// <summary>Writes a big-endian 64-bit value.</summary>
    public void PutBe64(ulong value)
    {
        Span<byte> b = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(b, value);
        PutBuffer(b);
    }

    /// <summary>Writes bytes (copied before the call returns).</summary>
    public void PutBuffer(ReadOnlySpan<byte> buffer)
    {
        ThrowIfClosed();
        _sink.Put(buffer);
    }

    /// <summary>
    /// Writes bytes the caller keeps valid and unchanged until the next <see cref="Flush"/> (or
    /// <see cref="Close"/>): gather mode references them without copying, buffered mode copies them.
    /// <paramref name="mayFree"/>, when given, is disposed once the bytes are written or copied (or
    /// dropped after an error), so the producer can release that memory.
    /// </summary>
    public void PutBufferAsync(ReadOnlyMemory<byte> buffer, IDisposable? mayFree = null)
    {
        ThrowIfClosed();
        _sink.PutAsync(buffer, mayFree);
    }

    /// <summary>Disposes <paramref name="owner"/> once every byte put so far has been written (gather) or copied (buffered).</summary>
    public void ReleaseWhenWritten(IDisposable owner)
    {
        ThrowIfClosed();
        _sink.ReleaseWhenWritten(owner);
    }

    /// <summary>Bytes accepted so far: the backend position plus what is still buffered (the stream's position, after a <see cref="Seek"/>).</summary>
    public long Tell() => _sink.Tell;

    /// <summary>True when the backend takes writes at any position (<see cref="Seek"/>, <see cref="PutAt"/>): block devices, not channels.</summary>
    public bool CanSeek => _backend.IsPositional;

    /// <summary>
    /// Continues the stream at <paramref name="position"/>, leaving what lies between untouched (a file
    /// laid out by offset, such as QEMU's mapped-ram). In buffered mode the current buffer is handed off
    /// first; the next one starts at <paramref name="position"/>.
    /// </summary>
    /// <exception cref="InvalidOperationException">The backend is a channel.</exception>
    public void Seek(long position)
    {
        ThrowIfClosed();
        ArgumentOutOfRangeException.ThrowIfNegative(position);
        if (!CanSeek) throw new InvalidOperationException("a channel (pipe, socket) is written in order only; seeking needs a file or block device");
        _sink.Seek(position);
    }

    /// <summary>
    /// Copies <paramref name="data"/> to <paramref name="position"/> of the backend, beside the stream's own
    /// position: regions of pages placed by offset. Calls at adjacent positions are gathered into large
    /// requests (aligned buffers in buffered mode, so a region that starts aligned goes out with O_DIRECT);
    /// with <paramref name="zeroGap"/> a short gap since the previous call, which the caller says holds
    /// nothing, is written as zeroes instead of splitting the request. A write overlapping one still in
    /// flight waits for it, so the last bytes put at a position are the ones that stay.
    /// </summary>
    /// <exception cref="InvalidOperationException">The backend is a channel.</exception>
    public void PutAt(long position, ReadOnlySpan<byte> data, bool zeroGap = false)
    {
        ThrowIfClosed();
        ArgumentOutOfRangeException.ThrowIfNegative(position);
        if (!CanSeek) throw new InvalidOperationException("a channel (pipe, socket) is written in order only; placed writes need a file or block device");
        _sink.PutAt(position, data, zeroGap);
    }

    /// <summary>Hands buffered bytes to the backend in one vectored write (gather mode); a no-op in buffered mode.</summary>
    public void Flush()
    {
        ThrowIfClosed();
        _sink.Flush();
    }

    /// <summary>
    /// Writes what is left (in buffered mode the exact tail, unpadded), waits for every write,
    /// makes the data durable when <see cref="VmStateWriterOptions.SyncOnClose"/> is set, and
    /// releases every buffer. Calling it again repeats the outcome.
    /// </summary>
    /// <exception cref="VmStateException">A write failed; <see cref="Exception.InnerException"/> is the sticky error itself.</exception>
    public void Close()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (!_closed)
        {
            _closed = true;
            _sink.Drain();
            Sync();
        }
        ThrowIfFailed();
    }

    /// <summary>Asynchronous <see cref="Close"/>: waits for the writes in flight without blocking a thread.</summary>
    /// <exception cref="VmStateException">A write failed; <see cref="Exception.InnerException"/> is the sticky error itself.</exception>
    public async Task CloseAsync()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (!_closed)
        {
            _closed = true;
            await _sink.DrainAsync().ConfigureAwait(false);
            Sync();
        }
        ThrowIfFailed();
    }

    /// <summary>Releases buffers; without a prior <see cref="Close"/> waits for writes in flight and drops unwritten bytes.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        if (!_closed)
        {
            _closed = true;
            _sink.Abandon();
        }
    }

    private void Sync()
    {
        if (_sink.Error is not null || !Options.SyncOnClose) return;
        try
        {
            _backend.Flush();
        }
        catch (Exception e)
        {
            _sink.FailSync(e);
        }
    }

    private void ThrowIfFailed()
    {
        Exception? error = _sink.Error;
        if (error is not null)
            throw new VmStateException($"writing the VM state failed at stream offset {_sink.ErrorPosition}: {error.Message}", error);
    }

    private void ThrowIfClosed()
    {
        if (_closed) throw new InvalidOperationException("the VM-state writer is closed");
    }
}

/// <summary>Options of a <see cref="VmStateWriter"/>.</summary>
public sealed record VmStateWriterOptions
{
    /// <summary>Force a mode; null lets the backend choose (<see cref="VmStateBackend.PrefersBufferedMode"/>).</summary>
    public VmStateWriteMode? Mode { get; init; }

    /// <summary>Number of buffers in buffered mode (K): at most K - 1 writes in flight while the producer fills one.</summary>
    public int BufferCount { get; init; } = 8;

    /// <summary>Size of each buffer in buffered mode (B), a multiple of the backend's alignment (at least 4096).</summary>
    public int BufferSize { get; init; } = 1 << 20;

    /// <summary>Rate limit in bytes per second (channels); 0 = none. The writer sleeps before a write that would exceed it.</summary>
    public long RateLimit { get; init; }

    /// <summary>Make the data durable at <see cref="VmStateWriter.Close"/> (the backend's Flush: fdatasync for a file). Default true.</summary>
    public bool SyncOnClose { get; init; } = true;
}

/// <summary>How a <see cref="VmStateWriter"/> moves bytes to its backend.</summary>
public enum VmStateWriteMode
{
    /// <summary>Small internal buffer plus references to caller memory, one vectored write per flush (channels).</summary>
    Gather,

    /// <summary>K aligned buffers of B bytes, every byte copied, asynchronous positional writes (block targets).</summary>
    Buffered,
}
