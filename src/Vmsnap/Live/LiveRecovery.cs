using System.Text.Json.Nodes;
using Vmsnap.Live.Qmp;
using Vmsnap.Qcow2;
using Vmsnap.Storage;
using Vmsnap.Qcow2.LowLevel;

namespace Vmsnap.Live;

/// <summary>
/// Undoes what a killed live save left in QEMU and in its images, from the save's record inside QEMU
/// (<see cref="SaveRecord"/>). Run at the start of every save and load, and by <c>vmsnap recover</c>.
/// </summary>
/// <remarks>
/// What a save killed at each point leaves, and what is done about it (docs/live.md has the table):
/// <list type="bullet">
/// <item>QEMU's migration settings as the save set them: each value still at vmsnap's is put back; one
/// someone changed since is left as it is.</item>
/// <item>A migration under way: QEMU fails it at its next write into the closed channel (and resumes a
/// guest that ran at its start); recovery waits for that.</item>
/// <item>A guest vmsnap stopped (a save without <c>--live</c>), or one QEMU stopped for the switchover and
/// left in <c>postmigrate</c> with its images released: <c>cont</c>, if the guest ran before the save.</item>
/// <item>With the images released (<c>postmigrate</c>), the commit may have been cut short: each image's
/// leaked clusters are freed (a snapshot create cut before its header switch leaks at most), the snapshot is
/// kept when every drive has it, finished on the drives that lack it when the VM-state drive has it (the disks
/// are still as they were at the guest's stop), else deleted from the drives that have it; and the VM-state
/// image's unused tail (the unlinked VM state) is trimmed.</item>
/// <item>With QEMU holding the images again: the VM-state image's tail past QEMU's writes (plus the guard)
/// and past what the image uses is cut, as a failed save cuts it.</item>
/// <item>The channel's descriptor QEMU was handed but never used (a kill between getfd and migrate).</item>
/// <item>For <c>vmsnap recover</c> only: a <c>loadvm --postcopy</c> cut off after its guest started (QEMU in
/// <c>postcopy-paused</c>) is resumed from its own record (<see cref="PostcopyRecord"/>) through QEMU's postcopy recovery.</item>
/// </list>
/// Every step can be repeated: a recovery killed itself leaves the record, and the next one goes on.
/// </remarks>
internal sealed class LiveRecovery : LiveSession
{
    private static readonly TimeSpan MigrationEndTimeout = TimeSpan.FromSeconds(30);

    private readonly SaveRecord _record;
    private readonly List<string> _actions = [];
    private readonly List<string> _problems = [];

    private LiveRecovery(IQmpConnection qmp, SaveRecord record, CancellationToken cancellationToken)
        : base(qmp, record.Tag, cancellationToken) => _record = record;

    /// <summary>What a save or load runs first: recovers after a killed save, or returns null when QEMU holds no record.</summary>
    internal static LiveRecoveryResult? IfNeeded(IQmpConnection qmp, CancellationToken cancellationToken) =>
        SaveRecord.Read(qmp) is { } record ? new LiveRecovery(qmp, record, cancellationToken).Run() : null;

    /// <summary><c>vmsnap recover</c>: recovers after a killed save, or says that there was none and what state QEMU is in.</summary>
    internal static LiveRecoveryResult Explicit(IQmpConnection qmp, CancellationToken cancellationToken)
    {
        if (IfNeeded(qmp, cancellationToken) is { } done) return done;
        if (ResumePostcopy(qmp, cancellationToken) is { } resumed) return resumed;
        string state = QemuBlockDevices.Str(qmp.Execute("query-status")?["status"]) ?? "unknown";
        string description = state == "postmigrate"
            ? "no vmsnap save was interrupted on this QEMU, but it is in run state postmigrate: a migration completed and its images " +
              "are released (another tool's migration, or a vmsnap save of a guest that was paused); 'cont' runs the guest and takes the images back" +
              (qmp.IsAtLeast(10, 0) ? " (blockdev-set-active takes them back without running it)" : "")
            : $"no vmsnap save was interrupted on this QEMU (run state '{state}')";
        return new LiveRecoveryResult(false, null, null, "none", "none", false, [], [], [], state, description);
    }

