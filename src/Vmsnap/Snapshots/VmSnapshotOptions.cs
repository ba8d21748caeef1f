using Vmsnap.VmState;
using Vmsnap.VmState.LowLevel;

namespace Vmsnap.Snapshots;

/// <summary>How <see cref="VmSnapshots"/> moves a VM state into or out of an image.</summary>
public sealed record VmSnapshotOptions
{
    /// <summary>Writer mode; null = the VM-state area's preference (buffered).</summary>
    public VmStateWriteMode? Mode { get; init; }

    /// <summary>Buffers in flight in buffered mode (K); null = the writer's default.</summary>
    public int? BufferCount { get; init; }

    /// <summary>Size of each buffer in buffered mode (B); null = the writer's default.</summary>
    public int? BufferSize { get; init; }

    /// <summary>Bypass the page cache (O_DIRECT) for the image's bulk I/O where the file system allows it.</summary>
    public bool Direct { get; init; } = true;

    /// <summary>Open the image without locks that conflict with a running QEMU (read-only operations only).</summary>
    public bool ForceShare { get; init; }

    /// <summary>
    /// Export: write a mapped-ram file (QEMU 9.0+ restores it with capability <c>mapped-ram</c> on and
    /// <c>migrate-incoming file:PATH</c>, with multifd and direct-io if wanted) instead of a plain stream.
    /// Needs a file, not a pipe.
    /// </summary>
    public bool MappedRam { get; init; }

    /// <summary>
    /// Load: write RAM files that exist with the block's length in place (see <see cref="Migration.RamFileSink.WriteInPlace"/>),
    /// for a file another process maps; a load that fails then leaves them partly written. Default false: each
    /// file is replaced only once the load is complete.
    /// </summary>
    public bool RamInPlace { get; init; }

    internal VmStateWriterOptions WriterOptions()
    {
        var o = new VmStateWriterOptions { Mode = Mode };
        if (BufferCount is int k) o = o with { BufferCount = k };
        if (BufferSize is int b) o = o with { BufferSize = b };
        return o;
    }
}

/// <summary>What a save, load, import or export did.</summary>
/// <param name="Image">The image's path.</param>
/// <param name="Snapshot">The snapshot's ID and name.</param>
/// <param name="VmStateBytes">Bytes of VM state (the migration stream) moved.</param>
/// <param name="RamBytes">Bytes of guest RAM the stream carries.</param>
/// <param name="Seconds">Wall time of the operation, flushes included.</param>
/// <param name="Mode">The writer mode used (null when nothing was written through a writer).</param>
/// <param name="Stream">What the stream holds.</param>
public sealed record VmSnapshotResult(string Image, VmSnapshotId Snapshot, long VmStateBytes, long RamBytes, double Seconds,
    VmStateWriteMode? Mode, Migration.MigrationStreamInfo Stream)
{
    /// <summary>VM-state throughput in MiB/s.</summary>
    public double MiBPerSecond => Seconds > 0 ? VmStateBytes / Seconds / (1 << 20) : 0;

    /// <summary>
    /// Reading a snapshot: true when its table entry points to a postcopy index vmsnap recorded at save time
    /// (docs/postcopy-index.md; <c>loadvm --postcopy</c> checks it in full before it uses it).
    /// </summary>
    public bool HasPostcopyIndex { get; init; }
}

/// <summary>A snapshot's ID and name (TAG).</summary>
public sealed record VmSnapshotId(string Id, string Name);
