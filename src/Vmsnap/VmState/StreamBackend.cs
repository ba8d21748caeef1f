using System.Buffers;

namespace Vmsnap.VmState.LowLevel;

/// <summary>
/// A VM-state file on a sequential channel (pipe, stdin/stdout, socket): writes and reads must
/// come at the next stream position; gather mode.
/// </summary>
internal sealed class StreamBackend : VmStateBackend
{
    // Segments are gathered into one write up to this size: one system call per flush on a pipe or socket.
    private const int MaxGather = 1 << 20;

    private readonly Stream _stream;
    private readonly bool _leaveOpen;
    private long _writePosition;
    private long _readPosition;

    internal StreamBackend(Stream stream, bool leaveOpen)
    {
        ArgumentNullException.ThrowIfNull(stream);
        _stream = stream;
        _leaveOpen = leaveOpen;
    }

    public override int Alignment => 1;

    public override void WriteVectored(ReadOnlySpan<ReadOnlyMemory<byte>> segments, long position)
    {
        if (position != _writePosition)
            throw new VmStateException($"a channel can only be written sequentially: write at stream offset {position}, expected {_writePosition}");
        long total = 0;
        foreach (ReadOnlyMemory<byte> s in segments) total += s.Length;
        if (segments.Length > 1 && total <= MaxGather)
        {
            byte[] scratch = RentGathered(segments, (int)total);
            try
            {
                _stream.Write(scratch, 0, (int)total);
            }
            finally
            {
                ArrayPool<byte>.Shared.Return(scratch);
            }
        }
        else
        {
            foreach (ReadOnlyMemory<byte> s in segments) _stream.Write(s.Span);
        }
        _writePosition += total;
    }

    public override int Read(Span<byte> buffer, long position)
    {
        if (position != _readPosition)
            throw new VmStateException($"a channel can only be read sequentially: read at stream offset {position}, expected {_readPosition}");
        // One read: return what the channel has now, so a reader is not held up waiting for a
        // full buffer (the sender may be waiting on us).
        int n = buffer.IsEmpty ? 0 : _stream.Read(buffer);
        _readPosition += n;
        return n;
    }

    public override void Flush() => _stream.Flush();

    protected override void Dispose(bool disposing)
    {
        if (disposing && !_leaveOpen) _stream.Dispose();
    }
}
