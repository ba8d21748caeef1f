using System.Buffers;
using Vmsnap.Storage;
using Vmsnap.Storage.LowLevel;

namespace Vmsnap.VmState.LowLevel;

/// <summary>
/// A VM-state file on a block device (a file, or a qcow2 image's VM-state area): positional,
/// asynchronous writes, buffered mode preferred. The device is not disposed with the backend.
/// </summary>
internal sealed class BlockDeviceBackend : VmStateBackend
{
    // Larger gathers (huge caller buffers) are written segment by segment instead of copied.
    private const int MaxBounce = 4 << 20;

    private readonly IBlockDevice _device;
    private readonly long _base;
    private readonly long _length;

    internal BlockDeviceBackend(IBlockDevice device, long baseOffset, long length)
    {
        ArgumentNullException.ThrowIfNull(device);
        ArgumentOutOfRangeException.ThrowIfNegative(baseOffset);
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        _device = device;
        _base = baseOffset;
        _length = length;
    }

    public override bool PrefersBufferedMode => true;

    public override int Alignment => Math.Max(4096, _device.Alignment);

    public override bool IsPositional => true;

    public override void WriteVectored(ReadOnlySpan<ReadOnlyMemory<byte>> segments, long position)
    {
        long total = 0;
        foreach (ReadOnlyMemory<byte> s in segments) total += s.Length;
        CheckWindow(position, total);
        if (segments.Length == 1 || total > MaxBounce)
        {
            foreach (ReadOnlyMemory<byte> s in segments)
            {
                _device.Write(s.Span, _base + position);
                position += s.Length;
            }
            return;
        }
        // One request per flush, like QEMU's vectored VM-state write: gather into a bounce buffer.
        byte[] scratch = RentGathered(segments, (int)total);
        try
        {
            _device.Write(scratch.AsSpan(0, (int)total), _base + position);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(scratch);
        }
    }

    public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, long position, CancellationToken cancellationToken = default)
    {
        CheckWindow(position, buffer.Length);
        return _device.WriteAsync(buffer, _base + position, cancellationToken);
    }

    public override int Read(Span<byte> buffer, long position) => _device.Read(buffer[..Clamp(buffer.Length, position)], _base + position);

    public override ValueTask<int> ReadAsync(Memory<byte> buffer, long position, CancellationToken cancellationToken = default)
    {
        int n = Clamp(buffer.Length, position);
        return n == 0 ? ValueTask.FromResult(0) : _device.ReadAsync(buffer[..n], _base + position, cancellationToken);
    }

    public override void Flush() => _device.Flush();

    private int Clamp(int count, long position) => (int)Math.Clamp(_length - position, 0, count);

    private void CheckWindow(long position, long count)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(position);
        if (position + count > _length)
            throw new VmStateException($"write of {count} bytes at stream offset {position} goes past the end of the VM-state area ({_length} bytes)");
    }
}
