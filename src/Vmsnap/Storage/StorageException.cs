namespace Vmsnap.Storage;

/// <summary>An I/O failure of a block device: the message names the call and the file; <see cref="ErrorCode"/> is the errno when there is one.</summary>
public sealed class StorageException : VmsnapException
{
    /// <summary>Creates the error.</summary>
    public StorageException(string message, int errorCode = 0, Exception? inner = null) : base(message, inner) => ErrorCode = errorCode;

    /// <summary>The operating system's error number (errno), or 0.</summary>
    public int ErrorCode { get; }

    /// <summary>True when the device ran out of space (ENOSPC).</summary>
    public bool IsOutOfSpace => ErrorCode == NativeFile.ENOSPC;

    /// <summary>True for EINVAL: what opening a file with O_DIRECT gets on a file system without it (tmpfs).</summary>
    public bool IsInvalidArgument => ErrorCode == NativeFile.EINVAL;
}
