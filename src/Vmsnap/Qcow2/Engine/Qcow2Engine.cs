using Vmsnap.Storage;

namespace Vmsnap.Qcow2;

/// <summary>
/// The qcow2 image engine behind <see cref="Qcow2Image"/>: owns the device, the header, the caches
/// and the metadata lock, and ties mapping, refcounts, write ordering and check together.
/// Metadata is only touched under <see cref="SyncRoot"/>; data I/O runs outside it.
/// </summary>
internal sealed partial class Qcow2Engine : IDisposable
{
    internal const int MaxBackingDepth = 16;

    private readonly object _lock = new();
    private readonly bool _ownsDevice;
    private bool _disposed;

    private Qcow2Engine(IBlockDevice device, string path, Qcow2Header header, Qcow2OpenOptions options, bool ownsDevice)
    {
        Device = device;
        Path = path;
        Header = header;
        Options = options;
        _ownsDevice = ownsDevice;
        ReadOnly = options.ReadOnly || options.ForceShare || device.IsReadOnly;
        Geometry = new ClusterGeometry(header.ClusterBits, header.HasExtendedL2, header.RefcountOrder);
        Order = new WriteOrder { FlushRefcountSide = FlushRefcountSide, FlushMappingSide = FlushMappingSide };
        Refcounts = new RefcountManager(device, Geometry, header, Order, RefcountManager.ReadTable(device, header), path);
        Refcounts.OnCorruption = e => _corruption ??= e.Message;
        Mapping = new ClusterMapping(this, new L1Table((long)header.L1TableOffset, ReadL1(device, (long)header.L1TableOffset, (int)header.L1Size), isActive: true));
        L2Cache.BeforeWriteBack = () =>
        {
            if (Order.MappingDependsOnRefcounts) FlushRefcountSide();
            if (Order.MappingDependsOnData) FlushData();
        };
        Refcounts.Blocks.BeforeWriteBack = () => { if (Order.RefcountsDependOnMapping) FlushMappingSide(); };
        SnapshotOps = new SnapshotOperations(this);
    }

    internal IBlockDevice Device { get; }
    internal string Path { get; }
    internal Qcow2Header Header { get; }
    internal Qcow2OpenOptions Options { get; }
    internal ClusterGeometry Geometry { get; }
    internal WriteOrder Order { get; }
    internal RefcountManager Refcounts { get; }
    internal MetadataCache L2Cache => Mapping.L2Cache;
    internal L1Table ActiveL1 => Mapping.ActiveL1;
    internal bool ReadOnly { get; }
    internal List<SnapshotEntry> Snapshots { get; private set; } = [];
    internal long SnapshotTableBytes { get; private set; }
    internal BackingStore? Backing { get; private set; }

    /// <summary>L1/L2 lookups, L2 allocation and copy-on-write, L1 growth (QEMU's qcow2-cluster.c).</summary>
    internal ClusterMapping Mapping { get; }

    /// <summary>Snapshot create, delete and apply, and the snapshot table's lookups (QEMU's qcow2-snapshot.c).</summary>
    internal SnapshotOperations SnapshotOps { get; }

    /// <summary>The VM-state area open for writing, if any.</summary>
    internal VmStateAllocation? VmStateWriter { get; set; }

    /// <summary>Guest offset of the VM-state area of a disk of <paramref name="diskSize"/> bytes.</summary>
    internal long VmStateOffsetFor(long diskSize) => Geometry.L1EntriesFor(diskSize) * Geometry.BytesPerL2;

    // ---- cluster mapping (lives in ClusterMapping) ----------------------------------------------

    internal MetadataCache.Table? GetL2Table(L1Table l1, long l1Index) => Mapping.GetL2Table(l1, l1Index);
    internal void ValidateL2Offset(L1Table l1, long l1Index, long l2) => Mapping.ValidateL2Offset(l1, l1Index, l2);
    internal void ValidateEntry(L2Entry e, ClusterKind kind, long l2Offset, int index) => Mapping.ValidateEntry(e, kind, l2Offset, index);
    internal MetadataCache.Table GetWritableL2(long l1Index) => Mapping.GetWritableL2(l1Index);
    internal void GrowL1(long minEntries, bool exact) => Mapping.GrowL1(minEntries, exact);
    internal L1Table ReadL1Table(long offset, uint entries, string what) => Mapping.ReadL1Table(offset, entries, what);
    internal void MapRange(L1Table l1, long offset, long length, List<Extent> extents) => Mapping.MapRange(l1, offset, length, extents);

