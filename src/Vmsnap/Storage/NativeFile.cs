using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace Vmsnap.Storage;

/// <summary>Thin Linux system-call layer: the calls .NET's file API does not offer (O_DIRECT, fdatasync, hole punching, OFD locks).</summary>
internal static partial class NativeFile
{
    private const int O_RDONLY = 0, O_RDWR = 2, O_CREAT = 0x40, O_EXCL = 0x80, O_CLOEXEC = 0x80000;

    // O_DIRECT differs between architectures.
    private static int O_DIRECT => RuntimeInformation.ProcessArchitecture is Architecture.Arm64 or Architecture.Arm ? 0x10000 : 0x4000;

    private const int FALLOC_FL_KEEP_SIZE = 1, FALLOC_FL_PUNCH_HOLE = 2;
    internal const int EINTR = 4, EAGAIN = 11, EACCES = 13, EINVAL = 22, EFBIG = 27, ENOSPC = 28, EOPNOTSUPP = 95;

    [LibraryImport("libc", EntryPoint = "open", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int open(string path, int flags, int mode);

    [LibraryImport("libc", SetLastError = true)]
    private static partial int fdatasync(int fd);

    [LibraryImport("libc", SetLastError = true)]
    private static partial int fallocate(int fd, int mode, long offset, long len);

    [LibraryImport("libc", EntryPoint = "fcntl", SetLastError = true)]
    private static partial int fcntl_lock(int fd, int cmd, ref FLock lck);

    [StructLayout(LayoutKind.Sequential)]
    private struct FLock
    {
        public short Type;
        public short Whence;
        public long Start;
        public long Len;
        public int Pid;
    }

    internal static SafeFileHandle Open(string path, bool writable, bool direct, bool create, bool exclusive = false)
    {
        int flags = (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC;
        if (direct) flags |= O_DIRECT;
        if (create) flags |= O_CREAT;
        if (exclusive) flags |= O_EXCL;
        int fd;
        do fd = open(path, flags, Convert.ToInt32("644", 8));
        while (fd < 0 && Marshal.GetLastPInvokeError() == EINTR);
        if (fd < 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            throw new StorageException($"cannot open '{path}'{(direct ? " with O_DIRECT" : "")}: {Marshal.GetPInvokeErrorMessage(errno)}", errno);
        }
        return new SafeFileHandle(fd, ownsHandle: true);
    }

    internal static void DataSync(SafeFileHandle handle, string path)
    {
        int rc;
        do rc = fdatasync(Fd(handle));
        while (rc < 0 && Marshal.GetLastPInvokeError() == EINTR);
        if (rc < 0) throw Error("fdatasync", path);
    }

    /// <summary>Punches a hole; false when the file system cannot.</summary>
    internal static bool PunchHole(SafeFileHandle handle, long offset, long length, string path)
    {
        if (fallocate(Fd(handle), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0) return true;
        int errno = Marshal.GetLastPInvokeError();
        if (errno is EOPNOTSUPP or EINVAL) return false;
        throw Error("fallocate(PUNCH_HOLE)", path, errno);
    }

    /// <summary>Allocates blocks for a range (growing the file if it ends before); false when the file system cannot.</summary>
    internal static bool Allocate(SafeFileHandle handle, long offset, long length, string path)
    {
        if (fallocate(Fd(handle), 0, offset, length) == 0) return true;
        int errno = Marshal.GetLastPInvokeError();
        if (errno is EOPNOTSUPP or EINVAL) return false;
        throw Error("fallocate", path, errno);
    }

    internal enum LockKind : short { Read = 0, Write = 1, Unlock = 2 }

    private const int F_OFD_GETLK = 36, F_OFD_SETLK = 37;

    /// <summary>Takes or drops an open-file-description byte-range lock without waiting; false if another holder conflicts.</summary>
    internal static bool TrySetOfdLock(SafeFileHandle handle, long start, long length, LockKind kind)
    {
        var l = new FLock { Type = (short)kind, Whence = 0, Start = start, Len = length };
        if (fcntl_lock(Fd(handle), F_OFD_SETLK, ref l) == 0) return true;
        int errno = Marshal.GetLastPInvokeError();
        if (errno is EAGAIN or EACCES) return false;
        throw new StorageException($"fcntl(F_OFD_SETLK) failed: {Marshal.GetPInvokeErrorMessage(errno)}", errno);
    }

    /// <summary>True when some other open file description holds a lock on the range that conflicts with <paramref name="kind"/>.</summary>
    internal static bool IsOfdLockHeldElsewhere(SafeFileHandle handle, long start, long length, LockKind kind)
    {
        var l = new FLock { Type = (short)kind, Whence = 0, Start = start, Len = length };
        if (fcntl_lock(Fd(handle), F_OFD_GETLK, ref l) != 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            throw new StorageException($"fcntl(F_OFD_GETLK) failed: {Marshal.GetPInvokeErrorMessage(errno)}", errno);
        }
        return l.Type != (short)LockKind.Unlock;
    }

    private static int Fd(SafeFileHandle handle) => (int)handle.DangerousGetHandle();

    private static StorageException Error(string call, string path, int errno = -1)
    {
        if (errno < 0) errno = Marshal.GetLastPInvokeError();
        return new StorageException($"{call} on '{path}' failed: {Marshal.GetPInvokeErrorMessage(errno)}", errno);
    }
}
