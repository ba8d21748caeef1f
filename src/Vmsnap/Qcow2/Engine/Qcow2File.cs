using Vmsnap.Storage;
using Vmsnap.Storage.LowLevel;

namespace Vmsnap.Qcow2;

/// <summary>
/// The image file as the engine writes it. Every write says which kind of metadata it is and is
/// checked first against the rest (<see cref="MetadataOverlap"/>, QEMU's pre-write overlap check);
/// so are the clusters the allocator hands out, and the data a request is about to write. A write
/// that would overwrite metadata means the metadata is inconsistent: nothing of it is written, the
/// image is marked corrupt (incompatible feature bit 1) as QEMU marks it, and nothing more is
/// written until the image is closed. Header writes are apart. Device flushes are counted, so that
/// a cache can declare that data must be durable before its tables are written
/// (<see cref="MetadataCache.DependsOnFlush"/>).
/// </summary>
internal sealed class Qcow2File(IBlockDevice device, Qcow2Header header, ImageHealth health)
{
    internal IBlockDevice Device { get; } = device;

    /// <summary>What writes are checked against; none until the engine's state is complete.</summary>
    internal MetadataOverlap? Overlaps { get; set; }

    /// <summary>Device flushes so far: a write that completed when the count was N is durable once it is above N.</summary>
    internal long Flushes { get; private set; }

    /// <summary>True once a write was refused for overwriting metadata: nothing more is written.</summary>
    internal bool Stopped => health.WritesStopped is not null;

    /// <summary>Writes metadata or data at <paramref name="offset"/>; <paramref name="own"/> is the kind of metadata the bytes are (it may overwrite itself).</summary>
    internal void Write(ReadOnlySpan<byte> data, long offset, Qcow2Metadata own)
    {
        Check(offset, data.Length, own);
        Device.Write(data, offset);
    }

    /// <summary>Writes header bytes in place.</summary>
    internal void WriteHeader(ReadOnlySpan<byte> data, long offset)
    {
        ThrowIfStopped();
        Device.Write(data, offset);
    }

    /// <summary>Makes every completed write durable.</summary>
    internal void Flush()
    {
        Device.Flush();
        Flushes++;
    }

    /// <summary>Refuses a write of [<paramref name="offset"/>, + <paramref name="length"/>) that would overwrite metadata other than <paramref name="own"/> (for data written outside the lock, checked when it is planned).</summary>
    internal void Check(long offset, long length, Qcow2Metadata own)
    {
        ThrowIfStopped();
        if (Overlaps?.Find(offset, length, own) is not { } hit || hit == Qcow2Metadata.None) return;
        throw Refuse(hit, offset, $"a write of {length} bytes at file offset 0x{offset:x} would overwrite it");
    }

    /// <summary>Refuses to hand out clusters [<paramref name="offset"/>, + <paramref name="length"/>) that the refcounts say are free but metadata uses.</summary>
    internal void CheckAllocation(long offset, long length)
    {
        ThrowIfStopped();
        // The header cluster is refused whatever the checks (QEMU: "Preventing invalid allocation of ... at offset 0").
        Qcow2Metadata hit = offset < 1L << header.ClusterBits ? Qcow2Metadata.MainHeader
            : Overlaps?.Find(offset, length, Qcow2Metadata.None) ?? Qcow2Metadata.None;
        if (hit == Qcow2Metadata.None) return;
        throw Refuse(hit, offset, $"the refcounts say the {length} bytes at file offset 0x{offset:x} are free, and vmsnap was about to allocate them, but they hold it");
    }

    private void ThrowIfStopped()
    {
        if (health.WritesStopped is { } why)
            throw health.Corrupt("image", null, $"{why}; nothing more is written to this image");
    }

    /// <summary>QEMU's qcow2_signal_corruption for a write on metadata: the image is marked corrupt, and writing stops.</summary>
    private Qcow2FormatException Refuse(Qcow2Metadata hit, long offset, string what)
    {
        string name = MetadataOverlap.Name(hit);
        string problem = $"{what}: the image's metadata is inconsistent, so vmsnap refused the write (QEMU: \"Preventing invalid write on metadata (overlaps with {name})\")";
        health.WritesStopped = $"a write was refused because it would have overwritten the {name} at file offset 0x{offset:x}";
        if (header.Version >= 3 && !header.IsCorrupt)
        {
            header.IncompatibleFeatures |= Qcow2Header.IncompatibleCorrupt;
            try
            {
                Device.Write(Qcow2Header.EncodeUInt64(header.IncompatibleFeatures), Qcow2Header.IncompatibleFeaturesOffset);
                Device.Flush();
                problem += " and marked the image corrupt, as QEMU does";
            }
            catch (Exception e) when (e is VmsnapException or IOException)
            {
                problem += $"; marking the image corrupt failed too ({e.Message})";
            }
        }
        return health.RepairFirst(hit == Qcow2Metadata.MainHeader ? "header" : name, offset, problem);
    }
}
