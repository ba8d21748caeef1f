using System.Diagnostics;
using System.Globalization;
using System.Net.Sockets;
using System.Text.Json.Nodes;
using Vmsnap.Live.Qmp;
using Vmsnap.Migration;
using Vmsnap.Migration.LowLevel;
using Vmsnap.Qcow2;
using Vmsnap.VmState;
using Vmsnap.VmState.LowLevel;
using Vmsnap.Qcow2.LowLevel;

namespace Vmsnap.Live;

/// <summary>
/// One live save (QEMU's savevm for a running QEMU). The order of things:
/// <list type="number">
/// <item>Refuse up front what QEMU's savevm refuses (a writable drive that cannot take a snapshot, no
/// writable qcow2 drive, a taken name) and what vmsnap cannot do; read each image's snapshot table
/// (shared, read-only) to compare it with later.</item>
/// <item>Plan the detached VM-state area of the drive that keeps the VM state (<see cref="DetachedVmStateArea"/>),
/// unthrottle QEMU's migration (<see cref="MigrationSettings"/>), stop the guest unless live.</item>
/// <item>Migrate into a socket pair vmsnap owns; copy the stream, checked record by record, through
/// the buffered writer into the region, while a watch polls QEMU's highest write to the image.</item>
/// <item>Once the migration completed QEMU has released its images: open them for writing (QEMU's
/// locking says whether it really did), check the region, link it as the VM-state area and create
/// the snapshot on every drive; any failure removes what was created.</item>
/// <item>Close the images, resume the guest if it ran, restore the migration settings.</item>
/// </list>
/// </summary>
internal sealed class LiveSave : LiveSession
{
    private const int ReadBufferSize = 1 << 20;
    private static readonly TimeSpan WatchInterval = TimeSpan.FromMilliseconds(100);

    private readonly LiveSaveOptions _options;
    private readonly IProgress<long>? _progress;

    // What went wrong while the stream was copied, as the watch saw it.
    private volatile string? _watchFailure;
    private volatile bool _regionThreatened;
    private readonly PostcopyIndexRecorder _index = new();
    private byte[] _indexPointer = [];
    private long _areaBytes;

    internal LiveSave(IQmpConnection qmp, string tag, LiveSaveOptions options, IProgress<long>? progress, CancellationToken cancellationToken)
        : base(qmp, tag, cancellationToken)
    {
        _options = options;
        _progress = progress;
    }

    /// <summary>A drive's image as it was before the save: its snapshot table, to see it unchanged at the end.</summary>
    private sealed record ImageBefore(LiveDisk Disk, long VirtualSize, string Snapshots);

