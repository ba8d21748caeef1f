using System.Buffers.Binary;
using System.Diagnostics;
using System.Net.Sockets;
using System.Text;
using System.Text.Json.Nodes;
using Vmsnap.Live.Qmp;
using Vmsnap.Migration;
using Vmsnap.Qcow2;
using Vmsnap.VmState;
using Vmsnap.VmState.LowLevel;
using Vmsnap.Qcow2.LowLevel;

namespace Vmsnap.Live;

/// <summary>
/// One live load (QEMU's loadvm, for a QEMU started with <c>-incoming defer</c>): such a QEMU keeps
/// its images inactive and unlocked until an incoming migration completes, then re-reads them. So
/// vmsnap checks the snapshot on every drive, reverts each drive to it, and feeds the snapshot's VM
/// state (read through the image's VM-state area) into <c>migrate-incoming</c> over a socket pair it
/// owns; QEMU then starts the guest, or leaves it paused when started with <c>-S</c>.
/// </summary>
internal sealed partial class LiveLoad : LiveSession
{
    private const int ReadBufferSize = 4 << 20;

    private readonly LiveLoadOptions _options;
    private readonly IProgress<long>? _progress;

    internal LiveLoad(IQmpConnection qmp, string tag, LiveLoadOptions options, IProgress<long>? progress, CancellationToken cancellationToken)
        : base(qmp, tag, cancellationToken)
    {
        _options = options;
        _progress = progress;
    }

    internal LiveLoadResult Run()
    {
        var clock = Stopwatch.StartNew();
        LiveTrace.Mark("QMP connected");
        // A QEMU a save was killed on (the wrong socket for a load, or a load tried right after): that save's leftovers are undone first.
        LiveRecoveryResult? recovery = LiveRecovery.IfNeeded(Qmp, Cancellation);
        if (recovery is not null) _options.Recovered?.Invoke(recovery);
        if (MigrationStatus().Status is { } cut && cut.StartsWith("postcopy-", StringComparison.Ordinal))
        {
            // A postcopy load under way or cut off: the rerun of the same command resumes it, and changes nothing else.
            if (_options.Postcopy) return ResumePostcopy(cut, recovery, clock);
            throw new OperationRefusedException($"QEMU's incoming migration is '{cut}': a postcopy load{(PostcopyRecord.Read(Qmp) is { } r ? $" of snapshot '{r.Tag}'" : "")} " +
                "is under way or was cut off; its guest waits for pages; resume it with the same command (loadvm --postcopy); nothing was loaded");
        }
        string state = RunState();
        if (state != "inmigrate")
            throw new OperationRefusedException(
                $"QEMU is not waiting for an incoming migration (its run state is '{state}'): start it with -incoming defer " +
                "(add -S to keep the guest paused after the load), then load again; nothing was loaded");
        (string migration, _, _) = MigrationStatus();
        if (migration != "none")
            throw new OperationRefusedException($"QEMU's incoming migration has already begun (status '{migration}'): start QEMU with -incoming defer for a live load; nothing was loaded");

        (List<LiveDisk> disks, LiveDisk vmDisk) = SelectDisks(_options.VmStateDisk, "loaded");
        string? machine = CurrentMachine();

        // Everything is checked on every drive before any drive is reverted.
        var snapshots = new List<(LiveDisk Disk, Qcow2Snapshot Snapshot)>();
        foreach (LiveDisk disk in disks)
        {
            using Qcow2Image image = OpenWritable(disk, "(a QEMU started with -incoming defer does not hold it)");
            Qcow2Snapshot s = image.FindSnapshot(Tag)
                ?? throw new SnapshotNotFoundException(Tag, disk.ImagePath!, $"Snapshot '{Tag}' does not exist in drive '{disk.Label}' ({disk.ImagePath}); nothing was loaded");
            if (s.DiskSize != image.VirtualSize)
                throw new OperationRefusedException($"snapshot '{Tag}' of drive '{disk.Label}' was taken of a disk of {s.DiskSize} bytes; the disk now has {image.VirtualSize}; nothing was loaded");
            if (disk == vmDisk)
            {
                if (s.VmStateSize == 0)
                    throw new OperationRefusedException($"snapshot '{Tag}' of drive '{disk.Label}' is a disk-only snapshot (no VM state); revert to it offline with qemu-img snapshot -a; nothing was loaded");
                string? saved = SavedMachine(image, s);
                if (machine is not null && saved is not null && saved != machine)
                    throw new OperationRefusedException($"snapshot '{Tag}' was saved from machine type '{saved}' and this QEMU runs '{machine}'; QEMU would refuse it; nothing was loaded");
            }
            snapshots.Add((disk, s));
        }

        LiveTrace.Mark("snapshots found");
        Qcow2Snapshot vmSnapshot = snapshots.First(x => x.Disk == vmDisk).Snapshot;
        PostcopyPlan? postcopy = _options.Postcopy ? PreparePostcopy(vmDisk, vmSnapshot) : null;
        LiveTrace.Mark("checked");
        var reverted = new List<LiveDiskSnapshot>();
        foreach ((LiveDisk disk, Qcow2Snapshot s) in snapshots)
        {
            try
            {
                using Qcow2Image image = OpenWritable(disk, "");
                Qcow2Snapshot applied = image.ApplySnapshot(s.Id, withVmState: false);   // the VM state is read from the snapshot: the revert does not grow with it
                reverted.Add(new LiveDiskSnapshot(disk.Label, disk.ImagePath!, applied.Id, disk == vmDisk));
            }
            catch (Exception e) when (e is VmsnapException or IOException)
            {
                if (postcopy is not null) RestorePostcopyCapability(postcopy);
                string done = reverted.Count == 0 ? "no drive was reverted" : $"already reverted: {string.Join(", ", reverted.Select(r => r.Drive))}";
                throw new LiveSnapshotException($"reverting drive '{disk.Label}' to snapshot '{Tag}' failed: {e.Message}; {done}", e);
            }
        }

        LiveTrace.Mark("reverted");
        if (postcopy is not null) return FeedPostcopy(vmDisk, vmSnapshot, postcopy, reverted, recovery, clock);
        (MigrationStreamInfo info, long bytes) = Feed(vmDisk, vmSnapshot);
        LiveTrace.Mark("stream sent");
        string after = WaitLoaded();
        LiveTrace.Mark("loaded");
        return new LiveLoadResult(Tag, reverted, bytes, info.RamBytes, clock.Elapsed.TotalSeconds, after, info) { Recovery = recovery };
    }

