namespace Vmsnap.Qcow2;

// QEMU's metadata overlap check before each repair write (the engine's, MetadataOverlap, with the
// image's overlap-check setting): a repair write that would land on metadata is refused, and the
// image is marked corrupt.
internal sealed partial class Qcow2Checker
{
    /// <summary>The metadata a write of [offset, offset + size) would hit, in QEMU's words, or null.</summary>
    private string? Overlap(Qcow2Metadata ignore, long offset, long size)
    {
        Qcow2Metadata hit = _overlaps.Find(offset, size, ignore);
        return hit == Qcow2Metadata.None ? null : MetadataOverlap.Name(hit);
    }
}