    /// <summary>
    /// A postcopy load that was cut off (QEMU's guest waits in <c>postcopy-paused</c>): resumed from the record it left in QEMU,
    /// as its own command run again would (<see cref="PostcopyRecord"/>). Null when QEMU runs no postcopy migration.
    /// </summary>
    private static LiveRecoveryResult? ResumePostcopy(IQmpConnection qmp, CancellationToken cancellationToken)
    {
        string status = QemuBlockDevices.Str(qmp.Execute("query-migrate")?["status"]) ?? "none";
        if (!status.StartsWith("postcopy-", StringComparison.Ordinal)) return null;
        if (PostcopyRecord.Read(qmp) is not { } record)
        {
            string state = QemuBlockDevices.Str(qmp.Execute("query-status")?["status"]) ?? "unknown";
            return new LiveRecoveryResult(false, null, null, "none", "none", false, [], [], [], state,
                $"QEMU's incoming migration is '{status}', a postcopy migration no vmsnap began (QEMU holds no vmsnap record of it): its own source must resume it (migrate-recover)");
        }
        LiveLoadResult r = new LiveLoad(qmp, record.Tag, new LiveLoadOptions { Postcopy = true }, null, cancellationToken).Run();
        LivePostcopyResult pc = r.Postcopy!;
        return new LiveRecoveryResult(true, record.Tag, record.ProcessId, "postcopy", "kept", true, [], [],
            [$"resumed it from {record.Image}: {pc.PagesAlreadyThere} pages were in QEMU already, {pc.PagesOnDemand + pc.PagesStreamed} sent (no drive reverted again)"], r.RunState,
            $"a vmsnap loadvm --postcopy of '{record.Tag}' (process {record.ProcessId}) was cut off; QEMU's guest waited in {status} for its missing pages");
    }

    private LiveRecoveryResult Run()
    {
        if (_record.OwnerRuns)
            throw new OperationRefusedException($"a vmsnap save of '{Tag}' (process {_record.ProcessId}, begun {_record.Started.ToLocalTime():HH:mm:ss}) is under way on this QEMU; " +
                "wait for it to end (stopped with Ctrl-C or SIGTERM, it undoes its changes itself); nothing was done");
        string migration = WaitForMigrationEnd();
        string state = RunState();
        IReadOnlyList<LiveDisk> disks = QemuBlockDevices.Query(Qmp);

        string snapshot = "none";
        bool released = state == "postmigrate" && RepairReleasedImages(out snapshot);
        if (!released)
        {
            int tagged = _record.Drives.Count(d => HasTag(d.Image));
            snapshot = tagged == _record.Drives.Count ? "kept" : tagged > 0 ? "partial" : "none";
            if (snapshot == "partial")
                _actions.Add($"left snapshot '{Tag}', which is on some drives only: QEMU holds the images again; QEMU's HMP 'delvm {Tag}' deletes it");
            GiveBackHeldRegion(disks);
        }
        bool complete = snapshot == "kept";   // complete before the recovery
        // From what QEMU says: its last migration failed (the channel closed under it) or completed (it released the images).
        string stage = !_record.Migrating ? "preparing"
            : migration is "failed" or "cancelled" ? "migrating"
            : migration != "completed" ? "preparing"
            : !complete ? "stopped"
            : state == "postmigrate" ? "committed"
            : "resumed";

        bool resumed = ResumeGuest(state);
        (List<string> restored, List<string> kept) = ([], []);
        try
        {
            (restored, kept) = MigrationSettings.FromJson(Qmp, _record.Settings).RestoreAfterKill();
            if (restored.Count > 0) _actions.Add($"put back QEMU's migration settings {string.Join(", ", restored)}");
            if (kept.Count > 0) _actions.Add($"left {string.Join(", ", kept)} as someone set {(kept.Count == 1 ? "it" : "them")} after the save");
        }
        catch (QmpException e)
        {
            _problems.Add($"could not put back QEMU's migration settings: {e.Message}");
        }
        CloseFd(ChannelName);
        if (_problems.Count == 0) SaveRecord.Delete(Qmp);

        string after = RunState();
        string description = $"a vmsnap save of '{Tag}' (process {_record.ProcessId}{(_record.Live ? ", --live" : "")}) was cut short " + stage switch
        {
            "migrating" => "while QEMU sent the VM state (QEMU's migration failed when the channel closed)",
            "stopped" => "after QEMU had sent the whole VM state and released the images, before the snapshot was complete",
            "committed" => "after the snapshot was complete, before the guest was resumed",
            "resumed" => "after the snapshot was complete and the guest resumed, before the migration settings were put back",
            _ => "before QEMU began sending the VM state",
        };
        var result = new LiveRecoveryResult(true, Tag, _record.ProcessId, stage, snapshot, resumed, restored, kept, _actions.ToArray(), after, description);
        if (_problems.Count > 0)
            throw LiveSnapshotException.RecoveryIncomplete($"{description}; {(_actions.Count > 0 ? string.Join("; ", _actions) + "; but " : "")}{string.Join("; ", _problems)}",
                guestRunning: after == "running");
        return result;
    }

