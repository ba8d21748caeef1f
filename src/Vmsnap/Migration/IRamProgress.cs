namespace Vmsnap.Migration;

/// <summary>
/// A receiver of RAM progress (bytes of guest RAM done) that also wants the stream's total RAM size,
/// so a display can show a fraction. Reads (load, export, import, copy) learn the total only from the
/// stream's block list (MEM_SIZE) and report it through <see cref="ReportTotal"/> as soon as it is
/// read, before any page; a plain <see cref="IProgress{T}"/> gets the bytes only.
/// </summary>
/// <remarks>
/// A stream may carry a page more than once (QEMU re-sends pages dirtied during a live migration),
/// so the bytes done can pass the total.
/// </remarks>
public interface IRamProgress : IProgress<long>
{
    /// <summary>The stream's total RAM in bytes (the sum of its RAM blocks' lengths).</summary>
    void ReportTotal(long ramBytes);
}