    internal LiveSaveResult Run()
    {
        var clock = Stopwatch.StartNew();
        // What an earlier, killed save left is undone first (its record is in QEMU): its settings, a stopped guest, its images.
        LiveRecoveryResult? recovery = LiveRecovery.IfNeeded(Qmp, Cancellation);
        if (recovery is not null) _options.Recovered?.Invoke(recovery);
        LiveTrace.Mark("recovery checked");
        string state = RunState();
        if (state is "inmigrate" or "postmigrate" or "finish-migrate" or "colo" or "save-vm" or "restore-vm")
            throw new OperationRefusedException(state switch
            {
                "inmigrate" => "QEMU is waiting for an incoming migration (started with -incoming): there is no guest to save yet; nothing was saved",
                "postmigrate" => "QEMU finished a migration and has released its images (run state postmigrate): 'cont' it first; nothing was saved",
                _ => $"QEMU is in run state '{state}', in which it cannot save; nothing was saved",
            });
        if (state is "shutdown" or "internal-error" or "guest-panicked" or "io-error")
            throw new OperationRefusedException($"the guest is in run state '{state}'; nothing was saved");
        bool wasRunning = state == "running";
        (string migration, _, _) = MigrationStatus();
        if (migration is "setup" or "active" or "pre-switchover" or "device" or "cancelling" or "wait-unplug" or "postcopy-active" or "postcopy-paused")
            throw new OperationRefusedException($"QEMU is already migrating (status '{migration}'); nothing was saved");

        (List<LiveDisk> disks, LiveDisk vmDisk) = SelectDisks(_options.VmStateDisk, "saved");
        LiveTrace.Mark("drives found");
        var before = new List<ImageBefore>();
        DetachedVmStateSurvey survey = null!;
        foreach (LiveDisk disk in disks)
        {
            using Qcow2Image image = OpenShared(disk);
            if (image.FindSnapshot(Tag) is { } taken)
                throw new SnapshotExistsException(Tag, taken.Id, disk.ImagePath!, taken.Name == Tag
                    ? $"drive '{disk.Label}' ({disk.ImagePath}) already has a snapshot named '{Tag}' (ID {taken.Id}); delete it first or choose another name; nothing was saved"
                    : $"drive '{disk.Label}' ({disk.ImagePath}) has a snapshot with ID '{Tag}' (named '{taken.Name}'); a name equal to another snapshot's ID would make lookups ambiguous; nothing was saved");
            // The engine refuses to write images with persistent dirty bitmaps (it would not keep them right), and
            // QEMU stores its bitmaps into the image when it releases it: refuse now rather than after the migration.
            if (image.HasPersistentBitmaps || disk.DirtyBitmaps.Any(b => b.Persistent))
                throw new OperationRefusedException($"drive '{disk.Label}' ({disk.ImagePath}) has persistent dirty bitmaps, which vmsnap does not keep up to date; " +
                    "remove them (block-dirty-bitmap-remove) or use QEMU's savevm; nothing was saved");
            before.Add(new ImageBefore(disk, image.VirtualSize, DescribeSnapshots(image)));
            if (disk == vmDisk) survey = DetachedVmStateArea.Survey(image);
        }
        Qcow2ImageInfo vmInfo = survey.Image;
        long highest = QemuBlockDevices.HighestWrite(Qmp, vmDisk);
        DetachedVmStatePlan plan = DetachedVmStatePlan.For(survey, highest, vmDisk.DirtyBitmaps.Select(b => (b.Granularity, b.Persistent)));
        long fileLengthBefore = new FileInfo(vmDisk.ImagePath!).Length;
        LiveTrace.Mark("images checked");

        long stopMark = Qmp.EventMark;
        MigrationSettings? settings = null;
        bool recorded = false;
        DetachedVmStateArea? region = null;
        bool completed = false, committed = false;
        string? cleanupNote = null;
        Exception? failure = null;
        Commit? commit = null;
        MigrationStreamInfo? info = null;
        long vmStateBytes = 0, vmClock = 0;
        double? qemuDowntime = null;
        try
        {
            // The rehearsal warms the JIT; the native executable has none to warm, and would only pay for the scratch image.
            if (_options.Live && System.Runtime.CompilerServices.RuntimeFeature.IsDynamicCodeCompiled) Rehearse(vmInfo);
            // The record first, so that a kill from here on leaves in QEMU what the next vmsnap command needs to undo it.
            settings = MigrationSettings.Plan(Qmp, _options.Live);
            SaveRecord record = SaveRecord.ForThisProcess(Tag, _options.Live, wasRunning, disks.Select(d => new RecordedDrive(d.Label, d.ImagePath!, d == vmDisk)).ToList(),
                plan, fileLengthBefore, settings);
            record.Write(Qmp);
            recorded = true;
            LiveTrace.Mark("record written");
            settings.Apply();
            LiveTrace.Mark("settings applied");
            region = DetachedVmStateArea.Open(vmDisk.ImagePath!, plan, _options.Direct);
            if (!_options.Live && wasRunning)
            {
                Qmp.Execute("stop");
                LiveTrace.Mark("guest stopped");
            }
            record.MarkMigrating(Qmp);
            // Stopped by vmsnap, not by its user: the snapshot says "running", as QEMU's savevm writes it.
            (info, vmStateBytes, qemuDowntime, vmClock) = Transfer(region, vmDisk, plan, markRunning: !_options.Live && wasRunning);
            completed = true;
            LiveTrace.Mark("migration completed");
            RecordPostcopyIndex(region, vmStateBytes, vmInfo.ClusterSize);
            region.Finish(_areaBytes, vmInfo.ClusterSize);
            LiveTrace.Mark("region finished");
            commit = CommitSnapshots(disks, vmDisk, before, plan, vmClock, vmStateBytes, stopMark);
            committed = true;
            LiveTrace.Mark("snapshots committed");
        }
        catch (Exception e)
        {
            failure = e;
        }
        finally
        {
            if (!committed && region is not null)
                cleanupNote = GiveBack(region, vmDisk, plan, fileLengthBefore, completed);
            region?.Dispose();
        }

        // The guest back in the run state it had, the settings as they were.
        string? resumeProblem = null;
        long resumeMark = Qmp.EventMark;
        if (!Qmp.IsClosed) resumeProblem = Resume(wasRunning, failure is not null && !completed);
        LiveTrace.Mark("resumed");
        string? restoreProblem = Qmp.IsClosed ? null : settings?.Restore();
        LiveTrace.Mark("settings restored");
        // Kept while the guest could not be resumed or the settings not restored: vmsnap recover (or the next save) does it later.
        if (recorded && !Qmp.IsClosed && resumeProblem is null && restoreProblem is null) restoreProblem = Forget();
        // The connection lost with QEMU running on (libvirtd killed): the record stays there for a recovery once it is back.
        if (recorded && Qmp.ClosedWithQemuRunning)
            restoreProblem = "the guest's run state and QEMU's migration settings could not be put back, nor the save's record removed: " + Qmp.ClosedReason;

        bool? guestRunning = Qmp.IsClosed ? null : wasRunning && resumeProblem is null;
        if (failure is not null) throw Explain(failure, guestRunning, resumeProblem, restoreProblem, cleanupNote);
        if (resumeProblem is not null)
            throw LiveSnapshotException.SaveFailed($"the snapshot '{Tag}' was saved", nothingSaved: false, guestRunning, resumeProblem: resumeProblem, restoreProblem: restoreProblem);

        double? downtime = null;
        if (wasRunning)
        {
            QmpEvent? stop = Qmp.EventsSince(stopMark).FirstOrDefault(e => e.Name == "STOP");
            QmpEvent? resume = Qmp.WaitForEvent("RESUME", resumeMark, TimeSpan.FromSeconds(5));
            if (stop is not null && resume is not null) downtime = (resume.Timestamp - stop.Timestamp).TotalSeconds;
            if (LiveTrace.On) LiveTrace.Mark($"QEMU's STOP at {stop?.Timestamp:HH:mm:ss.fff}, RESUME at {resume?.Timestamp:HH:mm:ss.fff}, its own downtime {qemuDowntime} s");
        }
        string after = Qmp.IsClosed ? "unknown" : RunState();
        var result = new LiveSaveResult(Tag, _options.Live, commit!.Disks, vmStateBytes, info!.RamBytes, clock.Elapsed.TotalSeconds,
            downtime, qemuDowntime, commit.VmClock, commit.Date, after, info) { Recovery = recovery };
        if (restoreProblem is not null)
            throw LiveSnapshotException.SaveFailed($"the snapshot '{Tag}' was saved and the guest is {after}", nothingSaved: false, guestRunning, restoreProblem: restoreProblem);
        return result;
    }

