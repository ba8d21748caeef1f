using System.Diagnostics;
using System.Net.Sockets;
using System.Text.Json.Nodes;
using Vmsnap.Live.Qmp;
using Vmsnap.Migration;
using Vmsnap.Migration.LowLevel;
using Vmsnap.Qcow2;
using Vmsnap.Qcow2.LowLevel;
using Vmsnap.Storage;
using Vmsnap.Storage.LowLevel;
using Vmsnap.VmState;
using Vmsnap.VmState.LowLevel;

namespace Vmsnap.Live;

/// <summary>
/// <c>loadvm --postcopy</c>: vmsnap is the source of a postcopy migration. The device state goes first and QEMU runs the
/// guest at once; every page follows, those the guest touches first (QEMU asks for them on the return path).
/// </summary>
internal sealed partial class LiveLoad
{
    private const string PostcopyCapability = "postcopy-ram";

    /// <summary>Socket send buffer during postcopy: small, so a requested page waits little behind streamed ones.</summary>
    private const int PostcopySendBufferBytes = 256 << 10;

    /// <summary>What a postcopy load found before changing anything: the snapshot's index, and whether the capability was off.</summary>
    private sealed record PostcopyPlan(PostcopyIndex Index, MigrationStreamInfo Info, double ScanSeconds, bool CapabilityWasOff, string? IndexProblem = null, bool Recorded = false);

    /// <summary>
    /// Everything checked before a drive is reverted: QEMU's RAM can be served by postcopy, the snapshot's stream can be
    /// (one scan for where its pages and device state lie); then the destination's <c>postcopy-ram</c> is set, which QEMU
    /// itself refuses without userfaultfd or with RAM it cannot serve. On a refusal nothing was changed.
    /// </summary>
    private PostcopyPlan PreparePostcopy(LiveDisk vmDisk, Qcow2Snapshot snapshot)
    {
        CheckPostcopyMemory();
        Dictionary<string, bool> capabilities = MigrationSettings.Capabilities(Qmp);
        foreach (string conflicting in new[] { "x-ignore-shared", "mapped-ram" })
        {
            if (capabilities.GetValueOrDefault(conflicting))
                throw new OperationRefusedException($"QEMU has migration capability '{conflicting}' set, which postcopy cannot be combined with; nothing was loaded");
        }

        var clock = Stopwatch.StartNew();
        PostcopyIndex index = IndexSnapshot(vmDisk.ImagePath!, snapshot, out bool recorded, out string? indexProblem);
        double scanSeconds = clock.Elapsed.TotalSeconds;

        bool wasOff = !capabilities.GetValueOrDefault(PostcopyCapability);
        if (wasOff)
        {
            try
            {
                SetPostcopyCapability(true);
            }
            catch (QmpException e)
            {
                throw new OperationRefusedException($"QEMU refuses postcopy: {e.Message}; load without --postcopy; nothing was loaded", e);
            }
        }
        return new PostcopyPlan(index, index.Info, scanSeconds, wasOff, indexProblem, recorded);
    }

    /// <summary>
    /// Where the snapshot's pages and device state lie: the index recorded at save time when it checks out
    /// (<paramref name="recorded"/>), else one scan of its VM state (<paramref name="indexProblem"/> says why a recorded one was
    /// not used); refused when postcopy cannot serve it.
    /// </summary>
    private PostcopyIndex IndexSnapshot(string imagePath, Qcow2Snapshot snapshot, out bool recorded, out string? indexProblem) =>
        IndexForPostcopy(imagePath, snapshot, Tag, Cancellation, out recorded, out indexProblem);

    /// <summary>
    /// <see cref="IndexSnapshot"/> for any caller (loadvm --domain --postcopy too): snapshot <paramref name="tag"/> of
    /// <paramref name="imagePath"/>, recorded index or one scan; refused when postcopy cannot serve it.
    /// </summary>
    internal static PostcopyIndex IndexForPostcopy(string imagePath, Qcow2Snapshot snapshot, string tag, CancellationToken cancellation, out bool recorded, out string? indexProblem)
    {
        PostcopyIndex? index = RecordedPostcopyIndex(imagePath, snapshot, out indexProblem);
        recorded = index is not null;
        if (index is null)
        using (SnapshotStream stream = OpenSnapshotStream(imagePath, snapshot, $"snapshot '{tag}' of {imagePath} is gone"))
        using (VmStateReader reader = stream.NewReader(ReadBufferSize))
        {
            try
            {
                index = PostcopySource.Scan(reader, snapshot.VmStateSize, cancellation);
            }
            catch (MigrationStreamException e)
            {
                throw new OperationRefusedException($"snapshot '{tag}' cannot be loaded: its VM state does not read ({e.Message}); nothing was loaded", e);
            }
        }
        LiveTrace.Mark("indexed");
        if (index.Problem is { } problem)
            throw new OperationRefusedException($"snapshot '{tag}' cannot be loaded with --postcopy: {problem}; load it without --postcopy; nothing was loaded");
        return index;
    }