    /// <summary>Replaces the in-memory snapshot list after the snapshot table was rewritten on disk.</summary>
    internal void SetSnapshots(List<SnapshotEntry> snapshots, long tableBytes)
    {
        Snapshots = snapshots;
        SnapshotTableBytes = tableBytes;
    }

    // ---- snapshots (the operations live in SnapshotOperations) ---------------------------------

    internal SnapshotEntry CreateSnapshot(string name, Qcow2SnapshotCreateOptions options) => SnapshotOps.CreateSnapshot(name, options);
    internal SnapshotEntry DeleteSnapshot(string idOrName) => SnapshotOps.DeleteSnapshot(idOrName);
    internal SnapshotEntry ApplySnapshot(string idOrName) => SnapshotOps.ApplySnapshot(idOrName);
    internal int FindSnapshotIndex(string idOrName) => SnapshotOps.FindSnapshotIndex(idOrName);
    internal void ValidateSnapshotTable() => SnapshotOps.ValidateSnapshotTable();
    internal static void CheckSnapshotName(string name) => SnapshotOperations.CheckSnapshotName(name);
    internal static ulong ParseIdLikeStrtoul(string text) => SnapshotOperations.ParseIdLikeStrtoul(text);
    private void ThrowIfSwitchFailed() => SnapshotOps.ThrowIfSwitchFailed();
    private L1Table ReadSnapshotL1(SnapshotEntry s) => SnapshotOps.ReadSnapshotL1(s);
    private static string Describe(SnapshotEntry s) => SnapshotOperations.Describe(s);
    private void RegisterVmStateReader(long l1Offset, int delta) => SnapshotOps.RegisterVmStateReader(l1Offset, delta);

    /// <summary>The metadata lock. Internal callers building on the engine (snapshots) take it too.</summary>
    internal object SyncRoot => _lock;

    internal long VirtualSize => (long)Header.Size;

    /// <summary>Guest offset where the VM-state area starts: right after the L1 entries the disk needs.</summary>
    internal long VmStateOffset => Geometry.L1EntriesFor(VirtualSize) * Geometry.BytesPerL2;

    internal Qcow2FormatException Corrupt(string structure, long? offset, string problem) => new(structure, offset, problem, Path);

    internal static ulong[] ReadL1(IBlockDevice device, long offset, int entries)
    {
        if (entries == 0) return [];
        byte[] raw = new byte[entries * 8L];
        int n = device.Read(raw, offset);
        if (n < raw.Length) raw.AsSpan(n).Clear();
        return L1Entry.Decode(raw);
    }

    /// <summary>Opens an image on <paramref name="device"/>; validates everything reachable from the header.</summary>
    internal static Qcow2Engine Open(IBlockDevice device, string path, Qcow2OpenOptions options, bool ownsDevice, int depth = 0)
    {
        Qcow2Engine? engine = null;
        try
        {
            Qcow2Header header = Qcow2Header.Read(device);
            HeaderValidation.Validate(header, device.Length, options.ForCheck);
            engine = new Qcow2Engine(device, path, header, options, ownsDevice);
            if (!options.ForCheck)
            {
                // In check mode the checker reads the table itself, reporting what is wrong with it.
                engine.Snapshots = SnapshotTable.Read(device, header, device.Length, out long tableBytes);
                engine.SnapshotTableBytes = tableBytes;
            }
            if (options.OpenBackingFile && header.BackingFile is not null)
                engine.Backing = BackingStore.Open(engine, options, depth);
            if (!engine.ReadOnly && header.IsDirty && !options.SkipDirtyRepair && !options.ForCheck && !header.IsCorrupt)
                engine.RepairDirty();
            return engine;
        }
        catch (Qcow2FormatException e)
        {
            DisposeAfterFailedOpen(engine, device, ownsDevice);
            throw e.WithImage(path);
        }
        catch
        {
            DisposeAfterFailedOpen(engine, device, ownsDevice);
            throw;
        }
    }

    private static void DisposeAfterFailedOpen(Qcow2Engine? engine, IBlockDevice device, bool ownsDevice)
    {
        if (engine is not null)
        {
            engine._disposed = true;
            engine.Backing?.Dispose();
        }
        if (ownsDevice) device.Dispose();
    }

