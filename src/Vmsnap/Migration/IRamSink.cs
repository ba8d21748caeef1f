namespace Vmsnap.Migration;

/// <summary>
/// Receives the RAM of a migration stream while <see cref="MigrationStream.Read"/> parses it: the
/// block list first, then runs of pages in stream order (a later record for the same page replaces
/// an earlier one, as when QEMU re-sends a page dirtied during migration), then completion.
/// </summary>
/// <remarks>
/// Runs are batched by the reader: consecutive pages of one block arrive in one call. Calls come in
/// stream order from one thread. <see cref="Complete"/> is called only after the whole stream,
/// device state included, was read without error; a sink that is disposed without it must leave its
/// targets as they were.
/// </remarks>
public interface IRamSink
{
    /// <summary>The stream's RAM blocks (its MEM_SIZE list), before any page. Throw here to refuse a stream whose blocks do not match.</summary>
    void BeginBlocks(IReadOnlyList<RamBlockInfo> blocks);

    /// <summary>
    /// Page data for consecutive pages of block <paramref name="block"/> (an index into the list given to
    /// <see cref="BeginBlocks"/>) starting at byte <paramref name="offset"/> of the block. The length is a
    /// multiple of 4096; the memory is valid only during the call.
    /// </summary>
    void WritePages(int block, long offset, ReadOnlySpan<byte> pages);

    /// <summary>Zero pages: <paramref name="length"/> bytes (a multiple of 4096) of block <paramref name="block"/> from <paramref name="offset"/> are zero.</summary>
    void WriteZeroPages(int block, long offset, long length);

    /// <summary>The whole stream was read: make the result final.</summary>
    void Complete();
}