    /// <summary>Removes the save's record from QEMU; returns why it could not, or null.</summary>
    private string? Forget()
    {
        try
        {
            SaveRecord.Delete(Qmp);
            return null;
        }
        catch (QmpException e)
        {
            return $"its record in QEMU could not be removed ({e.Message})";
        }
    }

    /// <summary>
    /// Runs what the guest's stop will run, once, on a small scratch image of the same geometry, while the guest
    /// still runs: opening an image for writing, the region check, the link and the snapshot creation. The
    /// methods are then compiled (the JIT compiles a method when it first runs) and their libraries loaded, so the
    /// stopped window does only the work itself. On a contended machine the first run's compilation took longer
    /// than that work. The native vmsnap (no JIT) still gains from it: without it, the first opening of the images for
    /// writing and the first region check added some 20 ms to the median stop (bench/live-stop.sh, 2-core machine
    /// under load). Best effort: any failure here is ignored (the real commit reports its own).
    /// </summary>
    /// <summary>
    /// Writes the postcopy index past the stream in the region (built while the stream was copied: no second read), before
    /// any snapshot points there; a failure only leaves the snapshot without an index (loadvm --postcopy then scans it).
    /// </summary>
    private void RecordPostcopyIndex(DetachedVmStateArea region, long vmStateBytes, int clusterSize)
    {
        _areaBytes = vmStateBytes;
        try
        {
            if (RecordedPostcopyIndex.Record(_index, vmStateBytes, clusterSize, region.Read, region.Write) is { } recorded)
            {
                (_indexPointer, _areaBytes) = recorded;
                LiveTrace.Mark("postcopy index recorded");
            }
        }
        catch (Exception e) when (e is VmsnapException or IOException)
        {
            _indexPointer = [];
            _areaBytes = vmStateBytes;
            LiveTrace.Mark($"no postcopy index: {e.Message}");
        }
    }

