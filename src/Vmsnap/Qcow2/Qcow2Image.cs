using Vmsnap.Storage;
using Vmsnap.Storage.LowLevel;

namespace Vmsnap.Qcow2;

/// <summary>
/// A qcow2 image file, read and written exactly as QEMU does: versions 2 and 3, cluster sizes
/// from 512 bytes to 2 MiB, every refcount width, extended L2 entries, zero and compressed
/// clusters, backing files. Safe for concurrent calls; writes are crash-safe (a crash can leak
/// clusters, never corrupt data that was flushed).
/// </summary>
public sealed partial class Qcow2Image : IDisposable
{
    private Qcow2Image(Qcow2Engine engine) => Engine = engine;

    /// <summary>The engine, for internal layers built on top (snapshots, VM state).</summary>
    internal Qcow2Engine Engine { get; }

    /// <summary>
    /// Creates a new image at <paramref name="path"/> (replacing an existing file unless
    /// <see cref="Qcow2CreateOptions.FailIfExists"/>) and returns it open for reading and writing.
    /// </summary>
    /// <param name="path">File to create.</param>
    /// <param name="virtualSize">Size of the virtual disk in bytes (a multiple of 512).</param>
    /// <param name="options">Cluster size, refcount width, version, features, backing file; defaults as qemu-img.</param>
    public static Qcow2Image Create(string path, long virtualSize, Qcow2CreateOptions? options = null)
    {
        options ??= new Qcow2CreateOptions();
        // Refuse bad options and a missing backing file before an existing file is replaced.
        Qcow2Engine.BuildHeader(virtualSize, options);
        if (options.BackingFile is { } backing)
        {
            string resolved = System.IO.Path.IsPathRooted(backing)
                ? backing
                : System.IO.Path.Combine(System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(path)) ?? ".", backing);
            if (!File.Exists(resolved)) throw new OperationRefusedException($"backing file '{backing}' of '{path}' does not exist ({resolved})");
        }
        var device = OpenLocked(path, new FileBlockDeviceOptions { Create = true, Exclusive = options.FailIfExists, Lock = ImageLockMode.Write });
        var image = new Qcow2Image(Qcow2Engine.Create(device, path, virtualSize, options, ownsDevice: true));
        if (options.BackingFile is null) return image;
        // Reopen so that the backing chain is opened (and validated) like any other open.
        image.Dispose();
        return Open(path);
    }

    /// <summary>
    /// Opens an existing image, locked the way QEMU locks its images: writable opens refuse an image
    /// another process (a running QEMU) uses and keep others from writing it while open; read-only
    /// opens refuse an image someone writes; <see cref="Qcow2OpenOptions.ForceShare"/> reads it anyway.
    /// </summary>
    /// <param name="path">The image file.</param>
    /// <param name="options">Read-only, O_DIRECT, backing file handling; default: read and write, backing chain opened.</param>
    /// <exception cref="ImageInUseException">Another process holds the image in a conflicting way (a running QEMU, say).</exception>
    public static Qcow2Image Open(string path, Qcow2OpenOptions? options = null)
    {
        options ??= new Qcow2OpenOptions();
        bool readOnly = options.ReadOnly || options.ForceShare;
        ImageLockMode lockMode = options.ForceShare ? ImageLockMode.ForceShare : readOnly ? ImageLockMode.Read : ImageLockMode.Write;
        var device = OpenLocked(path, new FileBlockDeviceOptions { Writable = !readOnly, Direct = options.Direct, Lock = lockMode });
        return new Qcow2Image(Qcow2Engine.Open(device, path, options, ownsDevice: true));
    }

    /// <summary>
    /// Opens an image file with its lock, trying again for a moment when the lock is held: a lock
    /// this process dropped can outlive its descriptor while another thread starts a child process
    /// (the child holds a copy of the descriptor until it runs its program). A real holder, such as
    /// a running QEMU, still gets the error.
    /// </summary>
    internal static FileBlockDevice OpenLocked(string path, FileBlockDeviceOptions options)
    {
        for (int attempt = 0; ; attempt++)
        {
            try
            {
                return FileBlockDevice.Open(path, options);
            }
            catch (ImageInUseException) when (attempt < 10)
            {
                Thread.Sleep(20);
            }
        }
    }

    /// <summary>Opens an image on any block device (tests, in-memory images).</summary>
    internal static Qcow2Image Open(IBlockDevice device, string name, Qcow2OpenOptions? options = null) =>
        new(Qcow2Engine.Open(device, name, options ?? new Qcow2OpenOptions(), ownsDevice: false));

    /// <summary>Creates an image on any block device (tests, in-memory images).</summary>
    internal static Qcow2Image Create(IBlockDevice device, string name, long virtualSize, Qcow2CreateOptions? options = null) =>
        new(Qcow2Engine.Create(device, name, virtualSize, options ?? new Qcow2CreateOptions(), ownsDevice: false));

    /// <summary>Path of the image file.</summary>
    public string Path => Engine.State.Path;

    /// <summary>Size of the virtual disk in bytes.</summary>
    public long VirtualSize => Engine.State.VirtualSize;

    /// <summary>Cluster size in bytes.</summary>
    public int ClusterSize => Engine.State.Geometry.ClusterSize;

    /// <summary>True when the image was opened read-only.</summary>
    public bool IsReadOnly => Engine.State.ReadOnly;

    /// <summary>The image's settings as stored in its header, and its file size.</summary>
    public Qcow2ImageInfo Info
    {
        get
        {
            lock (Engine.SyncRoot)
            {
                Engine.ThrowIfDisposed();
                return Describe(Engine.State);
            }
        }
    }

    private static Qcow2ImageInfo Describe(Qcow2State engine)
    {
        Qcow2Header h = engine.Header;
        return new Qcow2ImageInfo
        {
            Path = engine.Path,
            Version = h.Version,
            VirtualSize = (long)h.Size,
            ClusterSize = h.ClusterSize,
            RefcountBits = h.RefcountBits,
            LazyRefcounts = h.HasLazyRefcounts,
            ExtendedL2 = h.HasExtendedL2,
            Corrupt = h.IsCorrupt,
            Dirty = h.IsDirty,
            CompressionType = (Qcow2CompressionType)h.CompressionType,
            BackingFile = h.BackingFile,
            BackingFormat = h.BackingFormat,
            L1Size = (int)h.L1Size,
            SnapshotCount = (int)h.SnapshotCount,
            FileSize = engine.Device.Length,
            IncompatibleFeatures = h.IncompatibleFeatures,
            CompatibleFeatures = h.CompatibleFeatures,
            AutoclearFeatures = h.AutoclearFeatures,
            Bitmaps = DescribeBitmaps(engine),
        };
    }

    private static IReadOnlyList<Qcow2BitmapInfo> DescribeBitmaps(Qcow2State engine)
    {
        Qcow2Header h = engine.Header;
        // Without the autoclear bit a program unaware of bitmaps wrote the image: QEMU ignores the extension.
        if (h.FindExtension(HeaderExtension.Bitmaps) is not { } ext || (h.AutoclearFeatures & Qcow2Header.AutoclearBitmaps) == 0) return [];
        if (BitmapDirectory.ParseExtension(ext.Data).Count == 0) return [];
        BitmapDirectory dir = BitmapDirectory.Read(engine.Device, ext.Data, engine.Device.Length);
        return dir.Entries.Select(e => new Qcow2BitmapInfo
        {
            Name = e.Name,
            Granularity = e.GranularityBits is >= 9 and <= 31
                ? 1L << e.GranularityBits
                : throw new Qcow2FormatException($"bitmap '{e.Name}'", dir.DirectoryOffset, $"granularity of 2^{e.GranularityBits} bytes (QEMU allows 2^9 to 2^31)", engine.Path),
            InUse = (e.Flags & BitmapDirectory.FlagInUse) != 0,
            Auto = (e.Flags & BitmapDirectory.FlagAuto) != 0,
        }).ToArray();
    }

    /// <summary>Reads <paramref name="buffer"/>.Length bytes of the virtual disk at <paramref name="offset"/> (any alignment).</summary>
    public void Read(Span<byte> buffer, long offset)
    {
        CheckRange(offset, buffer.Length);
        try
        {
            Engine.ReadGuest(buffer, offset);
        }
        catch (Exception e) when (Engine.NoteFailure(e))
        {
            throw;
        }
    }

    /// <summary>Writes <paramref name="buffer"/> to the virtual disk at <paramref name="offset"/> (any alignment).</summary>
    public void Write(ReadOnlySpan<byte> buffer, long offset)
    {
        CheckRange(offset, buffer.Length);
        try
        {
            Engine.WriteGuest(buffer, offset);
        }
        catch (Exception e) when (Engine.NoteFailure(e))
        {
            throw;
        }
    }

    /// <summary>Makes a range read as zeroes: whole clusters become zero clusters (their storage is freed), partial ones get zero bytes.</summary>
    public void WriteZeroes(long offset, long length)
    {
        CheckRange(offset, length);
        Run(() => Engine.ZeroOrDiscard(offset, length, discard: false));
    }

    /// <summary>
    /// Frees the storage of the whole clusters in a range. They read as zeroes afterwards (with a
    /// backing file in a version 2 image, where that cannot be expressed, nothing is discarded).
    /// </summary>
    public void Discard(long offset, long length)
    {
        CheckRange(offset, length);
        Run(() => Engine.ZeroOrDiscard(offset, length, discard: true));
    }

    /// <summary>Makes all completed writes durable (metadata in crash-safe order, then a device flush).</summary>
    public void Flush() => Run(Engine.Flush);

    /// <summary>
    /// Checks the image like <c>qemu-img check</c> and repairs what <paramref name="repair"/> allows
    /// (which needs the image open for writing). After repairs it checks again and reports that
    /// result together with the numbers repaired, as qemu-img does.
    /// </summary>
    public Qcow2CheckResult Check(Qcow2RepairMode repair = Qcow2RepairMode.None) => Run(() => Engine.Check(repair));

    /// <summary>
    /// Opens the image at <paramref name="path"/> the way <c>qemu-img check</c> does and checks it: the
    /// snapshot table and what only the check judges (tables past the end of the file, no refcount
    /// table) do not refuse the open but are reported, and a dirty image is not repaired first.
    /// </summary>
    /// <param name="path">The image file.</param>
    /// <param name="repair">What to repair; anything but <see cref="Qcow2RepairMode.None"/> opens the image for writing.</param>
    /// <param name="forceShare">Check an image another process may be writing (read-only checks only, like qemu-img's <c>--force-share</c>).</param>
    /// <exception cref="ArgumentException"><paramref name="forceShare"/> with a repair.</exception>
    /// <exception cref="ImageInUseException">Another process holds the image in a conflicting way.</exception>
    public static Qcow2CheckResult Check(string path, Qcow2RepairMode repair = Qcow2RepairMode.None, bool forceShare = false)
    {
        if (forceShare && repair != Qcow2RepairMode.None) throw new ArgumentException("forceShare is only for reading; a repair writes the image", nameof(forceShare));
        var options = repair == Qcow2RepairMode.None
            ? new Qcow2OpenOptions { ReadOnly = true, ForceShare = forceShare, OpenBackingFile = false, ForCheck = true }
            : new Qcow2OpenOptions { OpenBackingFile = false, SkipDirtyRepair = true, ForCheck = true };
        using Qcow2Image image = Open(path, options);
        return image.Check(repair);
    }

    /// <summary>Flushes and closes the image (and its backing chain).</summary>
    public void Dispose() => Engine.Dispose();

    /// <summary>Runs an engine call, noting an I/O failure that reaches the caller (see <see cref="Qcow2Engine.NoteFailure"/>).</summary>
    internal void Run(Action action)
    {
        try
        {
            action();
        }
        catch (Exception e) when (Engine.NoteFailure(e))
        {
            throw;
        }
    }

    /// <inheritdoc cref="Run(Action)"/>
    internal T Run<T>(Func<T> action)
    {
        try
        {
            return action();
        }
        catch (Exception e) when (Engine.NoteFailure(e))
        {
            throw;
        }
    }

    private void CheckRange(long offset, long length)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(offset);
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        if (offset > Engine.State.VirtualSize - length)
            throw new ArgumentOutOfRangeException(nameof(offset), offset, $"range of {length} bytes at offset {offset} lies beyond the virtual disk ({Engine.State.VirtualSize} bytes)");
    }

    /// <summary>One past the highest cluster the image's refcounts say is in use, in bytes (low-level: where a detached VM-state area may be planned from).</summary>
    public long UsedEnd() => Engine.UsedEnd();

    /// <summary>True when the image keeps persistent dirty bitmaps (which the engine does not maintain, so it refuses to write such an image).</summary>
    public bool HasPersistentBitmaps
    {
        get
        {
            lock (Engine.SyncRoot)
                return Engine.State.Header.FindExtension(HeaderExtension.Bitmaps) is not null && (Engine.State.Header.AutoclearFeatures & Qcow2Header.AutoclearBitmaps) != 0;
        }
    }
}
