using System.Runtime.InteropServices;

namespace Vmsnap.Cli;

/// <summary>
/// Bytes a file takes on disk (st_blocks × 512), what qemu-img reports as actual-size. .NET has no
/// API for it, so statx(2), whose layout is the same on every Linux architecture.
/// </summary>
internal static partial class FileAllocation
{
    private const int AtFdCwd = -100;
    private const uint StatxBlocks = 0x400;
    private const int StatxSize = 256;
    private const int BlocksOffset = 48;

    [LibraryImport("libc", EntryPoint = "statx", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static unsafe partial int Statx(int dirfd, string path, int flags, uint mask, byte* buffer);

    /// <summary>Allocated bytes of the file, or null when the system cannot tell (qemu-img then leaves actual-size out).</summary>
    internal static unsafe long? AllocatedBytes(string path)
    {
        if (!OperatingSystem.IsLinux()) return null;
        byte* buffer = stackalloc byte[StatxSize];
        try
        {
            if (Statx(AtFdCwd, path, 0, StatxBlocks, buffer) != 0) return null;
        }
        catch (EntryPointNotFoundException)
        {
            return null;   // a C library older than statx
        }
        if ((*(uint*)buffer & StatxBlocks) == 0) return null;
        return (long)(*(ulong*)(buffer + BlocksOffset) * 512);
    }
}
