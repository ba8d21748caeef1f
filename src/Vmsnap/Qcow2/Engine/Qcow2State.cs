using Vmsnap.Storage;
using Vmsnap.Storage.LowLevel;

namespace Vmsnap.Qcow2;

/// <summary>
/// Everything the engine knows about one open image, declared in one place (QEMU's BDRVQcow2State):
/// the file, the header, the active L1 table, the refcount table, the metadata caches, the snapshot
/// list, the backing file, what has been found wrong, the VM-state areas open, and the memos of the
/// write path. The engine and its collaborators read and change it under <see cref="RequestGate.SyncRoot"/>;
/// each collaborator is handed the parts it works on, never this whole object. What is private to a
/// collaborator stays with it: the request gate's ranges in flight, the refcount allocator's hints,
/// reservations and owed decrements, a check's counts.
/// </summary>
internal sealed class Qcow2State
{
    internal Qcow2State(IBlockDevice device, string path, Qcow2Header header, Qcow2OpenOptions options, bool ownsDevice)
    {
        Device = device;
        Path = path;
        Header = header;
        Options = options;
        OwnsDevice = ownsDevice;
        ReadOnly = options.ReadOnly || options.ForceShare || device.IsReadOnly;
        Geometry = new ClusterGeometry(header.ClusterBits, header.HasExtendedL2, header.RefcountOrder);
        Health = new ImageHealth(path);
        File = new Qcow2File(device, header, Health);
        ActiveL1 = new L1Table((long)header.L1TableOffset, L1Table.Read(device, (long)header.L1TableOffset, (int)header.L1Size), isActive: true, header.ClusterBits);
        RefcountTable = new RefcountTable(header, RefcountTable.Read(device, header));
        Overlaps = new MetadataOverlap(header, ActiveL1, RefcountTable, Snapshots, device, path, MetadataOverlap.ChecksFor(options.OverlapCheck));
        File.Overlaps = Overlaps;
        int l2Capacity = (int)Math.Clamp((32L << 20) / Geometry.ClusterSize, 16, 65536);
        L2Cache = new MetadataCache(File, Geometry.ClusterSize, l2Capacity, "L2 table", Qcow2Metadata.ActiveL2, ActiveL1);
        int blockCapacity = (int)Math.Clamp((4L << 20) / Geometry.ClusterSize, 16, 4096);
        RefcountBlocks = new MetadataCache(File, Geometry.ClusterSize, blockCapacity, "refcount block", Qcow2Metadata.RefcountBlock, RefcountTable);
    }

    // ---- the file ------------------------------------------------------------------------------

    internal IBlockDevice Device { get; }
    internal string Path { get; }
    internal Qcow2OpenOptions Options { get; }
    internal bool OwnsDevice { get; }
    internal bool ReadOnly { get; }

    /// <summary>Every write of the image goes through here.</summary>
    internal Qcow2File File { get; }

    // ---- metadata as the engine knows it ------------------------------------------------------

    internal Qcow2Header Header { get; }
    internal ClusterGeometry Geometry { get; }
    internal long VirtualSize => (long)Header.Size;

    /// <summary>The active L1 table (dirty entries are written after the L2 tables they point to).</summary>
    internal L1Table ActiveL1 { get; }

    /// <summary>Cached L2 tables, active and snapshot ones.</summary>
    internal MetadataCache L2Cache { get; }

    internal RefcountTable RefcountTable { get; }

    /// <summary>What every write is checked against before it is made.</summary>
    internal MetadataOverlap Overlaps { get; }
    internal MetadataCache RefcountBlocks { get; }

    /// <summary>The snapshot table (read on open, except for a check, which reads it itself).</summary>
    internal SnapshotList Snapshots { get; } = new();

    internal BackingStore? Backing { get; set; }

    /// <summary>
    /// Active L2 tables checked since they were loaded. Like QEMU, a clean image is trusted and
    /// checked lazily: each active L2 table is validated the first time a write uses it (entries,
    /// COPIED flags against refcounts, clusters shared inside it).
    /// </summary>
    internal HashSet<long> ValidatedL2 { get; } = [];

    /// <summary>
    /// Host clusters that several entries of the active L2 tables share (legal only with a matching
    /// refcount, e.g. after check repaired such sharing), with the guest offsets that map to them:
    /// when a copy-on-write leaves one reference, that entry gets its COPIED flag back.
    /// </summary>
    internal Dictionary<long, List<long>> ActiveShared { get; } = [];

    // ---- found, open, in flight -----------------------------------------------------------------

    internal ImageHealth Health { get; }

    /// <summary>The VM-state areas open for writing and reading.</summary>
    internal VmStateSlots VmState { get; } = new();

    /// <summary>Set once an I/O failure reached a caller: a later failure of Dispose's own flush is then only a consequence, and must not hide the first error.</summary>
    internal volatile bool IoFailureReported;

    /// <summary>The decompressed content of the last compressed cluster read (for sequential small reads), under its own lock.</summary>
    internal (ulong Word, byte[]? Data) LastDecompressed { get; set; }

    internal object DecompressLock { get; } = new();
}
