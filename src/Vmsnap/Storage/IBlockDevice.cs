namespace Vmsnap.Storage.LowLevel;

/// <summary>
/// Positional block I/O: the one interface the layers above meet at. A file, a window of a qcow2
/// image (its VM-state area) or, later, a network block device implement it.
/// </summary>
/// <remarks>
/// Offsets and lengths are in bytes. Implementations are safe for concurrent positional calls on
/// disjoint ranges (several writes in flight), unless they say otherwise.
/// </remarks>
public interface IBlockDevice : IDisposable
{
    /// <summary>Current length of the device in bytes.</summary>
    long Length { get; }

    /// <summary>True when writes, resizes and discards are refused.</summary>
    bool IsReadOnly { get; }

    /// <summary>
    /// Alignment (bytes) of offset, length and memory that lets a request bypass the page cache
    /// (O_DIRECT). 1 when the device has no such preference. Unaligned requests still work.
    /// </summary>
    int Alignment { get; }

    /// <summary>Reads into <paramref name="buffer"/> at <paramref name="offset"/>; returns the byte count, short only at the end of the device.</summary>
    int Read(Span<byte> buffer, long offset);

    /// <summary>Writes all of <paramref name="buffer"/> at <paramref name="offset"/>; a short write is an error.</summary>
    void Write(ReadOnlySpan<byte> buffer, long offset);

    /// <summary>Asynchronous <see cref="Read"/>.</summary>
    ValueTask<int> ReadAsync(Memory<byte> buffer, long offset, CancellationToken cancellationToken = default);

    /// <summary>Asynchronous <see cref="Write"/>; several may be in flight on disjoint ranges.</summary>
    ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, long offset, CancellationToken cancellationToken = default);

    /// <summary>Makes every completed write durable (fdatasync for a file).</summary>
    void Flush();

    /// <summary>Grows or shrinks the device.</summary>
    void SetLength(long length);

    /// <summary>Releases the storage of a range; it reads back as zeroes afterwards.</summary>
    void Discard(long offset, long length);
}
