using System.Diagnostics;
using Vmsnap.Migration;
using Vmsnap.Migration.LowLevel;
using Vmsnap.Qcow2;
using Vmsnap.Qcow2.LowLevel;
using Vmsnap.Storage;
using Vmsnap.VmState;
using Vmsnap.Storage.LowLevel;
using Vmsnap.VmState.LowLevel;

namespace Vmsnap.Snapshots;

/// <summary>
/// Saves and loads virtual machines as qcow2 internal snapshots in QEMU's own formats: the VM state
/// (a migration stream) goes through the VM-state file into the image's VM-state area, then a snapshot
/// captures it with the disk, exactly as QEMU's <c>savevm</c> leaves it, so <c>-loadvm TAG</c> restores it.
/// </summary>
/// <remarks>
/// Saving is atomic: a failure (I/O error, bad input, cancellation) frees what was written, leaves no new
/// snapshot entry and no leaked clusters, and never touches the older snapshots.
/// </remarks>
public static class VmSnapshots
{
    /// <summary>Reads of the VM state use buffers this large (several in flight).</summary>
    private const int ReadBufferSize = 4 << 20;

    /// <summary>Saves a machine (RAM from files, device state from a template or none) as a new snapshot <paramref name="name"/>.</summary>
    /// <exception cref="SnapshotExistsException">The name is taken (or is another snapshot's ID); nothing was changed.</exception>
    /// <exception cref="ImageInUseException">A running QEMU (or another process) holds the image; nothing was changed.</exception>
    /// <exception cref="OperationRefusedException">No name, or the image cannot take a snapshot now; nothing was changed.</exception>
    /// <exception cref="VmsnapException">The image is damaged (<see cref="Qcow2FormatException"/>), the input is wrong
    /// (<see cref="MigrationStreamException"/>) or the write failed (<see cref="VmStateException"/>, <see cref="StorageException"/>); nothing was changed.</exception>
    public static VmSnapshotResult Save(string imagePath, string name, MachineProfile profile, VmSnapshotOptions? options = null,
        IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(profile);
        var index = new PostcopyIndexRecorder();
        return WriteSnapshot(imagePath, name, options ?? new(), writer => index.Write(writer, profile, ramBytesDone, cancellationToken), index: index);
    }

    /// <summary>
    /// Makes a snapshot from a migration stream (e.g. written by QEMU's <c>migrate "exec:cat &gt; FILE"</c>), copied
    /// byte for byte into the VM-state area while it is checked. A mapped-ram file (QEMU's <c>migrate file:</c> with
    /// capability mapped-ram) is stored as the plain stream QEMU's savevm would have written, so QEMU 7.2 to 10.1
    /// <c>-loadvm</c> takes it when they have the machine type.
    /// </summary>
    /// <param name="source">The stream: a file's path.</param>
    /// <param name="imagePath">The image that receives the snapshot.</param>
    /// <param name="name">The new snapshot's name.</param>
    /// <param name="options">Writer and I/O options.</param>
    /// <param name="ramBytesDone">Receives the bytes of RAM copied so far.</param>
    /// <param name="cancellationToken">Stops the copy; nothing is left behind.</param>
    public static VmSnapshotResult Import(string source, string imagePath, string name, VmSnapshotOptions? options = null,
        IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default)
    {
        using var file = FileBlockDevice.Open(source);
        using var backend = VmStateBackend.ForBlockDevice(file);
        return Import(backend, imagePath, name, options, ramBytesDone, cancellationToken);
    }

    /// <summary>As <see cref="Import(string, string, string, VmSnapshotOptions?, IProgress{long}?, CancellationToken)"/>, reading the stream from a pipe or other stream (e.g. stdin).</summary>
    public static VmSnapshotResult Import(Stream source, string imagePath, string name, VmSnapshotOptions? options = null,
        IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default)
    {
        using var backend = VmStateBackend.ForStream(source, leaveOpen: true);
        return Import(backend, imagePath, name, options, ramBytesDone, cancellationToken);
    }

    private static VmSnapshotResult Import(VmStateBackend source, string imagePath, string name, VmSnapshotOptions? options,
        IProgress<long>? ramBytesDone, CancellationToken cancellationToken)
    {
        using var reader = new VmStateReader(source, ReadBufferSize);
        var index = new PostcopyIndexRecorder();
        return WriteSnapshot(imagePath, name, options ?? new(), writer => index.Copy(reader, writer, ramBytesDone, cancellationToken), index: index);
    }