    /// <summary>
    /// Waits until no migration is under way: the killed save's own fails as soon as QEMU writes into the closed
    /// channel. Returns the last migration's status; refuses when another migration keeps going.
    /// </summary>
    private string WaitForMigrationEnd()
    {
        string status = "none";
        bool ended = WaitUntil(() =>
        {
            status = MigrationStatus().Status;
            return status is not ("setup" or "active" or "pre-switchover" or "device" or "cancelling" or "wait-unplug" or "postcopy-active" or "postcopy-paused" or "postcopy-recover");
        }, MigrationEndTimeout);
        if (!ended)
            throw new OperationRefusedException($"QEMU is migrating (status '{status}') although the vmsnap save of '{Tag}' that began on it (process {_record.ProcessId}) " +
                "is gone: that is not vmsnap's migration; recover once it has ended; nothing was done");
        return status;
    }

    /// <summary>True when the image's snapshot table lists the save's snapshot (read shared: QEMU may hold the image).</summary>
    private bool HasTag(string image)
    {
        try
        {
            using Qcow2Image img = Qcow2Image.Open(image, new Qcow2OpenOptions { ForceShare = true });
            return img.Snapshots.Any(s => s.Name == Tag);
        }
        catch (Exception e) when (e is VmsnapException or IOException)
        {
            return false;
        }
    }

    /// <summary>
    /// With QEMU in postmigrate: opens every drive's image for writing (false when one is still held: QEMU did not
    /// release it), frees leaked clusters, keeps, finishes or undoes the snapshot, and trims the VM-state image.
    /// </summary>
    private bool RepairReleasedImages(out string snapshot)
    {
        snapshot = "none";
        var images = new List<(RecordedDrive Drive, Qcow2Image Image)>();
        try
        {
            foreach (RecordedDrive drive in _record.Drives)
            {
                try
                {
                    images.Add((drive, Qcow2Image.Open(drive.Image, new Qcow2OpenOptions())));
                }
                catch (ImageInUseException)
                {
                    return false;
                }
            }
            foreach ((RecordedDrive drive, Qcow2Image image) in images)
            {
                Qcow2CheckResult check = image.Check(Qcow2RepairMode.Leaks);
                if (check.LeaksFixed > 0) _actions.Add($"freed {check.LeaksFixed} leaked cluster(s) of drive '{drive.Label}' (a snapshot creation cut short)");
                if (check.Corruptions > 0 || check.CheckErrors > 0 || check.Failure is not null)
                    _problems.Add($"drive '{drive.Label}' ({drive.Image}): its check finds {check.Corruptions} corruption(s) and {check.CheckErrors} error(s){(check.Failure is null ? "" : ": " + check.Failure)}");
            }
            snapshot = SettleSnapshot(images);
            RecordedDrive vmDrive = _record.VmStateDrive;
            Qcow2Image vmImage = images.First(i => i.Drive == vmDrive).Image;
            long before = new FileInfo(vmDrive.Image).Length;
            DetachedVmStateArea.Discard(vmImage);
            long after = new FileInfo(vmDrive.Image).Length;
            if (after < before) _actions.Add($"gave back {before - after} bytes of unsaved VM state at the end of '{vmDrive.Image}'");
            return true;
        }
        catch (Exception e) when (e is VmsnapException or IOException)
        {
            _problems.Add($"repairing the images failed: {e.Message}");
            return true;
        }
        finally
        {
            foreach ((_, Qcow2Image image) in images)
            {
                try { image.Dispose(); }
                catch (VmsnapException) { }
                catch (IOException) { }
            }
        }
    }

