namespace Vmsnap.Qcow2;

/// <summary>Compression used for compressed clusters (header field compression_type).</summary>
public enum Qcow2CompressionType
{
    /// <summary>Raw deflate (QEMU calls it "zlib"); the default.</summary>
    Zlib = 0,

    /// <summary>Zstandard.</summary>
    Zstd = 1,
}

/// <summary>How to create a qcow2 image. The defaults are those of <c>qemu-img create -f qcow2</c>.</summary>
public sealed record Qcow2CreateOptions
{
    /// <summary>Cluster size in bytes: a power of two from 512 to 2 MiB (default 64 KiB).</summary>
    public int ClusterSize { get; init; } = 64 * 1024;

    /// <summary>Width of a refcount: 1, 2, 4, 8, 16, 32 or 64 bits (default 16; version 2 images only allow 16).</summary>
    public int RefcountBits { get; init; } = 16;

    /// <summary>Format version: 3 (QEMU's compat=1.1, the default) or 2 (compat=0.10).</summary>
    public int Version { get; init; } = 3;

    /// <summary>Set the lazy_refcounts compatible feature (version 3 only).</summary>
    public bool LazyRefcounts { get; init; }

    /// <summary>Use extended L2 entries with 32 subclusters per cluster (version 3, clusters of 16 KiB or more).</summary>
    public bool ExtendedL2 { get; init; }

    /// <summary>Compression type recorded in the header for compressed clusters (version 3 only for zstd).</summary>
    public Qcow2CompressionType CompressionType { get; init; } = Qcow2CompressionType.Zlib;

    /// <summary>Backing file name stored in the header (relative names are resolved against the image's folder), or null.</summary>
    public string? BackingFile { get; init; }

    /// <summary>Format of the backing file: "raw" or "qcow2" (recorded in the backing format extension).</summary>
    public string? BackingFormat { get; init; }

    /// <summary>Fail if the file already exists (default: replace it, like qemu-img).</summary>
    public bool FailIfExists { get; init; }
}

/// <summary>
/// Which metadata every write is checked against before it is made (QEMU's qcow2 <c>overlap-check</c>
/// option). A write that would overwrite metadata means the image's metadata is inconsistent: it is
/// refused, nothing of it is written, and the image is marked corrupt, as QEMU marks it.
/// </summary>
public enum Qcow2OverlapCheck
{
    /// <summary>QEMU's "cached", the default: the header, the active L1 table and its L2 tables, the refcount table and its blocks, the snapshot table, the snapshots' L1 tables and the bitmap directory.</summary>
    Cached = 0,

    /// <summary>QEMU's "none": no check.</summary>
    None,

    /// <summary>QEMU's "constant": the header, the active L1 table, the refcount table, the snapshot table and the bitmap directory.</summary>
    Constant,

    /// <summary>QEMU's "all": what "cached" checks, and the snapshots' L2 tables.</summary>
    All,
}

/// <summary>How to open a qcow2 image.</summary>
public sealed record Qcow2OpenOptions
{
    /// <summary>Open for reading only (default: read and write).</summary>
    public bool ReadOnly { get; init; }

    /// <summary>Use O_DIRECT for requests whose offset, length and memory are aligned (4 KiB), bypassing the page cache.</summary>
    public bool Direct { get; init; }

    /// <summary>
    /// Open the backing file chain (default true). When false, clusters the image does not hold read
    /// as zeroes and writes are refused if the image has a backing file.
    /// </summary>
    public bool OpenBackingFile { get; init; } = true;

    /// <summary>
    /// Use this file as the backing file instead of the name stored in the header (format taken from
    /// the header's backing format extension, else probed).
    /// </summary>
    public string? BackingFileOverride { get; init; }

    /// <summary>
    /// Inspect an image another process may be writing (like qemu-img's --force-share): implies
    /// read-only and takes only a shared read lock that tolerates writers, so it works while a QEMU
    /// runs the image (what it reads may then be inconsistent).
    /// </summary>
    public bool ForceShare { get; init; }

    /// <summary>Which metadata each write is checked against first (QEMU's overlap-check; default <see cref="Qcow2OverlapCheck.Cached"/>).</summary>
    public Qcow2OverlapCheck OverlapCheck { get; init; } = Qcow2OverlapCheck.Cached;

    /// <summary>Skip the refcount repair a dirty image (lazy refcounts) gets before its first change; check uses it.</summary>
    internal bool SkipDirtyRepair { get; init; }

    /// <summary>
    /// Open for <see cref="Qcow2Image.Check(Qcow2RepairMode)"/> only, the way qemu-img check opens: the snapshot table
    /// is not read (the check reads it and reports what is wrong with it), and what only the check
    /// judges (tables past the end of the file, no refcount table) does not refuse the open; no dirty
    /// repair. Nothing but Check may be called on such an image.
    /// </summary>
    internal bool ForCheck { get; init; }
}

/// <summary>What to repair when checking an image (like <c>qemu-img check -r</c>).</summary>
public enum Qcow2RepairMode
{
    /// <summary>Only report.</summary>
    None,

    /// <summary>Free leaked clusters (refcounts higher than the references).</summary>
    Leaks,

    /// <summary>Also fix refcounts that are too low, rebuild the refcount structure if needed, and fix COPIED flags.</summary>
    All,
}
