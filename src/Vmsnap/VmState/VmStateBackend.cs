using System.Net.Sockets;
using Vmsnap.Storage;
using Vmsnap.Storage.LowLevel;

namespace Vmsnap.VmState.LowLevel;

/// <summary>
/// Where a VM-state file's bytes go to or come from: a block device (positional, prefers the
/// buffered mode) or a channel (pipe, socket: sequential, gather mode).
/// </summary>
/// <remarks>
/// A backend writes everything it is given or throws: a short write is an error, never silently
/// accepted. Positions are stream offsets (0 = first byte of the VM-state file); channels accept
/// only the next sequential position.
/// </remarks>
public abstract class VmStateBackend : IDisposable
{
    /// <summary>True when the backend wants the buffered, aligned, asynchronous write mode (block targets).</summary>
    public virtual bool PrefersBufferedMode => false;

    /// <summary>Alignment of buffers, positions and lengths that the backend handles best (O_DIRECT); at least 1.</summary>
    public virtual int Alignment => 4096;

    /// <summary>
    /// True when reads at any position are cheap and may run concurrently (block devices), so a
    /// reader may read ahead with several requests in flight. False for channels.
    /// </summary>
    public virtual bool IsPositional => false;

    /// <summary>Writes the segments, in order, at stream position <paramref name="position"/>.</summary>
    public abstract void WriteVectored(ReadOnlySpan<ReadOnlyMemory<byte>> segments, long position);

    /// <summary>
    /// Writes one buffer at a position. Positional backends may complete several such writes out of
    /// order; the memory stays untouched by the caller until the returned task completes.
    /// </summary>
    public virtual ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, long position, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        WriteVectored([buffer], position);
        return ValueTask.CompletedTask;
    }

    /// <summary>
    /// Reads up to <paramref name="buffer"/>.Length bytes at <paramref name="position"/>; 0 only at
    /// the end. Positional backends return fewer only at the end; channels return what they have.
    /// </summary>
    public abstract int Read(Span<byte> buffer, long position);

    /// <summary>Asynchronous <see cref="Read"/> (read-ahead on positional backends).</summary>
    public virtual ValueTask<int> ReadAsync(Memory<byte> buffer, long position, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        return ValueTask.FromResult(Read(buffer.Span, position));
    }

    /// <summary>Makes written data durable where that means something (fdatasync for a file).</summary>
    public virtual void Flush() { }

    /// <summary>A backend over a block device, the stream starting at <paramref name="baseOffset"/>; prefers buffered mode.</summary>
    public static VmStateBackend ForBlockDevice(IBlockDevice device, long baseOffset = 0) =>
        new BlockDeviceBackend(device, baseOffset, long.MaxValue);

    /// <summary>
    /// A backend over a window of a block device: the stream starts at <paramref name="baseOffset"/>
    /// and reads end after <paramref name="length"/> bytes (a snapshot's VM-state size).
    /// </summary>
    public static VmStateBackend ForBlockDevice(IBlockDevice device, long baseOffset, long length) =>
        new BlockDeviceBackend(device, baseOffset, length);

    /// <summary>A sequential backend over a stream (pipe, stdin/stdout, file stream); gather mode.</summary>
    /// <param name="stream">The stream; it must be readable for reading and writable for writing.</param>
    /// <param name="leaveOpen">Keep the stream open when the backend is disposed.</param>
    public static VmStateBackend ForStream(Stream stream, bool leaveOpen = false) => new StreamBackend(stream, leaveOpen);

    /// <summary>A sequential backend over a connected stream socket (TCP or Unix); gather mode.</summary>
    /// <param name="socket">A connected socket of type <see cref="SocketType.Stream"/>.</param>
    /// <param name="ownsSocket">Close the socket when the backend is disposed.</param>
    public static VmStateBackend ForSocket(Socket socket, bool ownsSocket = true)
    {
        ArgumentNullException.ThrowIfNull(socket);
        return new StreamBackend(new NetworkStream(socket, ownsSocket), leaveOpen: false);
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        Dispose(true);
        GC.SuppressFinalize(this);
    }

    /// <summary>Releases what the backend holds.</summary>
    protected virtual void Dispose(bool disposing) { }

    /// <summary>Copies the segments, in order, into a buffer rented from the shared pool (the caller returns it): one request instead of many.</summary>
    private protected static byte[] RentGathered(ReadOnlySpan<ReadOnlyMemory<byte>> segments, int total)
    {
        byte[] scratch = System.Buffers.ArrayPool<byte>.Shared.Rent(total);
        int at = 0;
        foreach (ReadOnlyMemory<byte> s in segments)
        {
            s.Span.CopyTo(scratch.AsSpan(at));
            at += s.Length;
        }
        return scratch;
    }
}