    /// <summary>
    /// The snapshot all or nothing: kept when on every drive; finished on the drives that lack it when the VM-state
    /// drive has it (QEMU has not written the disks since the guest's stop, so they are the state the snapshot
    /// captures); else deleted from the drives that have it.
    /// </summary>
    private string SettleSnapshot(List<(RecordedDrive Drive, Qcow2Image Image)> images)
    {
        var tagged = images.Select(i => (i.Drive, i.Image, Snapshot: i.Image.Snapshots.FirstOrDefault(s => s.Name == Tag))).ToList();
        var have = tagged.Where(t => t.Snapshot is not null).ToList();
        var lack = tagged.Where(t => t.Snapshot is null).ToList();
        if (lack.Count == 0)
        {
            _actions.Add($"kept snapshot '{Tag}': it was complete on every drive");
            return "kept";
        }
        if (have.Count == 0) return "none";
        string haveNames = string.Join(", ", have.Select(t => t.Drive.Label));
        if (have.FirstOrDefault(t => t.Drive.VmState).Snapshot is { } withState)
        {
            foreach ((RecordedDrive drive, Qcow2Image image, _) in lack)
                image.CreateSnapshot(Tag, new Qcow2SnapshotCreateOptions { VmStateSize = 0, VmClock = withState.VmClock, Date = withState.Date, Icount = withState.Icount });
            _actions.Add($"finished snapshot '{Tag}': it was on drive(s) {haveNames} (with the VM state), now also on {string.Join(", ", lack.Select(t => t.Drive.Label))}");
            return "finished";
        }
        foreach ((_, Qcow2Image image, Qcow2Snapshot? s) in have) image.DeleteSnapshot(s!.Id);
        _actions.Add($"undid snapshot '{Tag}': it was on drive(s) {haveNames} only, without the VM state; deleted there");
        return "undone";
    }

    /// <summary>
    /// With QEMU holding the VM-state image again: cuts off the unsaved VM state past both QEMU's highest write (plus
    /// the guard) and what the image uses, as a failed save does; never into the region's start when QEMU came near it.
    /// </summary>
    private void GiveBackHeldRegion(IReadOnlyList<LiveDisk> disks)
    {
        RecordedDrive vm = _record.VmStateDrive;
        LiveDisk? disk = disks.FirstOrDefault(d => d.Kind == LiveDiskKind.Qcow2 && d.ImagePath == vm.Image);
        try
        {
            long length = new FileInfo(vm.Image).Length;
            if (disk is null || length <= _record.FileLengthBefore) return;
            long used;
            using (Qcow2Image image = Qcow2Image.Open(vm.Image, new Qcow2OpenOptions { ForceShare = true })) used = image.UsedEnd();
            long reach = Math.Max(used, QemuBlockDevices.HighestWrite(Qmp, disk)) + _record.Region.Guard;
            long keep = Math.Max(_record.FileLengthBefore, (reach + (1L << 20) - 1) & ~((1L << 20) - 1));
            if (keep >= _record.Region.Offset || length <= keep) return;
            using (DetachedVmStateArea region = DetachedVmStateArea.Open(vm.Image, _record.Region, direct: false)) region.GiveBack(keep);
            _actions.Add($"gave back {length - keep} bytes of unsaved VM state at the end of '{vm.Image}'");
        }
        catch (Exception e) when (e is VmsnapException or IOException)
        {
            // The space stays (qemu-img check sees only a longer file; the next save writes there again).
            _actions.Add($"left the unsaved VM state at the end of '{vm.Image}' ({e.Message})");
        }
    }

    /// <summary>Puts the guest back as it was before the save; true when it was resumed.</summary>
    private bool ResumeGuest(string state)
    {
        try
        {
            if (_record.WasRunning && state is "paused" or "postmigrate")
            {
                Qmp.Execute("cont");
                _actions.Add(state == "postmigrate" ? "resumed the guest (cont; QEMU took its images back)" : "resumed the guest (cont)");
                return true;
            }
            if (!_record.WasRunning && state == "postmigrate")
            {
                if (Qmp.IsAtLeast(10, 0))
                {
                    Qmp.Execute("blockdev-set-active", new JsonObject { ["active"] = true });
                    _actions.Add("QEMU took the images back (blockdev-set-active); the guest stays paused, as before the save");
                }
                else
                {
                    _actions.Add("the guest was paused before the save and stays paused; QEMU 7.2 takes its images back with the next 'cont'");
                }
            }
            return false;
        }
        catch (QmpException e)
        {
            _problems.Add($"could not resume the guest: {e.Message}");
            return false;
        }
    }

}