    /// <summary>
    /// Refuses RAM postcopy cannot serve right: a memory-backend-file that is not shared (QEMU's discard before postcopy
    /// punches holes in the file itself) and huge pages (not supported yet: vmsnap serves 4 KiB pages).
    /// </summary>
    private void CheckPostcopyMemory()
    {
        if (Qmp.Execute("qom-list", new JsonObject { ["path"] = "/objects" }) is not JsonArray objects) return;
        foreach (JsonNode? entry in objects)
        {
            string? name = QemuBlockDevices.Str(entry?["name"]);
            string? type = QemuBlockDevices.Str(entry?["type"]);
            if (name is null || type is null || !type.StartsWith("child<memory-backend-", StringComparison.Ordinal)) continue;
            string path = "/objects/" + name;
            if (type == "child<memory-backend-file>")
            {
                if (QomBool(path, "share") == false)
                    throw new OperationRefusedException($"memory backend '{name}' is a file mapped without share=on: postcopy would punch holes in that file; " +
                        "use share=on (or anonymous RAM), or load without --postcopy; nothing was loaded");
                string? memPath = QemuBlockDevices.Str(QomGet(path, "mem-path"));
                string? fileSystem = memPath is null ? null : FileSystemOf(memPath);
                if (fileSystem == "hugetlbfs")
                    throw new OperationRefusedException($"not supported yet: postcopy into huge pages (memory backend '{name}' is on hugetlbfs); load without --postcopy; nothing was loaded");
                // QEMU 10.0 refuses this when postcopy-ram is set; QEMU 7.2 only once the load has begun (measured).
                if (fileSystem is not null && fileSystem != "tmpfs")
                    throw new OperationRefusedException($"memory backend '{name}' is a file on {fileSystem} ({memPath}): postcopy needs RAM that is anonymous or " +
                        "on tmpfs or hugetlbfs (QEMU's rule); load without --postcopy; nothing was loaded");
            }
            else if (type == "child<memory-backend-memfd>" && QomBool(path, "hugetlb") == true)
            {
                throw new OperationRefusedException($"not supported yet: postcopy into huge pages (memory backend '{name}' has hugetlb=on); load without --postcopy; nothing was loaded");
            }
        }
    }

    private JsonNode? QomGet(string path, string property)
    {
        try
        {
            return Qmp.Execute("qom-get", new JsonObject { ["path"] = path, ["property"] = property });
        }
        catch (QmpException)
        {
            return null;
        }
    }

    private bool? QomBool(string path, string property) => QomGet(path, property) is JsonValue v && v.TryGetValue(out bool b) ? b : null;

    /// <summary>The type of the file system holding <paramref name="path"/> (the longest mount point of /proc/mounts that contains it).</summary>
    private static string? FileSystemOf(string path)
    {
        try
        {
            string full = Path.GetFullPath(path);
            string? best = null;
            int bestLength = -1;
            foreach (string line in File.ReadLines("/proc/mounts"))
            {
                string[] f = line.Split(' ');
                if (f.Length < 3) continue;
                string mount = f[1].Replace("\\040", " ");
                bool inside = full == mount || full.StartsWith(mount.EndsWith('/') ? mount : mount + "/", StringComparison.Ordinal);
                if (inside && mount.Length > bestLength) (best, bestLength) = (f[2], mount.Length);
            }
            return best;
        }
        catch (IOException)
        {
            return null;
        }
    }

    private void SetPostcopyCapability(bool on) =>
        Qmp.Execute("migrate-set-capabilities", new JsonObject
        {
            ["capabilities"] = new JsonArray(new JsonObject { ["capability"] = PostcopyCapability, ["state"] = on }),
        });