    internal void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(_disposed, this);

    // Set once an I/O failure reached a caller: a later failure of Dispose's own flush is then only
    // a consequence, and must not hide the first error (it would replace it in a using block).
    private volatile bool _ioFailureReported;

    /// <summary>
    /// Exception filter for the public entry points (<c>catch (Exception e) when (NoteFailure(e))</c>):
    /// notes an I/O failure that is about to reach the caller; never catches.
    /// </summary>
    internal bool NoteFailure(Exception e)
    {
        if (e is Storage.StorageException or IOException) _ioFailureReported = true;
        return false;
    }

    // ---- durability ---------------------------------------------------------------------------

    /// <summary>Writes dirty refcount blocks and table entries (after the mapping side when decrements wait on it), then flushes.</summary>
    private void FlushRefcountSide()
    {
        if (Order.RefcountsDependOnMapping) FlushMappingSide();
        if (Refcounts.WriteDirty()) FlushData();
        Order.MappingDependsOnRefcounts = false;
    }

    /// <summary>Flushes the device: data written before (copy-on-write merges included) is durable. Under the lock.</summary>
    private void FlushData()
    {
        Device.Flush();
        Order.MappingDependsOnData = false;   // set only under the lock, when a write links its clusters
    }

    /// <summary>Writes dirty L2 tables, then (after a flush) the dirty part of the active L1 table, then flushes.</summary>
    private void FlushMappingSide()
    {
        if (Order.MappingDependsOnRefcounts) FlushRefcountSide();
        bool wrote = L2Cache.WriteDirty();
        if (ActiveL1.IsDirty)
        {
            if (wrote) Device.Flush();
            WriteL1Entries();
            wrote = true;
        }
        if (wrote) Device.Flush();
        Order.RefcountsDependOnMapping = false;
        Refcounts.ReleaseFreed();
    }

    private void WriteL1Entries()
    {
        (int first, int count) = ActiveL1.TakeDirtyRange();
        if (count == 0) return;
        byte[] bytes = new byte[count * 8];
        L1Entry.Encode(ActiveL1.Entries.AsSpan(first, count), bytes);
        Device.Write(bytes, ActiveL1.Offset + first * 8L);
    }

    /// <summary>Makes every completed write durable: refcounts, then L2 tables, then the L1 table, with device flushes between.</summary>
    internal void FlushAll()
    {
        FreeOwed();
        FlushRefcountSide();   // writes the mapping side first when pending decrements wait on it
        FlushMappingSide();
    }

    internal void Flush()
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            if (ReadOnly) return;
            FlushAll();
            Device.Flush();
        }
    }

    /// <summary>Evicts cached tables beyond their capacity (between operations, under the lock).</summary>
    private void TrimCaches()
    {
        L2Cache.Trim();
        Refcounts.Blocks.Trim();
    }

    /// <summary>Writes header bytes in place (one small write), e.g. the L1 or refcount table fields.</summary>
    internal void WriteHeaderBytes(int offset, byte[] bytes) => Device.Write(bytes, offset);

    /// <summary>
    /// Rewrites the whole header cluster from <see cref="Header"/>: fields, extensions (unknown
    /// ones as they were), backing file name.
    /// </summary>
    internal void RewriteHeader()
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            EnsureWritable();
            FlushAll();
            byte[] cluster = Header.EncodeCluster();
            Device.Write(cluster, 0);
            Device.Flush();
        }
    }

    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed) return;
            try
            {
                if (!ReadOnly)
                {
                    // A VM-state area left open is given up: nothing refers to it, the file ends where it did.
                    VmStateAllocation? writer = VmStateWriter;
                    writer?.WaitIdle();
                    writer?.ReleaseReservation();
                    VmStateWriter = null;
                    FlushAll();
                    if (writer is not null && writer.CapturedBy is null) TrimFreeTail();
                }
            }
            catch (Exception e) when (_ioFailureReported && e is Storage.StorageException or IOException)
            {
                // The device already failed an operation and the caller got that error, the first one:
                // this flush failing too adds nothing (what it could not write is at worst a leak).
            }
            finally
            {
                _disposed = true;
                Backing?.Dispose();
                if (_ownsDevice) Device.Dispose();
            }
        }
    }
}
