using Vmsnap.Qcow2.LowLevel;

namespace Vmsnap.Qcow2;

/// <summary>Internal snapshots and the VM-state area.</summary>
public sealed partial class Qcow2Image
{
    /// <summary>The image's snapshots in table order (what <c>qemu-img snapshot -l</c> lists).</summary>
    public IReadOnlyList<Qcow2Snapshot> Snapshots
    {
        get
        {
            lock (Engine.SyncRoot)
            {
                Engine.ThrowIfDisposed();
                return Engine.State.Snapshots.Entries.Select(ToPublic).ToArray();
            }
        }
    }

    /// <summary>The snapshot with this ID, else the first one with this name (QEMU's lookup order), else null.</summary>
    /// <exception cref="Qcow2FormatException">The snapshot table has duplicate IDs (a lookup would be ambiguous) or an unusable entry.</exception>
    public Qcow2Snapshot? FindSnapshot(string idOrName)
    {
        ArgumentNullException.ThrowIfNull(idOrName);
        lock (Engine.SyncRoot)
        {
            Engine.ThrowIfDisposed();
            Engine.SnapshotOps.ValidateSnapshotTable();
            int index = Engine.SnapshotOps.FindSnapshotIndex(idOrName);
            return index < 0 ? null : ToPublic(Engine.State.Snapshots[index]);
        }
    }

    /// <summary>Refuses a snapshot name QEMU cannot keep (empty, longer than 255 bytes, a NUL), as <see cref="CreateSnapshot"/> would.</summary>
    /// <exception cref="ArgumentException">The name is one QEMU cannot keep.</exception>
    public static void CheckSnapshotName(string name) => SnapshotOperations.CheckSnapshotName(name);

    /// <summary>
    /// Creates a snapshot of the active disk, named <paramref name="name"/> (unique in the image),
    /// with the next free ID (the highest numeric ID + 1). With <see cref="Qcow2SnapshotCreateOptions.VmStateSize"/>
    /// above 0 the snapshot also takes over the VM-state area written through <see cref="OpenVmStateAreaForWriting"/>
    /// (which then refuses further writes), and the active disk no longer maps that area, so the next
    /// save writes fresh clusters. The snapshot shares the active L2 tables; their COPIED flags are
    /// cleared in place. Crash-safe: the image switches to the new metadata in one header write (two
    /// when L2 tables need their flags cleared: the first moves the active disk to copies of them
    /// while they are rewritten), every state in between a whole, consistent image.
    /// </summary>
    /// <exception cref="ArgumentException">The name is empty, too long (QEMU keeps 255 bytes) or the options are out of range.</exception>
    /// <exception cref="SnapshotExistsException">The name is taken.</exception>
    /// <exception cref="OperationRefusedException">The image is read-only or already has the most snapshots qcow2 allows.</exception>
    /// <exception cref="Qcow2FormatException">The image is corrupt.</exception>
    public Qcow2Snapshot CreateSnapshot(string name, Qcow2SnapshotCreateOptions? options = null)
    {
        SnapshotEntry entry = Run(() => Engine.SnapshotOps.CreateSnapshot(name, options ?? new Qcow2SnapshotCreateOptions()));
        return ToPublic(entry);
    }

    /// <summary>
    /// Deletes the snapshot with this ID or name: the table without it, and every cluster only it
    /// used (its L1 and L2 tables, data, VM state) freed. Crash-safe like <see cref="CreateSnapshot"/>.
    /// </summary>
    /// <returns>The snapshot deleted.</returns>
    /// <exception cref="SnapshotNotFoundException">No snapshot has that ID or name.</exception>
    public Qcow2Snapshot DeleteSnapshot(string idOrName) => ToPublic(Run(() => Engine.SnapshotOps.DeleteSnapshot(idOrName)));

    /// <summary>
    /// Reverts the active disk to the snapshot with this ID or name (like <c>qemu-img snapshot -a</c>);
    /// the snapshot stays. Crash-safe like <see cref="CreateSnapshot"/>.
    /// </summary>
    /// <returns>The snapshot applied.</returns>
    /// <exception cref="SnapshotNotFoundException">No snapshot has that ID or name.</exception>
    /// <exception cref="OperationRefusedException">The snapshot was taken of a disk of another size, or the VM-state area is open for writing.</exception>
    public Qcow2Snapshot ApplySnapshot(string idOrName) => ToPublic(Run(() => Engine.SnapshotOps.ApplySnapshot(idOrName, withVmState: true)));

    /// <summary>
    /// Reverts the active disk to the snapshot with this ID or name, as <see cref="ApplySnapshot(string)"/> does but with
    /// <paramref name="withVmState"/> false: the active table then maps the disk's range only, and the snapshot's VM state stays
    /// reachable through the snapshot alone. The work then does not grow with the VM state (QEMU's and qemu-img's apply walk
    /// and count every VM-state cluster too), which is what a load that reads the VM state from the snapshot wants; QEMU's next
    /// savevm writes its VM state to fresh clusters instead of copying shared ones.
    /// </summary>
    /// <returns>The snapshot applied.</returns>
    /// <exception cref="SnapshotNotFoundException">No snapshot has that ID or name.</exception>
    /// <exception cref="OperationRefusedException">The snapshot was taken of a disk of another size, or the VM-state area is open for writing.</exception>
    public Qcow2Snapshot ApplySnapshot(string idOrName, bool withVmState) => ToPublic(Run(() => Engine.SnapshotOps.ApplySnapshot(idOrName, withVmState)));

