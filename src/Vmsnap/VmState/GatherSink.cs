using System.Buffers;
using System.Runtime.InteropServices;

namespace Vmsnap.VmState.LowLevel;

/// <summary>
/// Gather mode (channels), as QEMU's QEMUFile: scalars and copied buffers go into a small internal
/// buffer; asynchronous buffers are referenced, not copied; a flush issues one vectored write of
/// at most <see cref="MaxSegments"/> segments. Single producer thread.
/// </summary>
internal sealed class GatherSink : WriteSink
{
    /// <summary>Internal buffer size (QEMU's IO_BUF_SIZE).</summary>
    internal const int BufferSize = 32 * 1024;

    /// <summary>Segments per vectored write (QEMU's MAX_IOV_SIZE).</summary>
    internal const int MaxSegments = 64;

    private readonly byte[] _buffer = GC.AllocateUninitializedArray<byte>(BufferSize);
    private readonly ReadOnlyMemory<byte>[] _segments = new ReadOnlyMemory<byte>[MaxSegments];
    private readonly List<IDisposable> _mayFree = new();
    private int _bufferIndex;      // end of used internal bytes
    private int _segmentStart;     // internal bytes from here on are not in _segments yet
    private int _segmentCount;
    private long _segmentBytes;    // bytes in _segments
    private long _position;        // stream offset of the next flush
    private byte[]? _placed;       // bytes put with PutAt, written at _placedBase
    private int _placedFill;
    private long _placedBase;

    internal GatherSink(VmStateBackend backend, long rateLimit) : base(backend, rateLimit) { }

    internal override long Tell => _position + _segmentBytes + (_bufferIndex - _segmentStart);

    internal override void Put(ReadOnlySpan<byte> data)
    {
        while (!data.IsEmpty && Error is null)
        {
            int n = Math.Min(data.Length, BufferSize - _bufferIndex);
            data[..n].CopyTo(_buffer.AsSpan(_bufferIndex));
            _bufferIndex += n;
            data = data[n..];
            if (_bufferIndex == BufferSize) Flush();
        }
    }

    internal override void PutAsync(ReadOnlyMemory<byte> data, IDisposable? mayFree)
    {
        if (Error is not null || data.IsEmpty)
        {
            mayFree?.Dispose();
            return;
        }
        AddInternalSegment();
        if (Error is not null)
        {
            mayFree?.Dispose();
            return;
        }
        // Listed before the segment: if adding it fills the vector, that flush writes it and frees the owner.
        if (mayFree is not null) _mayFree.Add(mayFree);
        AddSegment(data);
    }

    internal override void ReleaseWhenWritten(IDisposable owner)
    {
        if (_segmentCount > 0 || _bufferIndex > _segmentStart) _mayFree.Add(owner);
        else owner.Dispose();
    }

    internal override void Flush()
    {
        if (Error is null)
        {
            if (_bufferIndex > _segmentStart)
            {
                // AddSegment flushes at MaxSegments, so there is always room for one more here.
                AppendOrMerge(_buffer.AsMemory(_segmentStart, _bufferIndex - _segmentStart));
                _segmentStart = _bufferIndex;
            }
            if (_segmentCount > 0)
            {
                Pace(_segmentBytes);
                try
                {
                    Backend.WriteVectored(_segments.AsSpan(0, _segmentCount), _position);
                    _position += _segmentBytes;
                    AddTransferred(_segmentBytes);
                }
                catch (Exception e)
                {
                    SetError(e, _position);
                }
            }
        }
        Reset();
    }

    internal override void Seek(long position)
    {
        Flush();
        if (Error is null) _position = position;
    }

