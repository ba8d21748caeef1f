using Vmsnap.Storage;
using Vmsnap.Storage.LowLevel;
using Vmsnap.Qcow2.LowLevel;

namespace Vmsnap.Qcow2;

/// <summary>
/// Gives stretches of an image file disk blocks before a VM-state area's writes fill them: O_DIRECT
/// writes that extend a file or fill holes are serialized by ext4, writes into allocated blocks run in
/// parallel (as fio's preallocated file does). Shared by the VM-state area the engine writes
/// (<see cref="VmStateAllocation"/>) and the detached one (<see cref="DetachedVmStateArea"/>).
/// </summary>
internal sealed class Preallocation
{
    /// <summary>How far ahead of the writes blocks are given at a time.</summary>
    internal const long AheadBytes = 64L << 20;

    private bool _unsupported;

    /// <summary>Gives file bytes [<paramref name="from"/>, <paramref name="to"/>) disk blocks (growing the file); does nothing once the file system said it cannot.</summary>
    internal void Allocate(FileBlockDevice file, long from, long to)
    {
        if (_unsupported || to <= from) return;
        if (!file.Preallocate(from, to - from)) _unsupported = true;
    }

    /// <summary>True once the file system said it cannot preallocate.</summary>
    internal bool Unsupported => _unsupported;
}
