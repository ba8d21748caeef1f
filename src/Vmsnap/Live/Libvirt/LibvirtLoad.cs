using System.Buffers.Binary;
using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text;
using System.Xml.Linq;
using Vmsnap.Migration;
using Vmsnap.Migration.LowLevel;
using Vmsnap.Qcow2;
using Vmsnap.Qcow2.LowLevel;
using Vmsnap.VmState;
using Vmsnap.VmState.LowLevel;
using static Vmsnap.Live.Libvirt.LibvirtNative;

namespace Vmsnap.Live.Libvirt;

/// <summary>
/// A libvirt domain reverted the fast way: with the domain shut off, every disk of the snapshot is reverted to it by vmsnap's
/// engine, then libvirt restores the domain (virDomainRestoreFlags) from a libvirt save image that vmsnap serves on the fly
/// through a FIFO: libvirt's header (<c>LibvirtQemudSave</c>, version 2), the snapshot's domain XML, then QEMU's migration
/// stream read straight out of the snapshot's VM state. Nothing is copied to disk first. Then TAG is made libvirt's current snapshot.
/// </summary>
internal sealed class LibvirtLoad(LibvirtDomain domain, string tag, bool force, bool postcopy, IProgress<long>? progress, CancellationToken cancellationToken)
{
    /// <summary>How long a postcopy load waits for QEMU to confirm its last page.</summary>
    private static readonly TimeSpan PostcopyConfirmTimeout = TimeSpan.FromMinutes(2);

    // libvirt's save image header (src/qemu/qemu_saveimage.h): magic, then uint32 version, data_len, was_running, compressed (format),
    // cookieOffset and 14 unused, in the host's byte order.
    private const string SaveMagic = "LibvirtQemudSave";
    private const int SaveVersion = 2;
    private const int HeaderBytes = 16 + 4 * 5 + 4 * 14;
    private const int CopyBufferBytes = 4 << 20;

    // What a save image framed for the other libvirt gets: libvirt 11 reading stream bytes as the second header, or QEMU
    // (under libvirt 9.0) reading the second header as its stream.
    private static readonly string[] MisframedHeader = ["image magic is incorrect", "Not a migration stream"];

