using Vmsnap.Storage;
using Vmsnap.Storage.LowLevel;

namespace Vmsnap.Qcow2;

/// <summary>
/// The qcow2 image engine behind <see cref="Qcow2Image"/>: opens an image into its state
/// (<see cref="Qcow2State"/>, the one place the engine's state is declared), wires the collaborators
/// that work on it, each handed the parts it needs (refcounts, cluster mapping, snapshot operations,
/// the check), and runs guest reads and writes, flushes, the VM-state area and close. Metadata is
/// only touched under the request gate's lock; data I/O runs outside it.
/// </summary>
internal sealed partial class Qcow2Engine : IDisposable
{
    internal const int MaxBackingDepth = 16;

    private Qcow2Engine(IBlockDevice device, string path, Qcow2Header header, Qcow2OpenOptions options, bool ownsDevice)
    {
        State = new Qcow2State(device, path, header, options, ownsDevice);
        Qcow2State s = State;
        Refcounts = new RefcountManager(s.File, s.Geometry, header, s.RefcountTable, s.RefcountBlocks, s.L2Cache, s.Health);
        Caches = new MetadataCaches(s.File, header, s.ActiveL1, s.L2Cache, Refcounts);
        Gate = new RequestGate(s.Geometry.ClusterBits, Caches);
        DirtyRepair = new DirtyRepair(CheckedParts, s.Health, path, options.OverlapCheck);
        Guard = new WriteGuard(header, s.File, s.Health, s.ReadOnly, DirtyRepair);
        Mapping = new ClusterMapping(s.File, header, s.Geometry, s.ActiveL1, s.L2Cache, Refcounts, Caches, s.Health, s.ValidatedL2, s.ActiveShared);
        SnapshotOps = new SnapshotOperations(s.File, header, s.Geometry, Mapping, Refcounts, Caches, s.Snapshots, s.VmState, Gate, Guard, s.Health);
    }

    /// <summary>Everything the engine knows about the image.</summary>
    internal Qcow2State State { get; }

    /// <summary>Refcounts: allocation, freeing, the refcount table and blocks (QEMU's qcow2-refcount.c).</summary>
    internal RefcountManager Refcounts { get; }

    /// <summary>The metadata caches together: flushed in crash-safe order, trimmed between operations.</summary>
    internal MetadataCaches Caches { get; }

    /// <summary>The metadata lock, requests in flight, disposal.</summary>
    internal RequestGate Gate { get; }

    /// <summary>The repair a dirty image gets before its first change.</summary>
    internal DirtyRepair DirtyRepair { get; }

    /// <summary>Whether the image may change, and what the first change does first.</summary>
    internal WriteGuard Guard { get; }

    /// <summary>L1/L2 lookups, L2 allocation and copy-on-write, L1 growth, validation of active L2 tables (QEMU's qcow2-cluster.c).</summary>
    internal ClusterMapping Mapping { get; }

    /// <summary>Snapshot create, delete and apply, and the snapshot table's lookups (QEMU's qcow2-snapshot.c).</summary>
    internal SnapshotOperations SnapshotOps { get; }

    /// <summary>The metadata lock. Internal callers building on the engine (snapshots) take it too.</summary>
    internal object SyncRoot => Gate.SyncRoot;

    private IBlockDevice Device => State.Device;
    private string Path => State.Path;
    private Qcow2Header Header => State.Header;
    private ClusterGeometry Geometry => State.Geometry;
    private bool ReadOnly => State.ReadOnly;

    /// <summary>The parts a check reads and repairs.</summary>
    private CheckedImage CheckedParts => new(State.File, Header, Geometry, ReadOnly, State.ActiveL1, State.L2Cache, Refcounts, Caches, State.Snapshots, State.Overlaps);

    /// <summary>Guest offset of the VM-state area of a disk of <paramref name="diskSize"/> bytes.</summary>
    internal long VmStateOffsetFor(long diskSize) => Geometry.L1EntriesFor(diskSize) * Geometry.BytesPerL2;

    /// <summary>Guest offset where the VM-state area starts: right after the L1 entries the disk needs.</summary>
    internal long VmStateOffset => VmStateOffsetFor(State.VirtualSize);

    private Qcow2FormatException Corrupt(string structure, long? offset, string problem) => State.Health.Corrupt(structure, offset, problem);

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
                List<SnapshotEntry> snapshots = SnapshotTable.Read(device, header, device.Length, out long tableBytes);
                engine.State.Snapshots.Set(snapshots, tableBytes);
            }
            if (options.OpenBackingFile && header.BackingFile is not null)
            {
                engine.State.Backing = BackingStore.Open(header, path, options, depth);
                engine.Guard.BackingMissing = false;
            }
            // Like QEMU, a dirty image's refcounts are repaired before it is written; unlike QEMU, only
            // when a change goes ahead (a refused operation leaves the file as it was).
            engine.DirtyRepair.Pending = !engine.ReadOnly && header.IsDirty && !options.SkipDirtyRepair && !options.ForCheck && !header.IsCorrupt;
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
            engine.Gate.Disposed = true;
            engine.State.Backing?.Dispose();
        }
        if (ownsDevice) device.Dispose();
    }

    internal void ThrowIfDisposed() => Gate.ThrowIfDisposed();

    /// <summary>
    /// Exception filter for the public entry points (<c>catch (Exception e) when (NoteFailure(e))</c>):
    /// notes an I/O failure that is about to reach the caller; never catches.
    /// </summary>
    internal bool NoteFailure(Exception e)
    {
        if (e is StorageException or IOException) State.IoFailureReported = true;
        return false;
    }

    internal void Flush()
    {
        lock (SyncRoot)
        {
            ThrowIfDisposed();
            if (ReadOnly) return;
            Caches.FlushAll();
            State.File.Flush();
        }
    }

    /// <summary>
    /// Rewrites the whole header cluster from the header in memory: fields, extensions (unknown
    /// ones as they were), backing file name.
    /// </summary>
    internal void RewriteHeader()
    {
        lock (SyncRoot)
        {
            ThrowIfDisposed();
            Guard.EnsureWritable();
            Caches.FlushAll();
            byte[] cluster = Header.EncodeCluster();
            State.File.WriteHeader(cluster, 0);
            State.File.Flush();
        }
    }

    public void Dispose()
    {
        lock (SyncRoot)
        {
            if (Gate.Disposed) return;
            try
            {
                if (!ReadOnly)
                {
                    // A VM-state area left open is given up: nothing refers to it, the file ends where it did.
                    VmStateAllocation? writer = State.VmState.Writer;
                    writer?.WaitIdle();
                    writer?.ReleaseReservation();
                    State.VmState.Writer = null;
                    Caches.FlushAll();
                    if (writer is not null && writer.CapturedBy is null) Refcounts.TrimFreeTail();
                }
            }
            catch (Exception e) when (State.IoFailureReported && e is StorageException or IOException)
            {
                // The device already failed an operation and the caller got that error, the first one:
                // this flush failing too adds nothing (what it could not write is at worst a leak).
            }
            finally
            {
                Gate.Disposed = true;
                State.Backing?.Dispose();
                if (State.OwnsDevice) Device.Dispose();
            }
        }
    }
}