    private static void Rehearse(Qcow2ImageInfo geometry)
    {
        // Named by the process (id and start time), so that the folder of a vmsnap killed while it rehearsed is swept by the next.
        const string prefix = "vmsnap-rehearsal-";
        int pid = Environment.ProcessId;
        string folder = Path.Combine(Path.GetTempPath(), $"{prefix}{pid}-{SaveRecord.StartTime(pid)}-{Guid.NewGuid().ToString("N")[..8]}");
        foreach (string old in Directory.EnumerateDirectories(Path.GetTempPath(), prefix + "*"))
        {
            string[] parts = Path.GetFileName(old)[prefix.Length..].Split('-');
            if (parts.Length != 3 || !int.TryParse(parts[0], CultureInfo.InvariantCulture, out int p) || !long.TryParse(parts[1], CultureInfo.InvariantCulture, out long start)
                || SaveRecord.StartTime(p) == start) continue;
            try { Directory.Delete(old, recursive: true); }
            catch (IOException) { }
            catch (UnauthorizedAccessException) { }
        }
        try
        {
            Directory.CreateDirectory(folder);
            string path = Path.Combine(folder, "rehearsal.qcow2");
            int cs = geometry.ClusterSize;
            using (Qcow2Image created = Qcow2Image.Create(path, 16L << 20, new Qcow2CreateOptions
            {
                ClusterSize = cs, RefcountBits = geometry.RefcountBits, ExtendedL2 = geometry.ExtendedL2,
            }))
            {
                created.Write(new byte[cs], 0);
            }
            long offset, length = 3L * cs + 17;
            using (Qcow2Image shared = Qcow2Image.Open(path, new Qcow2OpenOptions { ForceShare = true }))
                offset = (shared.UsedEnd() + (4L << 20)) / cs * cs + cs;
            using (var file = new FileStream(path, FileMode.Open, FileAccess.Write))
            {
                file.Position = offset;
                file.Write(new byte[length]);
            }
            using Qcow2Image image = Qcow2Image.Open(path, new Qcow2OpenOptions());
            if (DetachedVmStateArea.Check(image, offset, length) is not null) return;
            DetachedVmStateArea.Attach(image, offset, length);
            image.CreateSnapshot("rehearsal", new Qcow2SnapshotCreateOptions { VmStateSize = length, VmClock = 1, Date = DateTimeOffset.UtcNow, Icount = -1 });
            LiveTrace.Mark("rehearsed");
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            LiveTrace.Mark($"rehearsal failed: {e.Message}");
        }
        finally
        {
            try { Directory.Delete(folder, recursive: true); }
            catch (IOException) { }
            catch (UnauthorizedAccessException) { }
        }
    }