    internal override void PutAt(long position, ReadOnlySpan<byte> data, bool zeroGap)
    {
        if (Error is not null || data.IsEmpty) return;
        _placed ??= GC.AllocateUninitializedArray<byte>(PlacedBufferSize);
        long end = _placedBase + _placedFill;
        if (_placedFill > 0 && position != end)
        {
            if (zeroGap && position > end && position < _placedBase + PlacedBufferSize)
            {
                int gap = (int)(position - end);
                _placed.AsSpan(_placedFill, gap).Clear();
                _placedFill += gap;
            }
            else
            {
                FlushPlaced();
            }
        }
        if (_placedFill == 0) _placedBase = position;
        while (!data.IsEmpty && Error is null)
        {
            int n = Math.Min(data.Length, PlacedBufferSize - _placedFill);
            data[..n].CopyTo(_placed.AsSpan(_placedFill));
            _placedFill += n;
            data = data[n..];
            if (_placedFill == PlacedBufferSize) FlushPlaced();
        }
    }

    /// <summary>Size of the staging buffer of <see cref="PutAt"/>: one request per region of up to this many bytes.</summary>
    internal const int PlacedBufferSize = 1 << 20;

    private void FlushPlaced()
    {
        if (_placedFill == 0) return;
        int length = _placedFill;
        long position = _placedBase;
        _placedFill = 0;
        _placedBase += length;
        if (Error is not null) return;
        Pace(length);
        try
        {
            Backend.WriteVectored([_placed.AsMemory(0, length)], position);
            AddTransferred(length);
        }
        catch (Exception e)
        {
            SetError(e, position);
        }
    }

    internal override void Drain()
    {
        FlushPlaced();
        Flush();
    }

    internal override Task DrainAsync()
    {
        Drain();
        return Task.CompletedTask;
    }

    internal override void Abandon()
    {
        _placedFill = 0;
        Reset();
    }

    private void Reset()
    {
        Array.Clear(_segments, 0, _segmentCount);
        _segmentCount = 0;
        _segmentBytes = 0;
        _bufferIndex = _segmentStart = 0;
        // The bytes are written (or never will be): their owners may go.
        if (_mayFree.Count > 0)
        {
            IDisposable[] owners = _mayFree.ToArray();
            _mayFree.Clear();
            foreach (IDisposable owner in owners) owner.Dispose();
        }
    }

    private void AddInternalSegment()
    {
        if (_bufferIndex == _segmentStart) return;
        var region = _buffer.AsMemory(_segmentStart, _bufferIndex - _segmentStart);
        _segmentStart = _bufferIndex;
        AddSegment(region);
    }

    private void AddSegment(ReadOnlyMemory<byte> data)
    {
        AppendOrMerge(data);
        if (_segmentCount == MaxSegments) Flush();
    }

    private void AppendOrMerge(ReadOnlyMemory<byte> data)
    {
        _segmentBytes += data.Length;
        // Memory adjacent to the previous segment extends it (as QEMU coalesces adjacent iovecs).
        if (_segmentCount > 0 && TryMerge(_segments[_segmentCount - 1], data, out ReadOnlyMemory<byte> merged))
        {
            _segments[_segmentCount - 1] = merged;
            return;
        }
        _segments[_segmentCount++] = data;
    }

    private static bool TryMerge(ReadOnlyMemory<byte> first, ReadOnlyMemory<byte> second, out ReadOnlyMemory<byte> merged)
    {
        if (MemoryMarshal.TryGetArray(first, out ArraySegment<byte> a) && MemoryMarshal.TryGetArray(second, out ArraySegment<byte> b))
        {
            if (ReferenceEquals(a.Array, b.Array) && a.Offset + a.Count == b.Offset)
            {
                merged = new ReadOnlyMemory<byte>(a.Array, a.Offset, a.Count + b.Count);
                return true;
            }
        }
        else if (MemoryMarshal.TryGetMemoryManager(first, out MemoryManager<byte>? m1, out int s1, out int l1)
            && MemoryMarshal.TryGetMemoryManager(second, out MemoryManager<byte>? m2, out int s2, out int l2)
            && ReferenceEquals(m1, m2) && s1 + l1 == s2)
        {
            merged = m1.Memory.Slice(s1, l1 + l2);
            return true;
        }
        merged = default;
        return false;
    }
}