    /// <summary>Puts <c>postcopy-ram</c> back off when the load set it (best effort: a QEMU that refuses keeps it).</summary>
    private void RestorePostcopyCapability(PostcopyPlan plan) => RestorePostcopyCapability(plan.CapabilityWasOff);

    private void RestorePostcopyCapability(bool wasOff)
    {
        if (!wasOff || Qmp.IsClosed) return;
        try
        {
            SetPostcopyCapability(false);
        }
        catch (QmpException)
        {
        }
    }

    /// <summary>Serves the snapshot as a postcopy source: device state first, then every page; returns once QEMU has them all.</summary>
    private LiveLoadResult FeedPostcopy(LiveDisk vmDisk, Qcow2Snapshot snapshot, PostcopyPlan plan, List<LiveDiskSnapshot> reverted, LiveRecoveryResult? recovery, Stopwatch clock)
    {
        try
        {
            return ServePostcopy(vmDisk, snapshot, plan, reverted, recovery, clock);
        }
        catch (Exception) when (!Qmp.IsClosed && MigrationStatusOrNone() == "none")
        {
            // Failed before QEMU's incoming migration began: QEMU still waits in inmigrate, as it was but for the drives.
            RestorePostcopyCapability(plan);
            throw;
        }
    }

    private string MigrationStatusOrNone()
    {
        try
        {
            return MigrationStatus().Status;
        }
        catch (QmpException)
        {
            return "unknown";
        }
    }

    private LiveLoadResult ServePostcopy(LiveDisk vmDisk, Qcow2Snapshot snapshot, PostcopyPlan plan, List<LiveDiskSnapshot> reverted, LiveRecoveryResult? recovery, Stopwatch clock)
    {
        var record = PostcopyRecord.ForThisProcess(Tag, vmDisk.ImagePath!, snapshot, plan.CapabilityWasOff, reverted);
        return Serve(record, plan.Index, plan.Info, plan.ScanSeconds, plan.Recorded, plan.IndexProblem, resume: false, recovery, clock);
    }

    /// <summary>
    /// The rerun of <c>loadvm --postcopy</c> on a QEMU whose postcopy load was cut off (vmsnap killed, an image read failed):
    /// QEMU's guest waits in <c>postcopy-paused</c>. Nothing of the first load is done again (no check of the drives, no
    /// revert: the guest has run on them since); the snapshot must be the one QEMU's record names, unchanged; then QEMU's
    /// postcopy recovery (<c>migrate-recover</c> on a new channel) and every page QEMU has not received.
    /// </summary>
    private LiveLoadResult ResumePostcopy(string status, LiveRecoveryResult? recovery, Stopwatch clock)
    {
        const string nothing = "nothing was changed";
        PostcopyRecord record = PostcopyRecord.Read(Qmp)
            ?? throw new OperationRefusedException($"QEMU's incoming migration is '{status}' (a postcopy load under way or cut off), but QEMU holds no vmsnap record " +
                $"of it: it was not begun by vmsnap loadvm --postcopy, so vmsnap does not know what to serve; {nothing}");
        if (record.Tag != Tag && record.SnapshotId != Tag)
            throw new OperationRefusedException($"the postcopy load on this QEMU serves snapshot '{record.Tag}' of {record.Image}, not '{Tag}': " +
                $"run the same command with '{record.Tag}' to resume it; {nothing}");
        if (record.OwnerRuns)
            throw new OperationRefusedException($"vmsnap process {record.ProcessId} still serves the postcopy load of '{record.Tag}' on this QEMU " +
                $"(QEMU's incoming migration is '{status}'); {nothing}");
        // A resume whose own channel was cut goes back to postcopy-paused by itself once QEMU sees the channel close.
        if (status != "postcopy-paused")
        {
            WaitUntil(() => Qmp.IsClosed || MigrationStatus().Status is not ("postcopy-recover" or "postcopy-recover-setup" or "postcopy-active"), TimeSpan.FromSeconds(10));
            status = MigrationStatus().Status;
        }
        if (status != "postcopy-paused")
            throw new OperationRefusedException($"QEMU's incoming migration is '{status}', not postcopy-paused: a postcopy load can be resumed only from there; {nothing}");

        Qcow2Snapshot snapshot;
        try
        {
            using Qcow2Image image = OpenSharedDirect(record.Image);
            Qcow2Snapshot? found = image.FindSnapshot(record.SnapshotId);
            snapshot = found is not null && record.Matches(found) ? found
                : throw new OperationRefusedException($"snapshot '{record.Tag}' (ID {record.SnapshotId}) of {record.Image} is {(found is null ? "gone" : "another snapshot now")}: " +
                    $"the postcopy load cut off on this QEMU served it, and its guest's missing pages cannot come from anything else; {nothing}");
        }
        catch (Exception e) when (e is VmsnapException or IOException && e is not OperationRefusedException)
        {
            throw new OperationRefusedException($"the image {record.Image} that the cut-off postcopy load served does not open ({e.Message}); " +
                $"fix that and run the same command again; {nothing}", e);
        }
        var indexClock = Stopwatch.StartNew();
        PostcopyIndex index = IndexSnapshot(record.Image, snapshot, out bool recorded, out string? indexProblem);
        return Serve(record.TakenOver(), index, index.Info, indexClock.Elapsed.TotalSeconds, recorded, indexProblem, resume: true, recovery, clock);
    }

