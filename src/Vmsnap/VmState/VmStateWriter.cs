using System.Buffers.Binary;

namespace Vmsnap.VmState;

/// <summary>
/// Writes a VM-state file (QEMU's QEMUFile semantics): typed big-endian puts, Tell, Flush, Close,
/// and a sticky first error.
/// </summary>
/// <remarks>SKELETON: a naive implementation with the final public surface; the VmState work replaces its inside.</remarks>
public sealed class VmStateWriter : IDisposable
{
    private readonly VmStateBackend _backend;
    private readonly List<byte> _pending = new();
    private long _position;

    /// <summary>Creates a writer on a backend.</summary>
    public VmStateWriter(VmStateBackend backend, VmStateWriterOptions? options = null)
    {
        _backend = backend;
        Options = options ?? new VmStateWriterOptions();
    }

    /// <summary>The options in force.</summary>
    public VmStateWriterOptions Options { get; }

    /// <summary>The first error met, or null. Once set, every later call is a no-op.</summary>
    public Exception? Error { get; private set; }

    /// <summary>Bytes handed to the backend so far.</summary>
    public long BytesTransferred { get; private set; }

    /// <summary>Writes one byte.</summary>
    public void PutByte(byte value) => PutBuffer([value]);

    /// <summary>Writes a big-endian 16-bit value.</summary>
    public void PutBe16(ushort value) { Span<byte> b = stackalloc byte[2]; BinaryPrimitives.WriteUInt16BigEndian(b, value); PutBuffer(b); }

    /// <summary>Writes a big-endian 32-bit value.</summary>
    public void PutBe32(uint value) { Span<byte> b = stackalloc byte[4]; BinaryPrimitives.WriteUInt32BigEndian(b, value); PutBuffer(b); }

    /// <summary>Writes a big-endian 64-bit value.</summary>
    public void PutBe64(ulong value) { Span<byte> b = stackalloc byte[8]; BinaryPrimitives.WriteUInt64BigEndian(b, value); PutBuffer(b); }

    /// <summary>Writes bytes (copied).</summary>
    public void PutBuffer(ReadOnlySpan<byte> buffer)
    {
        if (Error is not null) return;
        foreach (byte b in buffer) _pending.Add(b);
        if (_pending.Count >= 32768) Flush();
    }

    /// <summary>
    /// Writes bytes the caller keeps valid until the next <see cref="Flush"/> (gather mode may
    /// reference them without copying). <paramref name="mayFree"/>, when given, is disposed once the
    /// bytes are written.
    /// </summary>
    public void PutBufferAsync(ReadOnlyMemory<byte> buffer, IDisposable? mayFree = null)
    {
        PutBuffer(buffer.Span);
        mayFree?.Dispose();
    }

    /// <summary>Bytes accepted so far: the backend position plus what is still buffered.</summary>
    public long Tell() => _position + _pending.Count;

    /// <summary>Hands buffered bytes to the backend (a no-op in buffered mode).</summary>
    public void Flush()
    {
        if (Error is not null || _pending.Count == 0) return;
        try
        {
            byte[] data = _pending.ToArray();
            _backend.WriteVectored([data], _position);
            _position += data.Length;
            BytesTransferred += data.Length;
            _pending.Clear();
        }
        catch (Exception e)
        {
            Error = e;
        }
    }

    /// <summary>Writes what is left, waits for every write, and throws the sticky error if there is one.</summary>
    public void Close()
    {
        Flush();
        if (Error is not null) throw new VmStateException($"writing the VM state failed: {Error.Message}", Error);
    }

    /// <inheritdoc/>
    public void Dispose() { }
}

/// <summary>Options of a <see cref="VmStateWriter"/>.</summary>
public sealed record VmStateWriterOptions
{
    /// <summary>Force a mode; null lets the backend choose.</summary>
    public VmStateWriteMode? Mode { get; init; }

    /// <summary>Number of buffers in buffered mode (K).</summary>
    public int BufferCount { get; init; } = 8;

    /// <summary>Size of each buffer in buffered mode (B), a multiple of the alignment.</summary>
    public int BufferSize { get; init; } = 1 << 20;

    /// <summary>Rate limit in bytes per second for channels; 0 = none.</summary>
    public long RateLimit { get; init; }
}

/// <summary>How a <see cref="VmStateWriter"/> moves bytes to its backend.</summary>
public enum VmStateWriteMode
{
    /// <summary>Small internal buffer plus references to caller memory, one vectored write per flush (channels).</summary>
    Gather,

    /// <summary>K aligned buffers of B bytes, every byte copied, asynchronous positional writes (block targets).</summary>
    Buffered,
}

/// <summary>A VM-state file error: a failed write, or a stream that ended early (the message gives the offset).</summary>
public class VmStateException : VmsnapException
{
    /// <summary>Creates the error.</summary>
    public VmStateException(string message, Exception? inner = null) : base(message, inner) { }
}