    /// <summary>The machine type QEMU runs (QOM's <c>/machine</c> type without its "-machine" suffix), or null.</summary>
    private string? CurrentMachine()
    {
        try
        {
            string? type = QemuBlockDevices.Str(Qmp.Execute("qom-get", new JsonObject { ["path"] = "/machine", ["property"] = "type" }));
            return type?.EndsWith("-machine", StringComparison.Ordinal) == true ? type[..^"-machine".Length] : type;
        }
        catch (QmpException)
        {
            return null;
        }
    }

    /// <summary>The machine type in the snapshot's configuration section (right after the stream header), or null.</summary>
    private static string? SavedMachine(Qcow2Image image, Qcow2Snapshot snapshot)
    {
        using Qcow2VmStateArea area = image.OpenVmStateAreaForReading(snapshot);
        byte[] head = new byte[8 + 1 + 4 + 256];
        int n = area.Read(head, 0);
        if (n < 13 || BinaryPrimitives.ReadUInt32BigEndian(head) != 0x5145564d || head[8] != 0x07) return null;
        int length = (int)BinaryPrimitives.ReadUInt32BigEndian(head.AsSpan(9));
        return length <= n - 13 ? Encoding.UTF8.GetString(head, 13, length) : null;
    }

    /// <summary>Streams the snapshot's VM state into QEMU's incoming migration; returns what it held and its length.</summary>
    private (MigrationStreamInfo Info, long Bytes) Feed(LiveDisk vmDisk, Qcow2Snapshot snapshot)
    {
        using SnapshotStream stream = OpenSnapshotStream(vmDisk.ImagePath!, snapshot, $"snapshot '{Tag}' of drive '{vmDisk.Label}' is gone");
        using VmStateReader reader = stream.NewReader(ReadBufferSize);

        (Socket socket, string uri, string fdName) = OpenChannel();
        using var _ = socket;
        try
        {
            Qmp.Execute("migrate-incoming", new JsonObject { ["uri"] = uri });
        }
        catch (QmpException e)
        {
            CloseFd(fdName);
            throw new QmpException($"QEMU refused the incoming migration: {e.Message} (start QEMU with -incoming defer for a live load); " +
                "the drives were reverted to the snapshot", e.ErrorClass, e);
        }
        using var registration = Cancellation.Register(() =>
        {
            try { socket.Shutdown(SocketShutdown.Both); }
            catch (Exception e) when (e is SocketException or ObjectDisposedException) { }
        });
        try
        {
            using var backend = VmStateBackend.ForSocket(socket, ownsSocket: false);
            // Buffered mode on the socket: one write per MiB instead of one per 32 KiB (gather mode's buffer).
            using var writer = new VmStateWriter(backend, new VmStateWriterOptions { Mode = VmStateWriteMode.Buffered, BufferCount = 2, SyncOnClose = false });
            MigrationStreamInfo info = MigrationStream.Copy(reader, writer, _progress, Cancellation);
            writer.Close();
            socket.Shutdown(SocketShutdown.Send);
            return (info, writer.BytesTransferred);
        }
        catch (Exception e) when (e is VmsnapException or IOException or SocketException)
        {
            Cancellation.ThrowIfCancellationRequested();
            if (Qmp.IsClosed)
                throw new LiveSnapshotException(QemuGone("while loading the VM state: QEMU refused it (see its error output)") + "; the drives were reverted to the snapshot", e);
            throw new LiveSnapshotException($"sending the VM state to QEMU failed: {e.Message}; the drives were reverted to the snapshot", e);
        }
    }

    /// <summary>Waits until QEMU has loaded the state and left "inmigrate"; returns its run state.</summary>
    private string WaitLoaded()
    {
        string state = "inmigrate";
        string status = "active";
        string? error = null;
        bool done = WaitUntil(() =>
        {
            if (Qmp.IsClosed) return true;
            try
            {
                state = RunState();
                (status, error, _) = MigrationStatus();
            }
            catch (QmpException) when (Qmp.IsClosed)
            {
                return true;
            }
            return status is "failed" or "cancelled" || (state != "inmigrate" && status is "completed" or "none");
        }, _options.LoadTimeout);
        if (Qmp.IsClosed) throw new LiveSnapshotException(QemuGone("while loading the VM state: QEMU refused it (see its error output)") + "; the drives were reverted to the snapshot");
        if (!done) throw new LiveSnapshotException($"QEMU did not finish loading the VM state within {_options.LoadTimeout.TotalSeconds:0} s (status '{status}')");
        if (status is "failed" or "cancelled")
            throw new LiveSnapshotException($"QEMU's incoming migration {status}: {error ?? "QEMU gave no reason (see its log)"}; the drives were reverted to the snapshot");
        return state;
    }
}