    /// <summary>
    /// Loads snapshot <paramref name="snapshot"/>'s RAM into files, one per RAM block (ID to path); files are
    /// created if missing and left sparse where pages are zero. Block names and lengths are checked.
    /// </summary>
    /// <exception cref="SnapshotNotFoundException">No snapshot has that ID or name.</exception>
    /// <exception cref="OperationRefusedException">The snapshot has no VM state (a disk-only snapshot).</exception>
    /// <exception cref="MigrationStreamException">The stream is damaged, or a RAM block does not match its file.</exception>
    public static VmSnapshotResult Load(string imagePath, string snapshot, IEnumerable<KeyValuePair<string, string>> ramFiles,
        VmSnapshotOptions? options = null, IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(ramFiles);
        return ReadSnapshot(imagePath, snapshot, options ?? new(), (reader, length) =>
        {
            using var sink = RamSink(ramFiles, options);
            return (MigrationStream.Parse(reader, length, sink, null, MigrationStreamFormat.Plain, ramBytesDone, cancellationToken), (VmStateWriteMode?)null);
        });
    }

    private static RamFileSink RamSink(IEnumerable<KeyValuePair<string, string>> ramFiles, VmSnapshotOptions? options) =>
        new(ramFiles) { WriteInPlace = options?.RamInPlace ?? false };

    /// <summary>
    /// Loads the RAM of a migration stream file (plain, or QEMU's mapped-ram <c>file:</c> format) into files, one per
    /// RAM block, as <see cref="Load"/> does for a snapshot.
    /// </summary>
    /// <exception cref="MigrationStreamException">The stream is damaged or not one vmsnap reads, or a RAM block does not match its file.</exception>
    public static MigrationStreamInfo LoadStream(string source, IEnumerable<KeyValuePair<string, string>> ramFiles,
        VmSnapshotOptions? options = null, IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(ramFiles);
        using var file = FileBlockDevice.Open(source);
        using var backend = VmStateBackend.ForBlockDevice(file);
        using var reader = new VmStateReader(backend, ReadBufferSize);
        using var sink = RamSink(ramFiles, options);
        return MigrationStream.Read(reader, sink, ramBytesDone, cancellationToken);
    }

    /// <summary>
    /// Writes snapshot <paramref name="snapshot"/>'s VM state to a file as a migration stream QEMU accepts with
    /// <c>-incoming "exec:cat FILE"</c>, or with <see cref="VmSnapshotOptions.MappedRam"/> as a mapped-ram file for
    /// <c>migrate-incoming file:FILE</c> (page data at 1 MiB-aligned offsets, written with O_DIRECT where the file
    /// system allows). The file appears only when complete.
    /// </summary>
    public static VmSnapshotResult Export(string imagePath, string snapshot, string destination, VmSnapshotOptions? options = null,
        IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default)
    {
        options ??= new();
        string full = Path.GetFullPath(destination);
        // A name no other export can have: a process ID repeats (across containers, after a crash that left the file).
        string temp = ScratchFile.Beside(full);
        try
        {
            VmSnapshotResult result;
            using (var file = OpenOutputFile(temp, options.Direct))
            {
                result = ReadSnapshot(imagePath, snapshot, options, (reader, length) =>
                {
                    using var backend = VmStateBackend.ForBlockDevice(file);
                    using var writer = new VmStateWriter(backend, options.WriterOptions());
                    var info = MigrationStream.Parse(reader, length, null, writer, Format(options), ramBytesDone, cancellationToken);
                    writer.Close();
                    return (info, writer.Mode);
                });
                file.Flush();
            }
            File.Move(temp, full, overwrite: true);
            return result;
        }
        finally
        {
            File.Delete(temp);
        }
    }

    /// <summary>As <see cref="Export(string, string, string, VmSnapshotOptions?, IProgress{long}?, CancellationToken)"/>, writing to a pipe or other stream (e.g. stdout).</summary>
    public static VmSnapshotResult Export(string imagePath, string snapshot, Stream destination, VmSnapshotOptions? options = null,
        IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default)
    {
        options ??= new();
        if (options.MappedRam) throw new OperationRefusedException("a mapped-ram file is laid out by offset: export it to a file, not a pipe");
        return ReadSnapshot(imagePath, snapshot, options, (reader, length) =>
        {
            using var backend = VmStateBackend.ForStream(destination, leaveOpen: true);
            using var writer = new VmStateWriter(backend, options.WriterOptions());
            var info = MigrationStream.Parse(reader, length, null, writer, MigrationStreamFormat.Plain, ramBytesDone, cancellationToken);
            writer.Close();
            destination.Flush();
            return (info, writer.Mode);
        });
    }