    private static string DescribeSnapshots(Qcow2Image image) =>
        string.Join("\n", image.Snapshots.Select(s => $"{s.Id}\t{s.Name}\t{s.L1TableOffset}\t{s.VmStateSize}\t{s.Date.UtcTicks}"));

    /// <summary>
    /// Migrates into the region: returns what the stream held, its length, QEMU's downtime figure and the guest's clock
    /// at the stop, once QEMU says the migration completed (its images are then released). <paramref name="markRunning"/>:
    /// the stream's run state is written as "running".
    /// </summary>
    private (MigrationStreamInfo Info, long Bytes, double? QemuDowntime, long VmClock) Transfer(DetachedVmStateArea region, LiveDisk vmDisk, DetachedVmStatePlan plan, bool markRunning)
    {
        (Socket socket, string uri, string fdName) = OpenChannel();
        using var _ = socket;
        socket.ReceiveTimeout = (int)Math.Min(_options.StallTimeout.TotalMilliseconds, int.MaxValue);
        try
        {
            Qmp.Execute("migrate", new JsonObject { ["uri"] = uri });
        }
        catch (QmpException e)
        {
            CloseFd(fdName);
            throw new QmpException($"QEMU refused to start the migration: {e.Message}", e.ErrorClass, e);
        }

        using var watchStop = new CancellationTokenSource();
        var watch = new Thread(() => Watch(socket, vmDisk, plan, watchStop.Token)) { IsBackground = true, Name = "vmsnap save watch" };
        watch.Start();
        MigrationStreamInfo info;
        long bytes;
        long? vmClock = null;
        try
        {
            string? tee = Environment.GetEnvironmentVariable("VMSNAP_LIVE_TEE") is { Length: > 0 } folder ? Path.Combine(folder, Tag + ".stream") : null;
            using var backend = new ChannelBackend(socket, tee);
            using var reader = new VmStateReader(backend, ReadBufferSize);
            // No sync of its own: linking the region flushes the file before any table points there.
            var writerOptions = new VmStateWriterOptions { Mode = VmStateWriteMode.Buffered, RateLimit = _options.MaxBandwidth, SyncOnClose = false };
            using var area = new DetachedAreaBackend(region);
            using var writer = new VmStateWriter(area, writerOptions);
            info = _index.CopyAsSaved(reader, writer, markRunning, out vmClock, _progress, Cancellation);
            LiveTrace.Mark("stream end");
            writer.Close();
            LiveTrace.Mark("writer closed");
            bytes = writer.BytesTransferred;
        }
        catch
        {
            watchStop.Cancel();
            watch.Join();
            StopMigration();
            throw;
        }
        watchStop.Cancel();
        watch.Join();
        if (_watchFailure is { } why) { StopMigration(); throw new LiveSnapshotException(why); }

        // QEMU sends its last byte a moment before it reports completion.
        string status = "active";
        string? error = null;
        JsonObject last = [];
        if (!WaitUntil(() =>
            {
                if (Qmp.IsClosed) return true;
                (status, error, last) = MigrationStatus();
                return status is "completed" or "failed" or "cancelled";
            }, TimeSpan.FromSeconds(60)))
        {
            StopMigration();
            throw new LiveSnapshotException($"QEMU sent the whole VM state but did not complete the migration (status '{status}')");
        }
        if (Qmp.IsClosed) throw new LiveSnapshotException(QemuGone("at the end of the migration"));
        if (status != "completed") throw new LiveSnapshotException($"QEMU's migration {status}: {error ?? "QEMU gave no reason (see its log)"}");
        double? downtime = last["downtime"] is JsonValue d && d.TryGetValue(out long ms) ? ms / 1000.0 : null;
        return (info, bytes, downtime, vmClock ?? 0);
    }