    /// <summary>
    /// Opens the VM-state area for writing (one at a time per image): offset 0 is the image's
    /// VM-state offset. Nothing the image's metadata reaches changes while it is written; the
    /// snapshot create takes it over (and drops whatever the active table mapped past the disk).
    /// Write the stream, <see cref="Qcow2VmStateArea.Flush"/>, then <see cref="CreateSnapshot"/> with
    /// its size; on failure <see cref="Qcow2VmStateArea.Discard"/> it all (or close it): the image is as it was.
    /// </summary>
    public Qcow2VmStateArea OpenVmStateAreaForWriting() => Run(Engine.OpenVmStateForWriting);

    /// <summary>Opens a snapshot's VM state for reading: a read-only device exactly <see cref="Qcow2Snapshot.VmStateSize"/> bytes long.</summary>
    /// <exception cref="SnapshotNotFoundException">The image has no such snapshot (same ID and L1 table).</exception>
    /// <exception cref="Qcow2FormatException">The snapshot's L1 table is unusable.</exception>
    public Qcow2VmStateArea OpenVmStateAreaForReading(Qcow2Snapshot snapshot) => OpenVmStateAreaForReading(snapshot, wholeArea: false);

    /// <summary>
    /// Opens a snapshot's VM-state area for reading, with <paramref name="wholeArea"/> as far as qcow2 can map
    /// rather than <see cref="Qcow2Snapshot.VmStateSize"/> bytes: QEMU 10.2's savevm with mapped-ram lays the VM
    /// state out by offset, and its recorded size (the bytes it wrote) is less than how far the layout reaches.
    /// </summary>
    /// <exception cref="SnapshotNotFoundException">The image has no such snapshot (same ID and L1 table).</exception>
    /// <exception cref="Qcow2FormatException">The snapshot's L1 table is unusable.</exception>
    public Qcow2VmStateArea OpenVmStateAreaForReading(Qcow2Snapshot snapshot, bool wholeArea)
    {
        ArgumentNullException.ThrowIfNull(snapshot);
        SnapshotEntry entry;
        lock (Engine.SyncRoot)
        {
            Engine.ThrowIfDisposed();
            entry = Engine.State.Snapshots.Entries.Find(s => s.Id == snapshot.Id && s.L1TableOffset == snapshot.L1TableOffset)
                ?? throw new SnapshotNotFoundException(snapshot.Id, Path);
        }
        return Engine.OpenVmStateForReading(entry, ToPublic(entry), wholeArea);
    }

    /// <summary>Opens the VM state of the snapshot with this ID or name for reading.</summary>
    /// <exception cref="SnapshotNotFoundException">No snapshot has that ID or name.</exception>
    public Qcow2VmStateArea OpenVmStateAreaForReading(string idOrName) =>
        OpenVmStateAreaForReading(FindSnapshot(idOrName) ?? throw new SnapshotNotFoundException(idOrName, Path));

    /// <summary>
    /// The bytes the snapshot's table entry keeps after QEMU's extra-data fields (64-bit VM-state size, disk size, icount):
    /// what <see cref="Qcow2SnapshotCreateOptions.ExtraData"/> recorded, or another program's; empty when there are none.
    /// </summary>
    /// <exception cref="SnapshotNotFoundException">The image has no such snapshot (same ID and L1 table).</exception>
    public byte[] GetSnapshotExtraData(Qcow2Snapshot snapshot)
    {
        ArgumentNullException.ThrowIfNull(snapshot);
        lock (Engine.SyncRoot)
        {
            Engine.ThrowIfDisposed();
            SnapshotEntry entry = Engine.State.Snapshots.Entries.Find(s => s.Id == snapshot.Id && s.L1TableOffset == snapshot.L1TableOffset)
                ?? throw new SnapshotNotFoundException(snapshot.Id, Path);
            return entry.UnknownExtraData.ToArray();
        }
    }

    private Qcow2Snapshot ToPublic(SnapshotEntry s) => new()
    {
        Id = s.Id,
        Name = s.Name,
        VmStateSize = s.VmStateSize,
        Date = s.Date,
        DateSeconds = s.DateSeconds,
        DateNanoseconds = s.DateNanoseconds,
        VmClock = unchecked((long)s.VmClockNanoseconds),
        DiskSize = s.DiskSize is ulong d ? (long)Math.Min(d, long.MaxValue) : Engine.State.VirtualSize,
        Icount = s.Icount ?? -1,
        L1TableOffset = s.L1TableOffset,
        L1Size = (int)Math.Min(s.L1Size, int.MaxValue),
    };
}