    /// <summary>Says what snapshot <paramref name="snapshot"/>'s VM state holds: machine, sections, RAM blocks, devices.</summary>
    public static VmSnapshotResult Inspect(string imagePath, string snapshot, VmSnapshotOptions? options = null, CancellationToken cancellationToken = default) =>
        ReadSnapshot(imagePath, snapshot, options ?? new(), (reader, length) =>
            (MigrationStream.Parse(reader, length, cancellationToken: cancellationToken), (VmStateWriteMode?)null));

    private static MigrationStreamFormat Format(VmSnapshotOptions options) =>
        options.MappedRam ? MigrationStreamFormat.MappedRam : MigrationStreamFormat.Plain;

    /// <summary>Says what a migration stream file holds.</summary>
    public static MigrationStreamInfo InspectStream(string path, CancellationToken cancellationToken = default)
    {
        using var file = FileBlockDevice.Open(path);
        using var backend = VmStateBackend.ForBlockDevice(file);
        using var reader = new VmStateReader(backend, ReadBufferSize);
        return MigrationStream.Inspect(reader, cancellationToken);
    }

    /// <summary>Says what a migration stream read from a pipe or other stream holds.</summary>
    public static MigrationStreamInfo InspectStream(Stream source, CancellationToken cancellationToken = default)
    {
        using var backend = VmStateBackend.ForStream(source, leaveOpen: true);
        using var reader = new VmStateReader(backend, ReadBufferSize);
        return MigrationStream.Inspect(reader, cancellationToken);
    }

    /// <summary>
    /// The save path shared by save and import: stream into the active VM-state area, make it durable, then
    /// create the snapshot; on any failure free what was written so the image is as it was.
    /// <paramref name="wrapBackend"/> wraps the area's backend (the tests' fault injection).
    /// </summary>
    internal static VmSnapshotResult WriteSnapshot(string imagePath, string name, VmSnapshotOptions options,
        Func<VmStateWriter, MigrationStreamInfo> produce, Func<VmStateBackend, VmStateBackend>? wrapBackend = null, PostcopyIndexRecorder? index = null)
    {
        if (string.IsNullOrEmpty(name)) throw new OperationRefusedException("a snapshot needs a name (TAG)");
        if (options.ForceShare) throw new OperationRefusedException("ForceShare is only for reading; a save writes the image");
        var clock = Stopwatch.StartNew();
        Qcow2Image image = OpenImage(imagePath, writable: true, options);
        VmSnapshotResult result;
        try
        {
            result = WriteSnapshot(image, imagePath, name, options, produce, wrapBackend, index, clock);
        }
        catch
        {
            // Closing flushes; if that fails too, the error that stopped the save is still the one reported.
            try
            {
                image.Dispose();
            }
            catch (Exception e) when (e is VmsnapException or IOException)
            {
                // A consequence of the first failure, or a new one that must not hide it.
            }
            throw;
        }
        image.Dispose();
        return result;
    }

    private static VmSnapshotResult WriteSnapshot(Qcow2Image image, string imagePath, string name, VmSnapshotOptions options,
        Func<VmStateWriter, MigrationStreamInfo> produce, Func<VmStateBackend, VmStateBackend>? wrapBackend, PostcopyIndexRecorder? index, Stopwatch clock)
    {
        try
        {
            Qcow2Image.CheckSnapshotName(name);   // before the stream is written, not after
        }
        catch (ArgumentException e)
        {
            throw new OperationRefusedException($"'{imagePath}': {e.Message}", e);
        }
        if (image.FindSnapshot(name) is { } existing)
            throw new SnapshotExistsException(name, existing.Id, imagePath, existing.Name == name
                ? $"'{imagePath}' already has a snapshot named '{name}' (ID {existing.Id}); delete it first or choose another name"
                : $"'{imagePath}' already has a snapshot with ID '{name}' (named '{existing.Name}'); a name equal to another snapshot's ID would make lookups ambiguous: choose another name");

        using var area = image.OpenVmStateAreaForWriting();
        bool committed = false;
        try
        {
            MigrationStreamInfo info;
            long size;
            VmStateWriteMode mode;
            using (var areaBackend = VmStateBackend.ForBlockDevice(area))
            using (var backend = wrapBackend?.Invoke(areaBackend) ?? areaBackend)
            using (var writer = new VmStateWriter(backend, options.WriterOptions()))
            {
                mode = writer.Mode;
                info = produce(writer);
                writer.Close();
                size = writer.BytesTransferred;
            }
            // The postcopy index goes past the stream before the snapshot exists: the snapshot never points to a missing one.
            byte[] pointer = index is null ? [] : RecordIndex(index, size, image.Info.ClusterSize, area);
            area.Flush();
            var snapshot = image.CreateSnapshot(name, new Qcow2SnapshotCreateOptions { VmStateSize = size, ExtraData = pointer });
            committed = true;
            return new VmSnapshotResult(imagePath, new VmSnapshotId(snapshot.Id, snapshot.Name), size, info.RamBytes,
                clock.Elapsed.TotalSeconds, mode, info);
        }
        finally
        {
            if (!committed) FreeVmState(area, image);
        }
    }

