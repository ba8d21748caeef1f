using System.Diagnostics;
using System.Net.Sockets;
using System.Text.Json.Nodes;
using Vmsnap.Live.Qmp;
using Vmsnap.Migration;
using Vmsnap.Migration.LowLevel;
using Vmsnap.Qcow2;
using Vmsnap.Qcow2.LowLevel;
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
        Dictionary<string, bool> capabilities = Capabilities();
        foreach (string conflicting in new[] { "x-ignore-shared", "mapped-ram" })
        {
            if (capabilities.GetValueOrDefault(conflicting))
                throw new OperationRefusedException($"QEMU has migration capability '{conflicting}' set, which postcopy cannot be combined with; nothing was loaded");
        }

        var clock = Stopwatch.StartNew();
        PostcopyIndex? index = RecordedPostcopyIndex(vmDisk, snapshot, out string? indexProblem);
        bool recorded = index is not null;
        if (index is null)
        using (Qcow2Image image = OpenSharedDirect(vmDisk.ImagePath!))
        using (Qcow2VmStateArea area = image.OpenVmStateAreaForReading(image.FindSnapshot(snapshot.Id) ?? snapshot))
        using (VmStateBackend source = VmStateBackend.ForBlockDevice(area, 0, snapshot.VmStateSize))
        using (var reader = new VmStateReader(source, ReadBufferSize))
        {
            try
            {
                index = PostcopySource.Scan(reader, snapshot.VmStateSize, Cancellation);
            }
            catch (MigrationStreamException e)
            {
                throw new OperationRefusedException($"snapshot '{Tag}' cannot be loaded: its VM state does not read ({e.Message}); nothing was loaded", e);
            }
        }
        double scanSeconds = clock.Elapsed.TotalSeconds;
        LiveTrace.Mark("indexed");
        if (index.Problem is { } problem)
            throw new OperationRefusedException($"snapshot '{Tag}' cannot be loaded with --postcopy: {problem}; load it without --postcopy; nothing was loaded");

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

    private Dictionary<string, bool> Capabilities()
    {
        var result = new Dictionary<string, bool>();
        if (Qmp.Execute("query-migrate-capabilities") is JsonArray list)
        {
            foreach (JsonNode? c in list)
            {
                if (QemuBlockDevices.Str(c?["capability"]) is { } name && c?["state"] is JsonValue v && v.TryGetValue(out bool on)) result[name] = on;
            }
        }
        return result;
    }

    private void SetPostcopyCapability(bool on) =>
        Qmp.Execute("migrate-set-capabilities", new JsonObject
        {
            ["capabilities"] = new JsonArray(new JsonObject { ["capability"] = PostcopyCapability, ["state"] = on }),
        });

    /// <summary>Puts <c>postcopy-ram</c> back off when the load set it (best effort: a QEMU that refuses keeps it).</summary>
    private void RestorePostcopyCapability(PostcopyPlan plan)
    {
        if (!plan.CapabilityWasOff || Qmp.IsClosed) return;
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
        // Two opens: single pages read at their place (what the guest asks for), and the whole stream read in order.
        using Qcow2Image pages = OpenShared(vmDisk);
        Qcow2Snapshot current = pages.FindSnapshot(snapshot.Id) ?? throw new SnapshotNotFoundException(Tag, vmDisk.ImagePath!, $"snapshot '{Tag}' of drive '{vmDisk.Label}' is gone");
        using Qcow2VmStateArea pageArea = pages.OpenVmStateAreaForReading(current);
        using Qcow2Image image = OpenSharedDirect(vmDisk.ImagePath!);
        using Qcow2VmStateArea area = image.OpenVmStateAreaForReading(image.FindSnapshot(snapshot.Id) ?? current);
        using VmStateBackend backend = VmStateBackend.ForBlockDevice(area, 0, current.VmStateSize);
        using var reader = new VmStateReader(backend, ReadBufferSize);

        (Socket socket, string uri, string fdName) = OpenChannel();
        using var _ = socket;
        socket.SendBufferSize = PostcopySendBufferBytes;
        long mark = Qmp.EventMark;
        DateTimeOffset started = DateTimeOffset.Now - clock.Elapsed;
        try
        {
            Qmp.Execute("migrate-incoming", new JsonObject { ["uri"] = uri });
        }
        catch (QmpException e)
        {
            CloseFd(fdName);
            throw new QmpException($"QEMU refused the incoming migration: {e.Message} (start QEMU with -incoming defer for vmsnap loadvm); " +
                "the drives were reverted to the snapshot", e.ErrorClass, e);
        }

        var source = new PostcopySource(plan.Index, pageArea, socket, _progress is null ? null : new PagesAsBytes(_progress));
        PostcopySourceResult sent;
        double lastPageAt;
        try
        {
            // From here the guest runs on the pages this process serves: a cancellation would leave it paused, so the pages go out whole.
            _options.ServingPages?.Invoke(true);
            source.SendDeviceState();
            LiveTrace.Mark("device state sent");
            sent = source.SendPages(reader, current.VmStateSize);
            lastPageAt = clock.Elapsed.TotalSeconds;
            _options.ServingPages?.Invoke(false);
            LiveTrace.Mark("last page sent");
        }
        catch (Exception e) when (e is VmsnapException or IOException or SocketException)
        {
            if (Qmp.IsClosed)
                throw new LiveSnapshotException(QemuGone("during the postcopy load: QEMU refused the stream (see its error output)") + "; the drives were reverted to the snapshot", e);
            string why = source.ReturnPathProblem is { } p ? $" ({p})" : "";
            throw new LiveSnapshotException($"serving the snapshot's pages to QEMU failed: {e.Message}{why}; the guest waits in postcopy-paused for the missing pages " +
                "(not supported yet: resuming it; see QEMU's migrate-recover)", e);
        }
        string? shut = source.WaitForShut(_options.LoadTimeout);
        string after = WaitLoaded();
        if (shut is not null && !Qmp.IsClosed && MigrationStatus().Status != "completed")
            throw new LiveSnapshotException($"QEMU did not confirm the postcopy load: {shut}");
        RestorePostcopyCapability(plan);
        LiveTrace.Mark("loaded");

        QmpEvent? resume = Qmp.EventsSince(mark).FirstOrDefault(e => e.Name == "RESUME");
        double? toResume = resume is null ? null : (resume.Timestamp - started).TotalSeconds;
        double seconds = clock.Elapsed.TotalSeconds;
        var postcopy = new LivePostcopyResult(toResume, lastPageAt, sent.PagesOnDemand, sent.PagesStreamed, plan.ScanSeconds,
            plan.Recorded ? "recorded" : "scanned", plan.IndexProblem);
        return new LiveLoadResult(Tag, reverted, current.VmStateSize, plan.Info.RamBytes, seconds, after, plan.Info) { Recovery = recovery, Postcopy = postcopy };
    }

    /// <summary>Reports pages as bytes of RAM, for a progress that counts bytes.</summary>
    private sealed class PagesAsBytes(IProgress<long> bytes) : IProgress<long>
    {
        public void Report(long value) => bytes.Report(value * PostcopySource.PageBytes);
    }
}