    /// <summary>
    /// Serves the snapshot as a postcopy source: on a first load, device state first, then every page; on a resume, the
    /// recovery handshake, then every page QEMU lacks. Returns once QEMU has them all. QEMU holds <paramref name="record"/>
    /// meanwhile: a load cut off after the guest started leaves it paused, and the same command resumes it.
    /// </summary>
    private LiveLoadResult Serve(PostcopyRecord record, PostcopyIndex index, MigrationStreamInfo info, double scanSeconds, bool recorded, string? indexProblem, bool resume,
        LiveRecoveryResult? recovery, Stopwatch clock)
    {
        // Two opens: single pages read at their place (what the guest asks for), and the whole stream read in order.
        using Qcow2Image pages = Qcow2Image.Open(record.Image, new Qcow2OpenOptions { ForceShare = true });
        Qcow2Snapshot current = pages.FindSnapshot(record.SnapshotId) ?? throw new SnapshotNotFoundException(Tag, record.Image, $"snapshot '{Tag}' of {record.Image} is gone");
        using Qcow2VmStateArea pageArea = pages.OpenVmStateAreaForReading(current);
        using SnapshotStream stream = OpenSnapshotStream(record.Image, current, $"snapshot '{Tag}' of {record.Image} is gone", area => new ServedReads(area));

        LiveTrace.Mark("images opened");
        (Socket socket, string uri, string fdName) = OpenChannel();
        using var _ = socket;
        LiveTrace.Mark("channel passed");
        socket.SendBufferSize = PostcopySendBufferBytes;
        long mark = Qmp.EventMark;
        DateTimeOffset started = DateTimeOffset.Now - clock.Elapsed;
        try
        {
            if (resume)
            {
                record.Update(Qmp);
                Qmp.Execute("migrate-recover", new JsonObject { ["uri"] = uri });
            }
            else
            {
                record.Write(Qmp);
                LiveTrace.Mark("record written");
                Qmp.Execute("migrate-incoming", new JsonObject { ["uri"] = uri });
                LiveTrace.Mark("incoming");
            }
        }
        catch (QmpException e)
        {
            CloseFd(fdName);
            if (resume)
                throw new LiveSnapshotException($"QEMU refused to resume the postcopy load (migrate-recover): {e.Message}; the guest still waits in postcopy-paused", e);
            PostcopyRecord.Delete(Qmp);
            throw new QmpException($"QEMU refused the incoming migration: {e.Message} (start QEMU with -incoming defer for vmsnap loadvm); " +
                "the drives were reverted to the snapshot", e.ErrorClass, e);
        }

        PostcopySource? served = null;
        var source = new PostcopySource(index, new ServedReads(pageArea), socket, new PagesAsBytes(_progress, () => served?.GuestStartConfirmed == true))
        {
            GuestStarted = () => LiveTrace.Mark("guest started"),
        };
        served = source;
        PostcopySourceResult sent;
        double lastPageAt;
        try
        {
            // From here the guest runs on the pages this process serves: a cancellation would leave it paused, so the pages go out whole.
            _options.ServingPages?.Invoke(true);
            if (resume)
            {
                source.Resume(_options.LoadTimeout);
                LiveTrace.Mark("resumed");
            }
            else
            {
                source.SendDeviceState();
                LiveTrace.Mark("device state sent");
            }
            // The stream's reader starts its read-ahead (tens of MiB) when made: made once the device state is out, so that QEMU loading it
            // does not wait for those reads.
            using (VmStateReader reader = stream.NewReader(ReadBufferSize))
                sent = source.SendPages(reader, current.VmStateSize);
            lastPageAt = clock.Elapsed.TotalSeconds;
            _options.ServingPages?.Invoke(false);
            LiveTrace.Mark("last page sent");
        }
        catch (Exception e) when (e is VmsnapException or IOException or SocketException)
        {
            socket.Dispose();   // QEMU sees the channel close: a started guest pauses in postcopy-paused, fed nothing more
            if (Qmp.IsClosed)
                throw new LiveSnapshotException(QemuGone("during the postcopy load: QEMU refused the stream (see its error output)") + "; the drives were reverted to the snapshot", e);
            string why = source.ReturnPathProblem is { } p ? $" ({p})" : "";
            throw new LiveSnapshotException($"serving snapshot '{record.Tag}' to QEMU failed: {e.Message}{why}; the guest waits in postcopy-paused for its missing pages: " +
                $"run the same command again (vmsnap loadvm --qmp {Qmp.Path} {record.Tag} --postcopy) to resume it", e);
        }
        string? shut = source.WaitForShut(_options.LoadTimeout);
        string after = WaitLoaded();
        if (shut is not null && !Qmp.IsClosed && MigrationStatus().Status != "completed")
            throw new LiveSnapshotException($"QEMU did not confirm the postcopy load: {shut}");
        RestorePostcopyCapability(record.CapabilityWasOff);
        PostcopyRecord.Delete(Qmp);
        LiveTrace.Mark("loaded");

        QmpEvent? resumeEvent = resume ? null : Qmp.EventsSince(mark).FirstOrDefault(e => e.Name == "RESUME");
        double? toResume = resumeEvent is null ? null : (resumeEvent.Timestamp - started).TotalSeconds;
        double seconds = clock.Elapsed.TotalSeconds;
        var postcopy = new LivePostcopyResult(toResume, lastPageAt, sent.PagesOnDemand, sent.PagesStreamed, scanSeconds,
            recorded ? "recorded" : "scanned", indexProblem)
        {
            Resumed = resume, PagesAlreadyThere = sent.PagesAlreadyThere,
        };
        return new LiveLoadResult(Tag, record.Drives, current.VmStateSize, info.RamBytes, seconds, after, info) { Recovery = recovery, Postcopy = postcopy };
    }

