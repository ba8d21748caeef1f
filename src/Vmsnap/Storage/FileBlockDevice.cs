using Microsoft.Win32.SafeHandles;

namespace Vmsnap.Storage.LowLevel;

/// <summary>How a file is locked against other users, the way QEMU locks its images.</summary>
public enum ImageLockMode
{
    /// <summary>No locks taken or checked.</summary>
    None,

    /// <summary>Read, tolerating writers (like qemu-img's --force-share): only conflicts with a holder that forbids readers.</summary>
    ForceShare,

    /// <summary>Read while forbidding writers (like a read-only QEMU drive or qemu-img info): fails if someone writes.</summary>
    Read,

    /// <summary>Read and write, forbidding other writers (like a running QEMU's drive): fails if anyone else reads consistently with write or writes.</summary>
    Write,
}

/// <summary>How to open a <see cref="FileBlockDevice"/>.</summary>
public sealed record FileBlockDeviceOptions
{
    /// <summary>Open for reading and writing (default: read-only).</summary>
    public bool Writable { get; init; }

    /// <summary>Create the file if it does not exist (implies <see cref="Writable"/>).</summary>
    public bool Create { get; init; }

    /// <summary>Fail if the file exists (with <see cref="Create"/>).</summary>
    public bool Exclusive { get; init; }

    /// <summary>
    /// Bypass the page cache (O_DIRECT) for requests whose offset, length and memory are aligned to
    /// <see cref="DirectAlignment"/>; other requests go through the page cache on a second descriptor.
    /// </summary>
    public bool Direct { get; init; }

    /// <summary>Alignment used for direct I/O (default 4096, safe for every disk).</summary>
    public int DirectAlignment { get; init; } = 4096;

    /// <summary>QEMU-compatible image locking to take on open (default: none).</summary>
    public ImageLockMode Lock { get; init; }
}

/// <summary>A regular file (or block device node) as an <see cref="IBlockDevice"/>: pread/pwrite, fdatasync, hole punching, optional O_DIRECT.</summary>
public sealed class FileBlockDevice : IBlockDevice
{
    private readonly SafeFileHandle _handle;
    private readonly SafeFileHandle? _direct;
    private readonly int _alignment;

    /// <summary>
    /// Called before every mutating operation (write, flush, resize, discard, preallocation) of a writable
    /// file device, process-wide; null, and so free, unless a test sets it. The kill tests set it from a .NET
    /// startup hook they load into a real vmsnap process (tests/Vmsnap.Tests/Snapshots/KillHook.cs), to stop
    /// the process before its Nth such operation and kill it exactly there.
    /// </summary>
    internal static Action? BeforeMutatingIo;

    private FileBlockDevice(string path, SafeFileHandle handle, SafeFileHandle? direct, bool readOnly, int alignment)
    {
        Path = path;
        _handle = handle;
        _direct = direct;
        IsReadOnly = readOnly;
        _alignment = alignment;
    }

    /// <summary>Opens (or creates) a file.</summary>
    public static FileBlockDevice Open(string path, FileBlockDeviceOptions? options = null)
    {
        options ??= new FileBlockDeviceOptions();
        bool writable = options.Writable || options.Create;
        SafeFileHandle handle = NativeFile.Open(path, writable, direct: false, options.Create, options.Exclusive);
        SafeFileHandle? direct = null;
        try
        {
            if (options.Direct) direct = NativeFile.Open(path, writable, direct: true, create: false);
            ImageLock.Acquire(handle, path, options.Lock);
        }
        catch
        {
            direct?.Dispose();
            handle.Dispose();
            throw;
        }
        return new FileBlockDevice(path, handle, direct, !writable, options.Direct ? options.DirectAlignment : 1);
    }

    /// <summary>The file's path.</summary>
    public string Path { get; }

    /// <inheritdoc/>
    public long Length => RandomAccess.GetLength(_handle);

    /// <inheritdoc/>
    public bool IsReadOnly { get; }

    /// <inheritdoc/>
    public int Alignment => _alignment;

    /// <summary>True when O_DIRECT is in use for aligned requests.</summary>
    public bool IsDirect => _direct is not null;