    internal LibvirtLoadResult Run()
    {
        var clock = Stopwatch.StartNew();
        string snapshotXml = domain.SnapshotXml(tag)
            ?? throw new OperationRefusedException($"libvirt has no snapshot '{tag}' of domain '{domain.Name}' (virsh snapshot-list {domain.Name}); nothing was loaded");
        var snapshot = XElement.Parse(snapshotXml);
        string state = snapshot.Element("state")?.Value ?? "";
        if (snapshot.Element("memory")?.Attribute("snapshot")?.Value != "internal" || state is not ("running" or "paused"))
            throw new OperationRefusedException($"not supported yet: snapshot '{tag}' of domain '{domain.Name}' has no internal memory state (state '{state}'); use virsh snapshot-revert; nothing was loaded");
        XElement domainXml = snapshot.Element("domain")
            ?? throw new OperationRefusedException($"libvirt's snapshot '{tag}' of domain '{domain.Name}' has no domain definition; use virsh snapshot-revert; nothing was loaded");
        List<(string Target, string Image)> disks = InternalDisks(snapshot, domainXml);

        bool shutOff = domain.State == DomainShutoff;
        if (!shutOff && !force)
            throw new DomainNotShutOffException(domain.Name);

        // Every disk checked before the domain is stopped or any disk reverted, so that a refusal leaves a running
        // domain running: read shared, as QEMU may still hold the images.
        var found = new List<(string Target, string Image, Qcow2Snapshot Snapshot)>();
        foreach ((string target, string image) in disks)
        {
            using Qcow2Image img = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true, ForceShare = true });
            Qcow2Snapshot s = img.FindSnapshot(tag)
                ?? throw new SnapshotNotFoundException(tag, image, $"disk '{target}' ({image}) has no snapshot '{tag}', which libvirt lists; nothing was loaded");
            if (s.DiskSize != img.VirtualSize)
                throw new OperationRefusedException($"snapshot '{tag}' of disk '{target}' was taken of a disk of {s.DiskSize} bytes; the disk now has {img.VirtualSize}; nothing was loaded");
            found.Add((target, image, s));
        }
        (string vmTarget, string vmImage, Qcow2Snapshot vmSnapshot) = found.FirstOrDefault(f => f.Snapshot.VmStateSize > 0);
        if (vmImage is null)
            throw new OperationRefusedException($"no disk of snapshot '{tag}' holds its VM state; nothing was loaded");
        // Postcopy starts the guest before its pages are in: a paused snapshot gains nothing (libvirt refuses postcopy into a paused domain).
        string? postcopyNote = null;
        if (postcopy && state != "running")
            postcopyNote = $"snapshot '{tag}' is of a paused guest: postcopy gains nothing there (and libvirt refuses it into a paused domain); restored whole instead";
        LiveTrace.Mark("checked");
        if (!shutOff) domain.Destroy();
        LiveTrace.Mark("domain shut off");

        var reverted = new List<LiveDiskSnapshot>();
        foreach ((string target, string image, Qcow2Snapshot s) in found)
        {
            try
            {
                using Qcow2Image img = Qcow2Image.Open(image, new Qcow2OpenOptions());
                Qcow2Snapshot applied = img.ApplySnapshot(s.Id, withVmState: false);   // the VM state is read from the snapshot
                reverted.Add(new LiveDiskSnapshot(target, image, applied.Id, image == vmImage));
            }
            catch (Exception e) when (e is VmsnapException or IOException)
            {
                string done = reverted.Count == 0 ? "no disk was reverted" : $"already reverted: {string.Join(", ", reverted.Select(r => r.Drive))}";
                throw new LiveSnapshotException($"reverting disk '{target}' to snapshot '{tag}' failed: {e.Message}; {done}; the domain is shut off", e);
            }
        }

        LiveTrace.Mark("reverted");
        if (postcopy && postcopyNote is null)
        {
            if (LoadWithPostcopy(snapshotXml, domainXml, vmImage, vmSnapshot, reverted, clock, out postcopyNote) is { } loaded)
                return loaded;
        }
        // libvirt 11.x reads the save image's header and domain XML twice from the one descriptor (it rewinds between, which a FIFO
        // ignores: measured on 11.3); 9.0 reads them once. Which release changed it is not known here: the first guess goes by the
        // daemon's version, and a restore that found the header or the stream out of place is tried once more the other way.
        // VMSNAP_LIBVIRT_SAVE_HEADER=once|twice sets the first guess (for the tests of the second try, and for a libvirt that guesses wrong).
        bool headerTwice = Environment.GetEnvironmentVariable("VMSNAP_LIBVIRT_SAVE_HEADER") switch
        {
            "once" => false,
            "twice" => true,
            _ => domain.DaemonVersion >= 11_000_000,
        };
        long bytes;
        try
        {
            bytes = Restore(domainXml, state == "running", vmImage, vmSnapshot, headerTwice);
        }
        catch (LiveSnapshotException e) when (MisframedHeader.Any(m => e.Message.Contains(m, StringComparison.Ordinal)))
        {
            LiveTrace.Mark("restore to be tried again, the header framed the other way");
            bytes = Restore(domainXml, state == "running", vmImage, vmSnapshot, !headerTwice);
        }
        LiveTrace.Mark("restored");
        double seconds = clock.Elapsed.TotalSeconds;
        // The snapshot as libvirt's current one, as virsh snapshot-revert leaves it.
        domain.Redefine(snapshotXml, current: true);
        LiveTrace.Mark("current snapshot set");
        return new LibvirtLoadResult(tag, reverted, bytes, seconds, RunStateOf(domain.State)) { PostcopyNote = postcopyNote };
    }

    private static string RunStateOf(int state) => state == DomainRunning ? "running" : state == DomainPaused ? "paused" : $"state {state}";

    /// <summary>
    /// The domain taken in by libvirt as an incoming postcopy migration from vmsnap (<see cref="LibvirtPostcopy"/>); null, with
    /// <paramref name="note"/> saying why, when postcopy failed before the guest started: libvirt stopped the QEMU it started, the
    /// disks stay reverted, and the caller restores the domain whole instead.
    /// </summary>
    private LibvirtLoadResult? LoadWithPostcopy(string snapshotXml, XElement domainXml, string vmImage, Qcow2Snapshot vmSnapshot,
        List<LiveDiskSnapshot> reverted, Stopwatch clock, out string? note)
    {
        note = null;
        // The snapshot's page index (recorded at save, or one scan of its VM state) is made while libvirt starts the new QEMU:
        // started earlier, a scan slows the domain's stop and the disks' revert as much as it gains (measured, 2 cores).
        using var indexing = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        Task<LibvirtPostcopy.Index> index = Task.Run(() => LibvirtPostcopy.Index.Of(vmImage, vmSnapshot, tag, indexing.Token));
        LibvirtPostcopy.Outcome outcome;
        try
        {
            outcome = new LibvirtPostcopy(domain, tag, progress, PostcopyConfirmTimeout).Run(domainXml, vmImage, vmSnapshot, index, clock);
        }
        catch (LibvirtPostcopy.NotStartedException e)
        {
            indexing.Cancel();
            try { index.Wait(); }
            catch (AggregateException) { }   // cancelled, or its failure is e
            note = $"postcopy was not possible ({e.Message}); restored whole instead";
            LiveTrace.Mark("postcopy not started: " + e.Message);
            return null;
        }
        LibvirtPostcopy.Index indexed = index.Result;
        LiveTrace.Mark("loaded");
        double seconds = clock.Elapsed.TotalSeconds;
        domain.Redefine(snapshotXml, current: true);
        LiveTrace.Mark("current snapshot set");
        return new LibvirtLoadResult(tag, reverted, vmSnapshot.VmStateSize, seconds, RunStateOf(domain.State))
        {
            Postcopy = new LivePostcopyResult(outcome.SecondsToRunning, outcome.SecondsToLastPage, outcome.Sent.PagesOnDemand, outcome.Sent.PagesStreamed,
                indexed.Seconds, indexed.Recorded ? "recorded" : "scanned", indexed.Problem),
        };
    }

    /// <summary>The snapshot's internal disks (target and image), from its disk list and the domain definition it holds.</summary>
    private List<(string Target, string Image)> InternalDisks(XElement snapshot, XElement domainXml)
    {
        var sources = new Dictionary<string, (string? File, string? Format)>(StringComparer.Ordinal);
        foreach (XElement disk in domainXml.Element("devices")?.Elements("disk") ?? [])
            if (disk.Element("target")?.Attribute("dev")?.Value is { } dev)
                sources[dev] = (disk.Element("source")?.Attribute("file")?.Value, disk.Element("driver")?.Attribute("type")?.Value);
        var disks = new List<(string, string)>();
        foreach (XElement disk in snapshot.Element("disks")?.Elements("disk") ?? [])
        {
            if (disk.Attribute("snapshot")?.Value != "internal") continue;
            string name = disk.Attribute("name")?.Value ?? "";
            if (!sources.TryGetValue(name, out var source) || source.File is null || source.Format != "qcow2")
                throw new OperationRefusedException($"not supported yet: disk '{name}' of snapshot '{tag}' is not a qcow2 file; use virsh snapshot-revert; nothing was loaded");
            disks.Add((name, source.File));
        }
        if (disks.Count == 0)
            throw new OperationRefusedException($"snapshot '{tag}' of domain '{domain.Name}' has no internal disk snapshot; nothing was loaded");
        return disks;
    }

    /// <summary>Serves the save image through a FIFO while libvirt restores the domain from it; returns the VM-state bytes sent.</summary>
    private long Restore(XElement domainXml, bool running, string vmImage, Qcow2Snapshot vmSnapshot, bool headerTwice)
    {
        string folder = Path.Combine(Path.GetTempPath(), "vmsnap-libvirt-" + Guid.NewGuid().ToString("N")[..12]);
        Directory.CreateDirectory(folder);
        string fifo = Path.Combine(folder, "restore.save");
        try
        {
            if (mkfifo(fifo, 0x180) != 0)
                throw new LiveSnapshotException($"cannot create the FIFO '{fifo}': error {Marshal.GetLastPInvokeError()}; the disks were reverted to snapshot '{tag}' and the domain is shut off");
            long sent = 0;
            Exception? serveFailure = null;
            var server = new Thread(() =>
            {
                try { sent = Serve(fifo, domainXml.ToString(SaveOptions.DisableFormatting), running, vmImage, vmSnapshot, headerTwice); }
                catch (Exception e) when (e is IOException or VmsnapException or UnauthorizedAccessException) { serveFailure = e; }
            }) { IsBackground = true, Name = "vmsnap libvirt save image" };
            server.Start();
            using var registration = cancellationToken.Register(() => Unblock(fifo, server));
            int rc = virDomainRestoreFlags(domain.Connection, fifo, null, running ? SaveRunning : SavePaused);
            string? why = rc == 0 ? null : LastError();
            if (rc != 0) Unblock(fifo, server);   // a libvirt that failed leaves the server waiting for a reader, or in a write
            server.Join();
            if (rc != 0)
                throw new LiveSnapshotException($"libvirt could not restore domain '{domain.Name}' from snapshot '{tag}': {why}" +
                    (serveFailure is null ? "" : $" (serving the VM state: {serveFailure.Message})") + $"; the disks were reverted to the snapshot and the domain is shut off");
            return sent;
        }
        finally
        {
            try { Directory.Delete(folder, recursive: true); }
            catch (IOException) { }
        }
    }

    /// <summary>
    /// Reads the FIFO to its end for as long as the server runs, so that a server blocked in open (no reader came) or in write
    /// (the reader went) gets an end to write to and finishes. The FIFO is opened without blocking: when the server is gone, or
    /// not open yet, a blocking open would wait for a writer that may never come.
    /// </summary>
    private static void Unblock(string fifo, Thread server)
    {
        while (server.IsAlive)
        {
            int fd = open(fifo, O_RDONLY | O_NONBLOCK);
            if (fd < 0) return;
            fcntl(fd, F_SETFL, fcntl(fd, F_GETFL, 0) & ~O_NONBLOCK);   // reads wait for data once it is open
            using (var reader = new FileStream(new Microsoft.Win32.SafeHandles.SafeFileHandle(fd, ownsHandle: true), FileAccess.Read, 1))
            {
                try { reader.CopyTo(Stream.Null); }   // ends when no writer has it open
                catch (IOException) { }
            }
            if (server.IsAlive) Thread.Sleep(10);
        }
    }

    /// <summary>Writes the save image into the FIFO: header and domain XML (twice when <paramref name="headerTwice"/>), then the stream.</summary>
    private long Serve(string fifo, string xml, bool running, string vmImage, Qcow2Snapshot vmSnapshot, bool headerTwice)
    {
        // Shared (QEMU takes the image back once the stream is in) and O_DIRECT where the file system allows it; the reader reads ahead
        // while the writer fills the FIFO, whose buffer is made as large as the kernel allows a user (1 MiB by default).
        using LiveSession.SnapshotStream stream = LiveSession.OpenSnapshotStream(vmImage, vmSnapshot, $"snapshot '{tag}' of {vmImage} is gone");
        using VmStateReader reader = stream.NewReader(CopyBufferBytes);
        using var output = new FileStream(fifo, FileMode.Open, FileAccess.Write, FileShare.ReadWrite, 1, FileOptions.None);
        fcntl(output.SafeFileHandle.DangerousGetHandle(), F_SETPIPE_SZ, 1 << 20);
        LiveTrace.Mark("save image opened by libvirt");
        byte[] data = Encoding.UTF8.GetBytes(xml + "\0");
        byte[] header = new byte[HeaderBytes];
        Encoding.ASCII.GetBytes(SaveMagic).CopyTo(header, 0);
        BinaryPrimitives.WriteUInt32LittleEndian(header.AsSpan(16), SaveVersion);
        BinaryPrimitives.WriteUInt32LittleEndian(header.AsSpan(20), (uint)data.Length);
        BinaryPrimitives.WriteUInt32LittleEndian(header.AsSpan(24), running ? 1u : 0u);
        // compressed (raw) and cookieOffset (no cookie) stay 0
        output.Write(header);
        output.Write(data);
        if (headerTwice)
        {
            output.Write(header);
            output.Write(data);
        }
        using var backend = VmStateBackend.ForStream(output, leaveOpen: true);
        using var writer = new VmStateWriter(backend, new VmStateWriterOptions { Mode = VmStateWriteMode.Buffered, BufferCount = 2, SyncOnClose = false });
        MigrationStream.Copy(reader, writer, progress, cancellationToken);
        writer.Close();
        LiveTrace.Mark("stream sent");
        return writer.BytesTransferred;
    }
}

/// <summary>What <see cref="LibvirtSnapshots.LoadVm"/> did.</summary>
/// <param name="Tag">The snapshot's name.</param>
/// <param name="Disks">The disks reverted to the snapshot.</param>
/// <param name="VmStateBytes">Bytes of VM state sent to QEMU.</param>
/// <param name="Seconds">Wall time, until libvirt had restored the domain (its guest running, or paused); with postcopy, until QEMU had
/// every page (<see cref="LivePostcopyResult.SecondsToResume"/>: until the guest ran).</param>
/// <param name="RunState">The domain's state afterwards.</param>
public sealed record LibvirtLoadResult(string Tag, IReadOnlyList<LiveDiskSnapshot> Disks, long VmStateBytes, double Seconds, string RunState)
{
    /// <summary>How the postcopy load went (<c>--postcopy</c>); null when the domain was restored whole.</summary>
    public LivePostcopyResult? Postcopy { get; init; }

    /// <summary>Why a postcopy load asked for was done whole instead (a paused snapshot, or postcopy failing before the guest started); else null.</summary>
    public string? PostcopyNote { get; init; }
}
