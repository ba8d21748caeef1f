using System.Diagnostics;
using System.Text.Json.Nodes;
using Vmsnap.Live.Qmp;
using Vmsnap.Qcow2;
using Vmsnap.Qcow2.LowLevel;
using Vmsnap.Storage;
using Vmsnap.Storage.LowLevel;
using Vmsnap.VmState.LowLevel;

namespace Vmsnap.Live;

/// <summary>What a live save and a live load share: QEMU's run state and migration status, the drives, opening images, the migration channel.</summary>
internal abstract class LiveSession(IQmpConnection qmp, string tag, CancellationToken cancellationToken)
{
    protected IQmpConnection Qmp { get; } = qmp;
    protected string Tag { get; } = tag;
    protected CancellationToken Cancellation { get; } = cancellationToken;

    /// <summary>QEMU's run state (<c>running</c>, <c>paused</c>, <c>prelaunch</c>, <c>inmigrate</c>, <c>postmigrate</c>, ...).</summary>
    protected string RunState() => QemuBlockDevices.Str(Qmp.Execute("query-status")?["status"]) ?? "unknown";

    /// <summary>The migration's status (<c>none</c> when there has been none) and QEMU's error text, with the whole answer.</summary>
    protected (string Status, string? Error, JsonObject Info) MigrationStatus()
    {
        var info = Qmp.Execute("query-migrate") as JsonObject ?? [];
        return (QemuBlockDevices.Str(info["status"]) ?? "none", QemuBlockDevices.Str(info["error-desc"]), info);
    }

    /// <summary>The drives that take part, refusing what QEMU's savevm and loadvm refuse; and the one keeping the VM state.</summary>
    protected (List<LiveDisk> Disks, LiveDisk VmStateDisk) SelectDisks(string? vmStateDisk, string operation)
    {
        IReadOnlyList<LiveDisk> all = QemuBlockDevices.Query(Qmp);
        if (all.FirstOrDefault(d => d.Kind == LiveDiskKind.Unsupported) is { } bad)
            throw new OperationRefusedException($"{bad.Problem}; nothing was {operation}");
        var disks = all.Where(d => d.Kind == LiveDiskKind.Qcow2).ToList();
        if (disks.Count == 0)
            throw new OperationRefusedException($"QEMU has no writable qcow2 drive ({all.Count} drive(s): read-only and empty ones are skipped, as by QEMU's savevm); nothing was {operation}");
        LiveDisk chosen = disks[0];
        if (vmStateDisk is not null)
        {
            chosen = disks.FirstOrDefault(d => d.IsNamed(vmStateDisk))
                ?? throw new OperationRefusedException(all.Any(d => d.IsNamed(vmStateDisk))
                    ? $"drive '{vmStateDisk}' is read-only or empty: it cannot keep the VM state; nothing was {operation}"
                    : $"QEMU has no drive '{vmStateDisk}' (drives: {string.Join(", ", all.Select(d => d.Label))}); nothing was {operation}");
        }
        var dupes = disks.GroupBy(d => d.ImagePath).FirstOrDefault(g => g.Count() > 1);
        if (dupes is not null)
            throw new OperationRefusedException($"image '{dupes.Key}' is attached to several drives ({string.Join(", ", dupes.Select(d => d.Label))}); nothing was {operation}");
        return (disks, chosen);
    }

    /// <summary>Opens an image vmsnap may write (QEMU released it): with QEMU-compatible locking, so an image someone still holds is refused.</summary>
    protected static Qcow2Image OpenWritable(LiveDisk disk, string whileDoing)
    {
        try
        {
            return Qcow2Image.Open(disk.ImagePath!, new Qcow2OpenOptions());
        }
        catch (ImageInUseException e)
        {
            throw new ImageInUseException($"drive '{disk.Label}': {e.Message}; QEMU (or another process) still holds the image {whileDoing}", e);
        }
    }

    /// <summary>Opens an image for reading while QEMU may hold it (shared lock, like qemu-img -U).</summary>
    protected static Qcow2Image OpenShared(LiveDisk disk) => Qcow2Image.Open(disk.ImagePath!, new Qcow2OpenOptions { ForceShare = true });

    /// <summary>
    /// Opens an image to stream a snapshot's VM state out of it: shared (QEMU takes its images back as soon as the
    /// stream is in), and with O_DIRECT where the file system allows it (large aligned reads, several in flight).
    /// </summary>
    internal static Qcow2Image OpenSharedDirect(string imagePath)
    {
        try
        {
            return Qcow2Image.Open(imagePath, new Qcow2OpenOptions { ForceShare = true, Direct = true });
        }
        catch (Vmsnap.Storage.StorageException e) when (e.IsInvalidArgument)   // tmpfs: no O_DIRECT
        {
            return Qcow2Image.Open(imagePath, new Qcow2OpenOptions { ForceShare = true });
        }
    }

