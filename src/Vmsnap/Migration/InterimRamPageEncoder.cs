using System.Text;
using Vmsnap.VmState;

namespace Vmsnap.Migration;

/// <summary>
/// Stand-in for the VmState work's <c>RamPageEncoder</c> (same members, same bytes) until that lands:
/// encodes 4 KiB pages as QEMU's RAM records — be64 (offset | flags), the block id when the block
/// changes, then the page (PAGE) or a single 0 byte (ZERO).
/// </summary>
internal sealed class InterimRamPageEncoder(VmStateWriter writer)
{
    private const int PageSize = MigrationFormat.PageSize;

    private string? _block;
    private byte[] _blockId = [];

    /// <summary>Pages encoded, zero pages included (as RamPageEncoder counts them).</summary>
    public long Pages { get; private set; }

    /// <summary>Zero-page records written.</summary>
    public long ZeroPages { get; private set; }

    /// <summary>The next page names its block again (as the first page of a section part should).</summary>
    public void ResetBlock() => _block = null;

    /// <summary>
    /// Encodes <paramref name="pages"/> (a multiple of 4096 bytes) of block <paramref name="blockId"/>
    /// starting at <paramref name="blockOffset"/>. Data pages are handed over by reference
    /// (<see cref="VmStateWriter.PutBufferAsync"/>); <paramref name="mayFree"/> rides with the last of
    /// them, or is disposed at once when every page was zero.
    /// </summary>
    public void EncodePages(string blockId, long blockOffset, ReadOnlyMemory<byte> pages, IDisposable? mayFree = null)
    {
        if (pages.Length % PageSize != 0)
            throw new ArgumentException($"{pages.Length} bytes is not a whole number of 4096-byte pages", nameof(pages));
        if (blockOffset % PageSize != 0)
            throw new ArgumentException($"block offset {blockOffset} is not page-aligned", nameof(blockOffset));
        int count = pages.Length / PageSize;
        ReadOnlySpan<byte> span = pages.Span;

        // First the zero test for every page, so the last data page (which carries mayFree) is known.
        Span<bool> zero = count <= 4096 ? stackalloc bool[count] : new bool[count];
        int lastData = -1;
        for (int i = 0; i < count; i++)
        {
            zero[i] = span.Slice(i * PageSize, PageSize).IndexOfAnyExcept((byte)0) < 0;
            if (!zero[i]) lastData = i;
        }

        for (int i = 0; i < count; i++)
        {
            ulong header = (ulong)(blockOffset + (long)i * PageSize) | (zero[i] ? MigrationFormat.RamZero : MigrationFormat.RamPage);
            bool named = !ReferenceEquals(blockId, _block) && blockId != _block;
            if (!named) header |= MigrationFormat.RamContinue;
            writer.PutBe64(header);
            if (named)
            {
                _block = blockId;
                _blockId = Encoding.UTF8.GetBytes(blockId);
                writer.PutByte((byte)_blockId.Length);
                writer.PutBuffer(_blockId);
            }
            if (zero[i])
            {
                writer.PutByte(0);
                ZeroPages++;
            }
            else
            {
                writer.PutBufferAsync(pages.Slice(i * PageSize, PageSize), i == lastData ? mayFree : null);
            }
            Pages++;
        }
        if (lastData < 0) mayFree?.Dispose();
    }
}