    /// <summary>
    /// Runs beside the copy: stops the save (by closing the channel, which ends the copy) when vmsnap is
    /// cancelled, when QEMU goes away, or when QEMU's writes come near the region.
    /// </summary>
    private void Watch(Socket socket, LiveDisk vmDisk, DetachedVmStatePlan plan, CancellationToken stop)
    {
        while (!stop.WaitHandle.WaitOne(WatchInterval))
        {
            if (Cancellation.IsCancellationRequested || Qmp.IsClosed)
            {
                Shut(socket);
                return;
            }
            try
            {
                long highest = QemuBlockDevices.HighestWrite(Qmp, vmDisk);
                if (highest > plan.Offset - plan.Guard)
                {
                    _regionThreatened = true;
                    _watchFailure = $"QEMU wrote up to offset {highest} of '{vmDisk.ImagePath}', within {plan.Guard >> 20} MiB of the VM state vmsnap " +
                        $"was writing at offset {plan.Offset} (QEMU's image grew by more than vmsnap's bound of {plan.Bound >> 20} MiB during the save); " +
                        "the save was stopped";
                    Shut(socket);
                    return;
                }
            }
            catch (QmpException) when (Qmp.IsClosed)
            {
                Shut(socket);
                return;
            }
            catch (QmpException e)
            {
                _watchFailure = $"watching QEMU's writes failed: {e.Message}; the save was stopped";
                Shut(socket);
                return;
            }
        }
    }

    private static void Shut(Socket socket)
    {
        try
        {
            socket.Shutdown(SocketShutdown.Both);
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
        }
    }

    /// <summary>Cancels a migration still in progress and waits until QEMU has given up on it (its images active again).</summary>
    private void StopMigration()
    {
        if (Qmp.IsClosed) return;
        try
        {
            (string status, _, _) = MigrationStatus();
            if (status is "completed" or "failed" or "cancelled" or "none") return;
            Qmp.Execute("migrate_cancel");
            WaitUntil(() => Qmp.IsClosed || MigrationStatus().Status is "completed" or "failed" or "cancelled", TimeSpan.FromSeconds(30));
        }
        catch (QmpException)
        {
            // QEMU went away, or refused: the caller reports the failure that brought us here.
        }
    }

    private sealed record Commit(IReadOnlyList<LiveDiskSnapshot> Disks, long VmClock, DateTimeOffset Date);