    /// <summary>
    /// Opens a snapshot's VM state to stream it out in order (<see cref="OpenSharedDirect"/>): the snapshot as the image holds
    /// it now (found by ID), its VM-state area, and a backend exactly its stream long. <paramref name="wrap"/> may put a
    /// seam around the area's reads.
    /// </summary>
    /// <exception cref="SnapshotNotFoundException">The image no longer has the snapshot (<paramref name="gone"/> says so).</exception>
    internal static SnapshotStream OpenSnapshotStream(string imagePath, Qcow2Snapshot snapshot, string gone, Func<IBlockDevice, IBlockDevice>? wrap = null)
    {
        Qcow2Image image = OpenSharedDirect(imagePath);
        try
        {
            Qcow2Snapshot current = image.FindSnapshot(snapshot.Id) ?? throw new SnapshotNotFoundException(snapshot.Name, imagePath, gone);
            Qcow2VmStateArea area = image.OpenVmStateAreaForReading(current);
            return new SnapshotStream(image, area, VmStateBackend.ForBlockDevice(wrap is null ? area : wrap(area), 0, current.VmStateSize));
        }
        catch
        {
            image.Dispose();
            throw;
        }
    }

    /// <summary>A snapshot's VM state open for streaming (<see cref="OpenSnapshotStream"/>); disposing it closes the image.</summary>
    internal sealed class SnapshotStream(Qcow2Image image, Qcow2VmStateArea area, VmStateBackend backend) : IDisposable
    {
        /// <summary>A reader with read-ahead over the stream (its buffers are filled as soon as it is made).</summary>
        internal VmStateReader NewReader(int bufferSize) => new(backend, bufferSize);

        public void Dispose()
        {
            backend.Dispose();
            area.Dispose();
            image.Dispose();
        }
    }

    /// <summary>
    /// The name QEMU keeps the channel's descriptor under until migrate takes it. One fixed name: QEMU keeps a
    /// descriptor per QMP monitor and name, and replaces it when the name comes again, so one that a killed vmsnap
    /// handed over but never used is closed by the next getfd on that socket (or by the recovery's closefd).
    /// </summary>
    protected const string ChannelName = "vmsnap-channel";

    /// <summary>
    /// Creates the migration channel: a socket pair whose other end QEMU receives (QMP getfd) as
    /// <see cref="ChannelName"/>; returns our end and the URI (<c>fd:NAME</c>) for migrate or migrate-incoming.
    /// </summary>
    protected (System.Net.Sockets.Socket Socket, string Uri, string FdName) OpenChannel()
    {
        (System.Net.Sockets.Socket ours, int theirs) = UnixSocket.Pair(ChannelBufferBytes);
        const string name = ChannelName;
        try
        {
            Qmp.Execute("getfd", new JsonObject { ["fdname"] = name }, fd: theirs);
        }
        catch
        {
            ours.Dispose();
            throw;
        }
        finally
        {
            UnixSocket.Close(theirs);   // QEMU has its own copy now
        }
        ours.ReceiveBufferSize = ChannelBufferBytes;
        ours.SendBufferSize = ChannelBufferBytes;
        return (ours, "fd:" + name, name);
    }

    /// <summary>Socket buffers of the migration channel: large, so QEMU's and vmsnap's threads rarely wait on each other.</summary>
    protected const int ChannelBufferBytes = 4 << 20;

    /// <summary>Drops the named fd QEMU may still hold (after a migration that did not start); ignores a QEMU that no longer has it.</summary>
    protected void CloseFd(string name)
    {
        try
        {
            Qmp.Execute("closefd", new JsonObject { ["fdname"] = name });
        }
        catch (QmpException)
        {
        }
    }

    /// <summary>Waits until <paramref name="done"/> holds, polling every 20 ms; false on timeout.</summary>
    protected static bool WaitUntil(Func<bool> done, TimeSpan timeout)
    {
        var clock = Stopwatch.StartNew();
        while (!done())
        {
            if (clock.Elapsed > timeout) return false;
            Thread.Sleep(20);
        }
        return true;
    }

    /// <summary>An error text that names QEMU's exit when the QMP connection is gone.</summary>
    protected string QemuGone(string during) =>
        $"{Qmp.ClosedReason} {during}";
}