    private SafeFileHandle Pick(ReadOnlySpan<byte> memory, long offset) =>
        _direct is not null && AlignedBuffer.IsAligned(memory, offset, _alignment) ? _direct : _handle;

    /// <inheritdoc/>
    public int Read(Span<byte> buffer, long offset)
    {
        SafeFileHandle h = Pick(buffer, offset);
        int total = 0;
        try
        {
            while (total < buffer.Length)
            {
                int n = RandomAccess.Read(h, buffer[total..], offset + total);
                if (n == 0) break;
                total += n;
                // A short direct read ends at EOF; finish on the cached descriptor (alignment may be lost).
                h = _handle;
            }
        }
        catch (IOException e)
        {
            throw new StorageException($"read of {buffer.Length} bytes at offset {offset} of '{Path}' failed: {e.Message}", e.HResult & 0xffff, e);
        }
        return total;
    }

    /// <inheritdoc/>
    public void Write(ReadOnlySpan<byte> buffer, long offset)
    {
        ThrowIfReadOnly();
        BeforeMutatingIo?.Invoke();
        try
        {
            RandomAccess.Write(Pick(buffer, offset), buffer, offset);
        }
        catch (IOException e)
        {
            throw new StorageException($"write of {buffer.Length} bytes at offset {offset} of '{Path}' failed: {e.Message}", e.HResult & 0xffff, e);
        }
    }

    /// <inheritdoc/>
    public ValueTask<int> ReadAsync(Memory<byte> buffer, long offset, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        return BlockingIo.Run(() => Read(buffer.Span, offset));
    }

    /// <inheritdoc/>
    public ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, long offset, CancellationToken cancellationToken = default)
    {
        ThrowIfReadOnly();
        cancellationToken.ThrowIfCancellationRequested();
        return BlockingIo.Run(() => Write(buffer.Span, offset));   // counted by Write (BeforeMutatingIo)
    }

    /// <inheritdoc/>
    public void Flush()
    {
        if (IsReadOnly) return;
        BeforeMutatingIo?.Invoke();
        NativeFile.DataSync(_handle, Path);
    }

    /// <inheritdoc/>
    public void SetLength(long length)
    {
        ThrowIfReadOnly();
        BeforeMutatingIo?.Invoke();
        try
        {
            RandomAccess.SetLength(_handle, length);
        }
        catch (IOException e)
        {
            throw new StorageException($"resizing '{Path}' to {length} bytes failed: {e.Message}", e.HResult & 0xffff, e);
        }
        catch (ArgumentOutOfRangeException e) when (length >= 0)
        {
            // .NET reports EFBIG (a length past what the file system allows) this way.
            throw new StorageException($"resizing '{Path}' to {length} bytes failed: the file system does not allow a file that large", NativeFile.EFBIG, e);
        }
    }

    /// <inheritdoc/>
    public void Discard(long offset, long length)
    {
        ThrowIfReadOnly();
        if (length <= 0) return;
        long end = Math.Min(offset + length, Length);
        if (end <= offset) return;
        BeforeMutatingIo?.Invoke();
        if (NativeFile.PunchHole(_handle, offset, end - offset, Path)) return;
        // No hole punching here: zero the range so it still reads back as zeroes.
        byte[] zeros = new byte[(int)Math.Min(end - offset, 1 << 20)];
        for (long pos = offset; pos < end; pos += zeros.Length)
            Write(zeros.AsSpan(0, (int)Math.Min(zeros.Length, end - pos)), pos);
    }

    /// <summary>
    /// Allocates disk blocks for a range, growing the file if needed (fallocate): later O_DIRECT
    /// writes there run in parallel where writes that extend a file or fill holes are serialized
    /// (ext4). False when the file system cannot preallocate; nothing changes then.
    /// </summary>
    public bool Preallocate(long offset, long length)
    {
        ThrowIfReadOnly();
        if (length <= 0) return false;
        BeforeMutatingIo?.Invoke();
        return NativeFile.Allocate(_handle, offset, length, Path);
    }

    private void ThrowIfReadOnly()
    {
        if (IsReadOnly) throw new StorageException($"'{Path}' is open read-only");
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        _direct?.Dispose();
        _handle.Dispose();
    }
}
