namespace Vmsnap.Qcow2;

/// <summary>A VM-state area written into the image file outside the engine and linked in afterwards (live saves; see docs/live.md).</summary>
public sealed partial class Qcow2Image
{
    /// <summary>One past the highest cluster the image's refcounts say is in use, in bytes.</summary>
    internal long UsedEnd() => Engine.UsedEnd();

    /// <summary>True when the image keeps persistent dirty bitmaps (which the engine does not maintain, so it refuses to write such an image).</summary>
    internal bool HasPersistentBitmaps
    {
        get
        {
            lock (Engine.SyncRoot)
                return Engine.State.Header.FindExtension(HeaderExtension.Bitmaps) is not null && (Engine.State.Header.AutoclearFeatures & Qcow2Header.AutoclearBitmaps) != 0;
        }
    }

    /// <summary>Runs of free clusters below <paramref name="end"/> at least <paramref name="minLength"/> bytes long (file offset, length).</summary>
    internal List<(long Offset, long Length)> FreeRuns(long end, long minLength) => Engine.FreeRuns(end, minLength);

    /// <summary>Bytes of the file the refcount table can describe without growing.</summary>
    internal long RefcountReach => (long)Engine.Refcounts.Table.Length * Engine.State.Geometry.RefcountBlockEntries << Engine.State.Geometry.ClusterBits;

    /// <summary>
    /// Why the file region from <paramref name="offset"/> (<paramref name="length"/> bytes written there)
    /// cannot become the VM-state area, or null: it must still be in the file and nothing the image uses
    /// may lie there, after it, or in the <paramref name="reserveBelow"/> bytes before it.
    /// </summary>
    internal string? CheckVmStateRegion(long offset, long length, long reserveBelow) => Engine.CheckVmStateRegion(offset, length, reserveBelow);

    /// <summary>
    /// Makes the file region [<paramref name="offset"/>, + <paramref name="length"/>) the active VM-state
    /// area, so that <see cref="CreateSnapshot"/> with that VM-state size takes it over. Refuses (nothing
    /// changed) when <see cref="CheckVmStateRegion"/> finds a problem.
    /// </summary>
    internal void LinkVmStateRegion(long offset, long length, long reserveBelow) => Engine.LinkVmStateRegion(offset, length, reserveBelow);

    /// <summary>Drops a linked VM-state area no snapshot took over, and gives its space back.</summary>
    internal void DropLinkedVmState() => Engine.DropLinkedVmState();

    /// <summary>Shortens the file to its last used cluster (a region written but never linked is given back).</summary>
    internal void TrimUnusedTail() => Engine.TrimUnusedTail();
}
