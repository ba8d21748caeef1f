namespace Vmsnap.Qcow2;

/// <summary>What an image is: its header's settings and a few derived figures (like <c>qemu-img info</c>).</summary>
public sealed record Qcow2ImageInfo
{
    /// <summary>Path of the image file.</summary>
    public required string Path { get; init; }

    /// <summary>Format version: 2 or 3.</summary>
    public required int Version { get; init; }

    /// <summary>QEMU's name for the version: "0.10" for 2, "1.1" for 3.</summary>
    public string Compat => Version >= 3 ? "1.1" : "0.10";

    /// <summary>Size of the virtual disk in bytes.</summary>
    public required long VirtualSize { get; init; }

    /// <summary>Cluster size in bytes.</summary>
    public required int ClusterSize { get; init; }

    /// <summary>Width of a refcount in bits.</summary>
    public required int RefcountBits { get; init; }

    /// <summary>The lazy_refcounts compatible feature is set.</summary>
    public required bool LazyRefcounts { get; init; }

    /// <summary>L2 entries are extended (32 subclusters per cluster).</summary>
    public required bool ExtendedL2 { get; init; }

    /// <summary>The corrupt bit is set: the image may only be read.</summary>
    public required bool Corrupt { get; init; }

    /// <summary>The dirty bit is set: refcounts may be stale until repaired.</summary>
    public required bool Dirty { get; init; }

    /// <summary>Compression type for compressed clusters.</summary>
    public required Qcow2CompressionType CompressionType { get; init; }

    /// <summary>Backing file name as stored in the header, or null.</summary>
    public string? BackingFile { get; init; }

    /// <summary>Backing file format from the header extension, or null.</summary>
    public string? BackingFormat { get; init; }

    /// <summary>Entries in the active L1 table.</summary>
    public required int L1Size { get; init; }

    /// <summary>Number of internal snapshots.</summary>
    public required int SnapshotCount { get; init; }

    /// <summary>Length of the image file in bytes.</summary>
    public required long FileSize { get; init; }

    /// <summary>Incompatible feature bits as stored.</summary>
    public required ulong IncompatibleFeatures { get; init; }

    /// <summary>Compatible feature bits as stored.</summary>
    public required ulong CompatibleFeatures { get; init; }

    /// <summary>Autoclear feature bits as stored.</summary>
    public required ulong AutoclearFeatures { get; init; }

    /// <summary>
    /// The persistent dirty bitmaps in the bitmaps extension, in directory order; empty when there is
    /// none or when the extension is not valid (its autoclear bit cleared), as QEMU reads it.
    /// </summary>
    public IReadOnlyList<Qcow2BitmapInfo> Bitmaps { get; init; } = [];
}

/// <summary>A persistent dirty bitmap stored in a qcow2 image (what <c>qemu-img info</c> lists under bitmaps).</summary>
public sealed record Qcow2BitmapInfo
{
    /// <summary>The bitmap's name.</summary>
    public required string Name { get; init; }

    /// <summary>Bytes of the virtual disk that one bit covers.</summary>
    public required long Granularity { get; init; }

    /// <summary>The in-use flag: the bitmap was not stored consistently when the image was last closed.</summary>
    public bool InUse { get; init; }

    /// <summary>The auto flag: QEMU records writes in the bitmap while the image is open.</summary>
    public bool Auto { get; init; }
}

/// <summary>
/// Result of <see cref="Qcow2Image.Check(Qcow2RepairMode)"/>, counted the way <c>qemu-img check</c> counts: the same
/// image gives the same numbers.
/// </summary>
public sealed record Qcow2CheckResult
{
    /// <summary>Errors that mean data may be corrupt or later writes may corrupt it (refcounts too low, bad entries, COPIED flags...).</summary>
    public int Corruptions { get; init; }

    /// <summary>Clusters whose refcount is higher than their references (wasted space, no harm to data).</summary>
    public int Leaks { get; init; }

    /// <summary>Problems that stopped the check itself (I/O errors, a repair that could not be done).</summary>
    public int CheckErrors { get; init; }

    /// <summary>Corruptions repaired.</summary>
    public int CorruptionsFixed { get; init; }

    /// <summary>Leaks repaired.</summary>
    public int LeaksFixed { get; init; }

    /// <summary>Clusters of the virtual disk.</summary>
    public long TotalClusters { get; init; }

    /// <summary>Guest clusters the active L1 table maps to host clusters (compressed included).</summary>
    public long AllocatedClusters { get; init; }

    /// <summary>Allocated clusters not directly after the previous one in the file.</summary>
    public long FragmentedClusters { get; init; }

    /// <summary>Compressed clusters.</summary>
    public long CompressedClusters { get; init; }

    /// <summary>End of the last used cluster in the file.</summary>
    public long ImageEndOffset { get; init; }

    /// <summary>What the check found and did, line by line, each with its kind, in the order <c>qemu-img check</c> reports them.</summary>
    public IReadOnlyList<Qcow2CheckFinding> Findings { get; init; } = [];

    /// <summary>One line per finding, in qemu-img's words ("Leaked cluster 5 refcount=1 reference=0"): the texts of <see cref="Findings"/>.</summary>
    public IReadOnlyList<string> Messages => [.. Findings.Select(f => f.Text)];

    /// <summary>
    /// Why the check could not be completed (qemu-img then says "Check failed" and gives no figures),
    /// or null when it was: a snapshot table it cannot read, a refcount structure only a repair of
    /// <see cref="Qcow2RepairMode.All"/> may rebuild, a repair write that would have hit other metadata. <see cref="CheckErrors"/> is
    /// then at least 1; the other figures are those found up to that point.
    /// </summary>
    public string? Failure { get; init; }

    /// <summary>The first error found, else the first line of the report, else an empty string: what a refusal quotes.</summary>
    internal string FirstError() =>
        (Findings.FirstOrDefault(f => f.Kind == Qcow2CheckFindingKind.Error) ?? Findings.FirstOrDefault())?.Text ?? "";

    /// <summary>No corruptions, leaks or check errors remain.</summary>
    public bool IsClean => Corruptions == 0 && Leaks == 0 && CheckErrors == 0 && Failure is null;
}

/// <summary>What one line of a check's report is, as <c>qemu-img check</c> words it.</summary>
public enum Qcow2CheckFindingKind
{
    /// <summary>A corruption or check error left as it is ("ERROR cluster 5 refcount=0 reference=1"); qemu-img's lines that begin with "ERROR".</summary>
    Error,

    /// <summary>A leaked cluster left as it is ("Leaked cluster 5 refcount=2 reference=1").</summary>
    Leak,

    /// <summary>Something being repaired ("Repairing cluster 5 refcount=2 reference=1", "Discarding 3 overhanging snapshots", "Rebuilding refcount structure").</summary>
    Repair,

    /// <summary>Why the check could not be completed ("Check failed: ..."); <see cref="Qcow2CheckResult.Failure"/> says the same.</summary>
    Failure,

    /// <summary>Anything else: an advice, an error the check met on its way, the image marked corrupt.</summary>
    Note,
}

/// <summary>One line of a check's report: its kind and its text, in qemu-img's words.</summary>
/// <param name="Kind">What the line reports.</param>
/// <param name="Text">The line as <c>qemu-img check</c> prints it.</param>
public sealed record Qcow2CheckFinding(Qcow2CheckFindingKind Kind, string Text);