    /// <summary>
    /// With QEMU's images released: checks the region and the images, links the region and creates
    /// the snapshot on every drive; on failure removes every snapshot it created (and the link).
    /// </summary>
    private Commit CommitSnapshots(List<LiveDisk> disks, LiveDisk vmDisk, List<ImageBefore> before,
        DetachedVmStatePlan plan, long vmClock, long vmStateBytes, long stopMark)
    {
        var images = new List<(LiveDisk Disk, Qcow2Image Image)>();
        var created = new List<(Qcow2Image Image, string Id)>();
        bool done = false;
        try
        {
            // Opened side by side: each open reads the image's tables, and the guest is stopped meanwhile.
            var opened = new Qcow2Image?[disks.Count];
            var openFailures = new Exception?[disks.Count];
            Parallel.For(0, disks.Count, i =>
            {
                try { opened[i] = OpenWritable(disks[i], "after the migration completed"); }
                catch (Exception e) when (e is VmsnapException or IOException) { openFailures[i] = e; }
            });
            for (int i = 0; i < disks.Count; i++)
                if (opened[i] is { } image) images.Add((disks[i], image));
            if (openFailures.FirstOrDefault(f => f is not null) is { } openFailure) throw openFailure;
            LiveTrace.Mark("images opened");

            long highest = QemuBlockDevices.HighestWrite(Qmp, vmDisk);
            if (highest > plan.Offset)
                throw new OperationRefusedException($"QEMU wrote up to offset {highest} of '{vmDisk.ImagePath}', past the start of the VM state vmsnap wrote at offset {plan.Offset}");
            foreach ((LiveDisk disk, Qcow2Image image) in images)
            {
                ImageBefore was = before.First(b => b.Disk == disk);
                if (image.VirtualSize != was.VirtualSize)
                    throw new OperationRefusedException($"drive '{disk.Label}' was resized during the save ({was.VirtualSize} to {image.VirtualSize} bytes)");
                if (DescribeSnapshots(image) != was.Snapshots)
                    throw new OperationRefusedException($"the snapshots of drive '{disk.Label}' ({disk.ImagePath}) changed during the save");
            }
            Qcow2Image vmImage = images.First(i => i.Disk == vmDisk).Image;
            if (DetachedVmStateArea.Check(vmImage, plan.Offset, _areaBytes) is { } problem)
                throw new OperationRefusedException($"the VM state written into '{vmDisk.ImagePath}' at offset {plan.Offset} cannot be kept: {problem}");

            LiveTrace.Mark("region checked");
            DateTimeOffset date = Qmp.EventsSince(stopMark).FirstOrDefault(e => e.Name == "STOP")?.Timestamp ?? DateTimeOffset.UtcNow;

            // The drives are independent files: each takes its snapshot at the same time as the others (the
            // guest is stopped meanwhile). The VM-state drive links the region first.
            var snapshots = new Qcow2Snapshot?[images.Count];
            var failures = new Exception?[images.Count];
            Parallel.For(0, images.Count, new ParallelOptions { MaxDegreeOfParallelism = Math.Min(images.Count, 4) }, i =>
            {
                (LiveDisk disk, Qcow2Image image) = images[i];
                bool withState = disk == vmDisk;
                try
                {
                    if (withState) DetachedVmStateArea.Attach(image, plan.Offset, _areaBytes);
                    snapshots[i] = image.CreateSnapshot(Tag, new Qcow2SnapshotCreateOptions
                    {
                        VmStateSize = withState ? vmStateBytes : 0,
                        ExtraData = withState ? _indexPointer : ReadOnlyMemory<byte>.Empty,
                        VmClock = vmClock,
                        Date = date,
                        Icount = -1,
                    });
                }
                catch (Exception e) when (e is VmsnapException or IOException or ArgumentException)
                {
                    failures[i] = e;
                }
            });
            LiveTrace.Mark("linked and created");
            var results = new List<LiveDiskSnapshot>();
            for (int i = 0; i < images.Count; i++)
            {
                if (snapshots[i] is { } s)
                {
                    created.Add((images[i].Image, s.Id));
                    results.Add(new LiveDiskSnapshot(images[i].Disk.Label, images[i].Disk.ImagePath!, s.Id, images[i].Disk == vmDisk));
                }
            }
            if (failures.FirstOrDefault(f => f is not null) is { } first)
            {
                int at = Array.IndexOf(failures, first);
                throw new LiveSnapshotException($"creating snapshot '{Tag}' on drive '{images[at].Disk.Label}' failed: {first.Message}", first);
            }
            done = true;
            return new Commit(results, vmClock, date);
        }
        finally
        {
            if (!done)
            {
                foreach ((Qcow2Image image, string id) in created)
                {
                    try { image.DeleteSnapshot(id); }
                    catch (VmsnapException) { }
                    catch (IOException) { }
                }
                foreach ((LiveDisk disk, Qcow2Image image) in images)
                {
                    try
                    {
                        if (disk == vmDisk) DetachedVmStateArea.Discard(image);   // the attached area, if any, and the file's free tail
                    }
                    catch (VmsnapException) { }
                    catch (IOException) { }
                }
            }
            foreach ((_, Qcow2Image image) in images)
            {
                try { image.Dispose(); }
                catch (VmsnapException) { }
                catch (IOException) { }
            }
        }
    }

