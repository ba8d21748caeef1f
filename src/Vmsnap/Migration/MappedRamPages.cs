namespace Vmsnap.Migration;

/// <summary>
/// The RAM of a mapped-ram stream, which lies outside its record sequence: each block's bitmap and pages at the
/// offsets its header gave (from the stream's start). Read as placed runs, block by block, when the stream's first
/// RAM part comes.
/// </summary>
/// <param name="input">The stream (positional).</param>
/// <param name="start">Where the stream starts in its backend.</param>
/// <param name="ram">The RAM section's start, with where each block's bitmap and pages lie.</param>
/// <param name="skippedBytes">Bytes of bitmaps, padding and pages the stream jumped over after the block headers.</param>
/// <param name="bitmapBytes">Bytes of the bitmaps.</param>
/// <param name="pageData">Read the pages with data (false: runs without data).</param>
internal sealed class MappedRamPages(StreamInput input, long start, RamStartRecord ram, long skippedBytes, long bitmapBytes, bool pageData)
{
    private ChunkPool? _chunks;

    /// <summary>True once the pages were handed out.</summary>
    public bool Delivered { get; private set; }

    /// <summary>Bytes of bitmaps, padding and pages the stream jumps over.</summary>
    public long SkippedBytes => skippedBytes;

    /// <summary>What QEMU counts for them: the bitmaps, and the pages with data once they were read.</summary>
    public long CountedBytes { get; private set; } = bitmapBytes;

    /// <summary>
    /// Block by block: the bitmap, then the runs of pages with data (read where they lie, in chunks whose memory a
    /// writer may take over) and of zero pages; then back to where the stream goes on.
    /// </summary>
    public IEnumerable<MigrationRecord> Records()
    {
        Delivered = true;
        long resume = input.Position;
        for (int b = 0; b < ram.Blocks.Count; b++)
        {
            RamBlockInfo block = ram.Blocks[b];
            long pageCount = block.Length / MigrationFormat.PageSize;
            var (bitmapOffset, pagesOffset) = ram.Placements![b];
            input.Seek(start + bitmapOffset);
            byte[] bitmapBytes = new byte[RamBitmap.ByteLength(block.Length)];
            input.Bytes(bitmapBytes, $"the bitmap of RAM block '{block.Id}'");
            ulong[] bitmap = RamBitmap.Parse(bitmapBytes, pageCount);
            CountedBytes += RamBitmap.CountSet(bitmap) * MigrationFormat.PageSize;
            foreach (var (first, count, data) in RamBitmap.Runs(bitmap, pageCount))
            {
                long offset = first * MigrationFormat.PageSize, length = count * MigrationFormat.PageSize;
                long at = start + pagesOffset + offset;
                if (!data)
                {
                    yield return new RamZeroPagesRecord(at, 0, b, offset, length, false, true);
                    continue;
                }
                if (!pageData)
                {
                    yield return new RamPagesRecord(at, length, b, offset, length, false, true, at, MigrationFormat.PageSize, default);
                    continue;
                }
                input.Seek(at);
                _chunks ??= new ChunkPool(MigrationStreamWriter.DefaultChunkBytes);
                for (long done = 0; done < length;)
                {
                    int n = (int)Math.Min(_chunks.ChunkBytes, length - done);
                    ChunkPool.Chunk chunk = _chunks.Rent();
                    input.Bytes(chunk.Buffer.AsSpan(0, n), $"pages of RAM block '{block.Id}'");
                    yield return new RamPagesRecord(at + done, n, b, offset + done, n, false, true, at + done, MigrationFormat.PageSize,
                        chunk.Buffer.AsMemory(0, n), chunk);
                    done += n;
                }
            }
        }
        input.Seek(resume);
    }
}