    /// <summary>
    /// Reports pages as bytes of RAM, for a progress that counts bytes; marks each report once the guest has started (a test's
    /// kill hook stops there, with pages left and QEMU able to pause).
    /// </summary>
    internal sealed class PagesAsBytes(IProgress<long>? bytes, Func<bool> guestStarted) : IProgress<long>
    {
        public void Report(long value)
        {
            if (guestStarted()) LiveTrace.Mark("pages sent");
            bytes?.Report(value * PostcopySource.PageBytes);
        }
    }

    /// <summary>The snapshot's reads while pages are served, through the test seam <see cref="LiveTrace.BeforeServedRead"/> (which may throw).</summary>
    internal sealed class ServedReads(IBlockDevice inner) : IBlockDevice
    {
        public long Length => inner.Length;

        public bool IsReadOnly => inner.IsReadOnly;

        public int Alignment => inner.Alignment;

        public int Read(Span<byte> buffer, long offset)
        {
            LiveTrace.BeforeServedRead?.Invoke();
            return inner.Read(buffer, offset);
        }

        public ValueTask<int> ReadAsync(Memory<byte> buffer, long offset, CancellationToken cancellationToken = default)
        {
            LiveTrace.BeforeServedRead?.Invoke();
            return inner.ReadAsync(buffer, offset, cancellationToken);
        }

        public void Write(ReadOnlySpan<byte> buffer, long offset) => inner.Write(buffer, offset);

        public ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, long offset, CancellationToken cancellationToken = default) => inner.WriteAsync(buffer, offset, cancellationToken);

        public void Flush() => inner.Flush();

        public void SetLength(long length) => inner.SetLength(length);

        public void Discard(long offset, long length) => inner.Discard(offset, length);

        public void Dispose()
        {
            // The reads' owner disposes the device.
        }
    }
}