    /// <summary>
    /// After a failure: gives the region's space back where that is safe, and says what was done.
    /// With QEMU's images released (or QEMU gone) the engine trims the file to its last used cluster;
    /// with QEMU active again the file is cut back to just past QEMU's highest write plus the guard.
    /// </summary>
    private string? GiveBack(DetachedVmStateArea region, LiveDisk vmDisk, DetachedVmStatePlan plan, long fileLengthBefore, bool migrationCompleted)
    {
        if (region.FileLength <= fileLengthBefore && region.Written == 0) return null;
        try
        {
            bool qemuActive = !Qmp.IsClosed && !migrationCompleted && MigrationStatus().Status is not "completed";
            if (!qemuActive)
            {
                // QEMU released the image or is gone: the engine knows exactly what is used.
                using Qcow2Image image = OpenWritable(vmDisk, "to give back the space of the unsaved VM state");
                DetachedVmStateArea.Discard(image);
                return null;
            }
            if (_regionThreatened) return $"the {region.Written} bytes written at offset {plan.Offset} of '{vmDisk.ImagePath}' were left in place (QEMU's writes reached near them)";
            long highest = QemuBlockDevices.HighestWrite(Qmp, vmDisk);
            long keep = Math.Max(fileLengthBefore, (highest + plan.Guard + (1L << 20) - 1) & ~((1L << 20) - 1));
            if (keep < plan.Offset && region.FileLength > keep) region.GiveBack(keep);
            return null;
        }
        catch (Exception e) when (e is VmsnapException or IOException)
        {
            return $"the space of the unsaved VM state (from offset {plan.Offset} of '{vmDisk.ImagePath}') could not be given back ({e.Message}); qemu-img check sees no problem, only a longer file";
        }
    }

    /// <summary>Puts the guest back in the run state it had; returns why it could not, or null.</summary>
    private string? Resume(bool wasRunning, bool migrationFailed)
    {
        try
        {
            // After a failed migration QEMU restarts a guest it stopped itself; wait for it to settle.
            if (migrationFailed) WaitUntil(() => Qmp.IsClosed || MigrationStatus().Status is not ("setup" or "active" or "cancelling" or "device" or "pre-switchover"), TimeSpan.FromSeconds(30));
            if (Qmp.IsClosed) return null;
            string state = RunState();
            if (wasRunning)
            {
                if (state != "running") Qmp.Execute("cont");
                return null;
            }
            // A paused guest stays paused; QEMU 10.0 and later can take its images back without running it.
            if (state == "postmigrate" && Qmp.IsAtLeast(10, 0)) Qmp.Execute("blockdev-set-active", new JsonObject { ["active"] = true });
            return null;
        }
        catch (QmpException e)
        {
            return e.Message;
        }
    }

    /// <summary>
    /// The error to report for a failed save: what happened first, with what the cleanup could not do. Nothing was
    /// saved (the commit removes what it created when it fails). A cancel stays a cancel: an <see cref="OperationCanceledException"/>
    /// whose <see cref="Exception.InnerException"/> is the <see cref="LiveSnapshotException"/> that says what was undone.
    /// </summary>
    private Exception Explain(Exception failure, bool? guestRunning, string? resumeProblem, string? restoreProblem, string? cleanupNote)
    {
        string cause;
        bool cancelled = false;
        if (Cancellation.IsCancellationRequested && failure is OperationCanceledException or MigrationStreamException or VmStateException or IOException)
        {
            cause = "cancelled";
            cancelled = failure is OperationCanceledException;
        }
        else if (_watchFailure is { } watch)
        {
            cause = watch;
        }
        else if (Qmp.IsClosed)
        {
            cause = QemuGone("during the save") + $" ({failure.Message})";
        }
        else if (failure is MigrationStreamException or IOException && MigrationStatus() is { Status: "failed" or "cancelled" } m)
        {
            cause = m.Status == "failed"
                ? $"QEMU's migration failed: {m.Error ?? "QEMU gave no reason (see its log)"}"
                : "QEMU's migration was cancelled (migrate_cancel from another QMP client?)";
        }
        else if (failure is IOException { InnerException: SocketException { SocketErrorCode: SocketError.TimedOut } })
        {
            cause = $"QEMU sent no migration data for {_options.StallTimeout.TotalSeconds:0} s";
        }
        else
        {
            cause = failure is LiveSnapshotException live ? live.Cause : failure.Message;
        }
        var error = LiveSnapshotException.SaveFailed(cause, nothingSaved: true, guestRunning, cleanupNote, resumeProblem, restoreProblem, failure);
        return cancelled ? new OperationCanceledException(error.Message, error) : error;
    }
}
