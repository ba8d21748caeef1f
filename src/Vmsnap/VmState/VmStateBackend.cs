using Vmsnap.Storage;

namespace Vmsnap.VmState;

/// <summary>
/// Where a VM-state file's bytes go to or come from: a block device (positional, prefers
/// buffered mode) or a channel (pipe, socket; gather mode).
/// </summary>
/// <remarks>SKELETON: the VmState work replaces and extends this (socket, stream, fault injection).</remarks>
public abstract class VmStateBackend : IDisposable
{
    /// <summary>True when the backend wants the buffered, aligned, asynchronous write mode (block targets).</summary>
    public virtual bool PrefersBufferedMode => false;

    /// <summary>Alignment for buffers and positions in buffered mode.</summary>
    public virtual int Alignment => 4096;

    /// <summary>Writes the segments, in order, at stream position <paramref name="position"/>.</summary>
    public abstract void WriteVectored(ReadOnlySpan<ReadOnlyMemory<byte>> segments, long position);

    /// <summary>Writes one buffer at a position; may complete out of order with other calls.</summary>
    public virtual ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, long position, CancellationToken cancellationToken = default)
    {
        WriteVectored([buffer], position);
        return ValueTask.CompletedTask;
    }

    /// <summary>Reads up to <paramref name="buffer"/>.Length bytes at <paramref name="position"/>; 0 at the end.</summary>
    public abstract int Read(Span<byte> buffer, long position);

    /// <summary>Makes written data durable where that means something.</summary>
    public virtual void Flush() { }

    /// <summary>A backend over a block device, starting at <paramref name="baseOffset"/>.</summary>
    public static VmStateBackend ForBlockDevice(IBlockDevice device, long baseOffset = 0) => new BlockDeviceBackend(device, baseOffset);

    /// <inheritdoc/>
    public void Dispose()
    {
        Dispose(true);
        GC.SuppressFinalize(this);
    }

    /// <summary>Releases what the backend holds.</summary>
    protected virtual void Dispose(bool disposing) { }

    private sealed class BlockDeviceBackend(IBlockDevice device, long baseOffset) : VmStateBackend
    {
        public override bool PrefersBufferedMode => true;
        public override int Alignment => Math.Max(4096, device.Alignment);

        public override void WriteVectored(ReadOnlySpan<ReadOnlyMemory<byte>> segments, long position)
        {
            foreach (var s in segments)
            {
                device.Write(s.Span, baseOffset + position);
                position += s.Length;
            }
        }

        public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, long position, CancellationToken cancellationToken = default) =>
            device.WriteAsync(buffer, baseOffset + position, cancellationToken);

        public override int Read(Span<byte> buffer, long position) => device.Read(buffer, baseOffset + position);

        public override void Flush() => device.Flush();
    }
}
