namespace Vmsnap.Migration;

/// <summary>How a copy lays out the RAM of the stream it writes.</summary>
public enum MigrationStreamFormat
{
    /// <summary>
    /// A plain stream (PAGE and ZERO records), what savevm writes into a snapshot and <c>-incoming</c> reads: a plain
    /// source is copied byte for byte, a mapped-ram source is rewritten.
    /// </summary>
    Plain,

    /// <summary>
    /// A mapped-ram file (QEMU 9.0+, <c>migrate-incoming file:PATH</c> with capability mapped-ram, optionally multifd and
    /// direct-io): each block's pages at 1 MiB-aligned offsets, zero pages left out, the bitmaps written last.
    /// </summary>
    MappedRam,
}