    /// <summary>The postcopy index past the stream; a failure to write it leaves the snapshot without one (loadvm --postcopy scans it then).</summary>
    private static byte[] RecordIndex(PostcopyIndexRecorder index, long size, int clusterSize, Qcow2VmStateArea area)
    {
        try
        {
            return RecordedPostcopyIndex.Record(index, size, clusterSize, area.Read, area.Write)?.Pointer ?? [];
        }
        catch (Exception e) when (e is VmsnapException or IOException)
        {
            return [];
        }
    }

    private static void FreeVmState(IBlockDevice area, Qcow2Image image)
    {
        try
        {
            area.Discard(0, area.Length);
            image.Flush();
        }
        catch (Exception e) when (e is VmsnapException or IOException)
        {
            // The failure that brought us here is the one to report; what could not be freed is at worst a leak.
        }
    }

    /// <summary>
    /// The read path shared by load, export and inspect. The reader sees the snapshot's whole VM-state area and is
    /// told the recorded size: a plain stream ends there, a mapped-ram one (QEMU 10.2 savevm) reaches further.
    /// </summary>
    private static VmSnapshotResult ReadSnapshot(string imagePath, string snapshotName, VmSnapshotOptions options,
        Func<VmStateReader, long, (MigrationStreamInfo Info, VmStateWriteMode? Mode)> consume)
    {
        var clock = Stopwatch.StartNew();
        using Qcow2Image image = OpenImage(imagePath, writable: false, options);
        var snapshot = image.FindSnapshot(snapshotName)
            ?? throw new SnapshotNotFoundException(snapshotName, imagePath);
        if (snapshot.VmStateSize == 0)
            throw new OperationRefusedException($"snapshot '{snapshot.Name}' (ID {snapshot.Id}) of '{imagePath}' has no VM state (it is a disk-only snapshot)");
        using var area = image.OpenVmStateAreaForReading(snapshot, wholeArea: true);
        using var backend = VmStateBackend.ForBlockDevice(area);
        using var reader = new VmStateReader(backend, ReadBufferSize);
        var (info, mode) = consume(reader, snapshot.VmStateSize);
        return new VmSnapshotResult(imagePath, new VmSnapshotId(snapshot.Id, snapshot.Name), snapshot.VmStateSize, info.RamBytes,
            clock.Elapsed.TotalSeconds, mode, info) { HasPostcopyIndex = RecordedPostcopyIndex.HasPointer(image.GetSnapshotExtraData(snapshot)) };
    }

    /// <summary>Opens the image with O_DIRECT when asked and the file system allows it, else through the page cache.</summary>
    private static Qcow2Image OpenImage(string path, bool writable, VmSnapshotOptions options)
    {
        var open = new Qcow2OpenOptions { ReadOnly = !writable, Direct = options.Direct, ForceShare = options.ForceShare };
        if (!options.Direct) return Qcow2Image.Open(path, open);
        try
        {
            return Qcow2Image.Open(path, open);
        }
        catch (StorageException e) when (e.IsInvalidArgument) // no O_DIRECT on this file system (tmpfs)
        {
            return Qcow2Image.Open(path, open with { Direct = false });
        }
    }

    private static FileBlockDevice OpenOutputFile(string path, bool direct)
    {
        var create = new FileBlockDeviceOptions { Create = true, Exclusive = true, Direct = direct };
        if (!direct) return FileBlockDevice.Open(path, create);
        try
        {
            return FileBlockDevice.Open(path, create);
        }
        catch (StorageException e) when (e.IsInvalidArgument)
        {
            File.Delete(path);
            return FileBlockDevice.Open(path, create with { Direct = false });
        }
    }
}
