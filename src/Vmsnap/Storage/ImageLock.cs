using Microsoft.Win32.SafeHandles;
using Vmsnap.Storage.LowLevel;

namespace Vmsnap.Storage;

/// <summary>
/// QEMU's image locking (block/file-posix.c), so vmsnap and QEMU see each other: open-file-description
/// byte-range locks where byte 100+i means "holds permission i" and byte 200+i means "does not let
/// others take permission i". Permissions: 0 consistent read, 1 write, 2 write-unchanged, 3 resize.
/// </summary>
internal static class ImageLock
{
    private const long PermBase = 100, SharedBase = 200;

    [Flags]
    private enum Perm
    {
        ConsistentRead = 1, Write = 2, WriteUnchanged = 4, Resize = 8,
        All = ConsistentRead | Write | WriteUnchanged | Resize,
    }

    private static readonly string[] s_names = ["consistent read", "write", "write unchanged", "resize"];

    /// <summary>
    /// Takes the locks for <paramref name="mode"/> on <paramref name="handle"/>, then checks nobody else's
    /// locks conflict (QEMU's order: apply, then test). Locks live as long as the descriptor.
    /// </summary>
    internal static void Acquire(SafeFileHandle handle, string path, ImageLockMode mode)
    {
        (Perm perm, Perm shared) = mode switch
        {
            ImageLockMode.None => ((Perm)0, Perm.All),
            ImageLockMode.ForceShare => (Perm.ConsistentRead, Perm.All),
            ImageLockMode.Read => (Perm.ConsistentRead, Perm.All & ~(Perm.Write | Perm.Resize)),
            // What a running QEMU takes on a writable qcow2 drive (seen in /proc/locks): read, write, resize held; write, resize not shared.
            _ => (Perm.ConsistentRead | Perm.Write | Perm.Resize, Perm.All & ~(Perm.Write | Perm.Resize)),
        };
        if (mode == ImageLockMode.None) return;

        for (int i = 0; i < 4; i++)
        {
            var p = (Perm)(1 << i);
            if ((perm & p) != 0) NativeFile.TrySetOfdLock(handle, PermBase + i, 1, NativeFile.LockKind.Read);
            if ((shared & p) == 0) NativeFile.TrySetOfdLock(handle, SharedBase + i, 1, NativeFile.LockKind.Read);
        }
        for (int i = 0; i < 4; i++)
        {
            var p = (Perm)(1 << i);
            if ((perm & p) != 0 && NativeFile.IsOfdLockHeldElsewhere(handle, SharedBase + i, 1, NativeFile.LockKind.Write))
                throw Conflict(handle, path, $"another process forbids \"{s_names[i]}\" access");
            if ((shared & p) == 0 && NativeFile.IsOfdLockHeldElsewhere(handle, PermBase + i, 1, NativeFile.LockKind.Write))
                throw Conflict(handle, path, $"another process has \"{s_names[i]}\" access");
        }
    }

    private static ImageInUseException Conflict(SafeFileHandle handle, string path, string why)
    {
        NativeFile.TrySetOfdLock(handle, PermBase, 4, NativeFile.LockKind.Unlock);
        NativeFile.TrySetOfdLock(handle, SharedBase, 4, NativeFile.LockKind.Unlock);
        return new ImageInUseException($"'{path}' is in use: {why} (is a QEMU process using the image?)");
    }
}
