using Vmsnap.Storage;

namespace Vmsnap.Qcow2;

/// <summary>
/// The image file as the engine writes it. Every write says which kind of metadata it may
/// overwrite (its own); header writes are apart. Device flushes are counted, so that a cache can
/// declare that data must be durable before its tables are written (see <see cref="MetadataCache.DependsOnFlush"/>).
/// </summary>
internal sealed class Qcow2File(IBlockDevice device)
{
    internal IBlockDevice Device { get; } = device;

    /// <summary>Device flushes so far: a write that completed when the count was N is durable once it is above N.</summary>
    internal long Flushes { get; private set; }

    /// <summary>Writes metadata or data at <paramref name="offset"/>; <paramref name="own"/> is the kind of metadata the bytes are (it may overwrite itself).</summary>
    internal void Write(ReadOnlySpan<byte> data, long offset, Qcow2Metadata own) => Device.Write(data, offset);

    /// <summary>Writes header bytes in place.</summary>
    internal void WriteHeader(ReadOnlySpan<byte> data, long offset) => Device.Write(data, offset);

    /// <summary>Makes every completed write durable.</summary>
    internal void Flush()
    {
        Device.Flush();
        Flushes++;
    }
}
