using System.Buffers.Binary;

namespace Vmsnap.VmState;

/// <summary>Reads a VM-state file: typed big-endian gets, peek, skip; a premature end is an error naming the offset.</summary>
/// <remarks>SKELETON: naive implementation with the final public surface.</remarks>
public sealed class VmStateReader : IDisposable
{
    private readonly VmStateBackend _backend;
    private long _position;

    /// <summary>Creates a reader on a backend.</summary>
    public VmStateReader(VmStateBackend backend, int bufferSize = 1 << 20)
    {
        _backend = backend;
        _ = bufferSize;
    }

    /// <summary>Offset in the stream of the next byte to be read.</summary>
    public long Position => _position;

    /// <summary>Reads one byte.</summary>
    public byte GetByte() { Span<byte> b = stackalloc byte[1]; Read(b); return b[0]; }

    /// <summary>Reads a big-endian 16-bit value.</summary>
    public ushort GetBe16() { Span<byte> b = stackalloc byte[2]; Read(b); return BinaryPrimitives.ReadUInt16BigEndian(b); }

    /// <summary>Reads a big-endian 32-bit value.</summary>
    public uint GetBe32() { Span<byte> b = stackalloc byte[4]; Read(b); return BinaryPrimitives.ReadUInt32BigEndian(b); }

    /// <summary>Reads a big-endian 64-bit value.</summary>
    public ulong GetBe64() { Span<byte> b = stackalloc byte[8]; Read(b); return BinaryPrimitives.ReadUInt64BigEndian(b); }

    /// <summary>Fills <paramref name="buffer"/> exactly, or throws naming the offset where data ran out.</summary>
    public void Read(Span<byte> buffer)
    {
        int got = Peek(buffer);
        if (got < buffer.Length)
            throw new VmStateException($"VM state ended at offset {_position + got} while {buffer.Length} bytes were expected at offset {_position}");
        _position += got;
    }

    /// <summary>Copies up to <paramref name="buffer"/>.Length upcoming bytes without consuming them; returns how many there were.</summary>
    public int Peek(Span<byte> buffer)
    {
        int total = 0;
        while (total < buffer.Length)
        {
            int n = _backend.Read(buffer[total..], _position + total);
            if (n == 0) break;
            total += n;
        }
        return total;
    }

    /// <summary>Skips <paramref name="count"/> bytes.</summary>
    public void Skip(long count)
    {
        byte[] tmp = new byte[(int)Math.Min(count, 1 << 20)];
        while (count > 0)
        {
            int n = (int)Math.Min(count, tmp.Length);
            Read(tmp.AsSpan(0, n));
            count -= n;
        }
    }

    /// <inheritdoc/>
    public void Dispose() { }
}
