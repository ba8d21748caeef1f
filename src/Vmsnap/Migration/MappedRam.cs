using System.Buffers.Binary;
using System.Numerics;

namespace Vmsnap.Migration;

/// <summary>
/// QEMU's mapped-ram layout (9.0+, capability <c>mapped-ram</c>): RAM placed by file offset instead of
/// sent as page records. Each RAM block's entry in the block list (id string, length) is followed by
/// a header, and the stream continues after the block's pages; the pages and the bitmap live at the
/// offsets the header gives.
/// </summary>
/// <remarks>
/// Header, big-endian, 28 bytes: u32 version (1), u64 page size, u64 bitmap offset, u64 pages offset.
/// QEMU puts the bitmap right after the header and the pages at the next 1 MiB boundary after the
/// bitmap; page N of the block is at pages offset + N × page size. The bitmap has one bit per page,
/// set for a page whose bytes were written, clear for a zero page (never written); it is made of the
/// source host's <c>unsigned long</c> words, read here as little-endian 64-bit words (x86-64 and
/// AArch64 hosts). Offsets count from the start of the file (QEMU 9.0–10.1 <c>migrate file:</c>) or of
/// the VM-state area (QEMU 10.2 savevm): position 0 of the stream.
/// </remarks>
internal static class MappedRam
{
    public const uint HeaderVersion = 1;
    public const int HeaderBytes = 28;

    /// <summary>QEMU's alignment of each block's pages in the file (MAPPED_RAM_FILE_OFFSET_ALIGNMENT).</summary>
    public const long PagesAlignment = 1 << 20;

    /// <summary>Bytes of a block's bitmap: whole 64-bit words, one bit per page.</summary>
    public static long BitmapBytes(long blockLength) => (blockLength / MigrationFormat.PageSize + 63) / 64 * 8;

    /// <summary>Where QEMU puts a block's pages when its bitmap starts at <paramref name="bitmapOffset"/>.</summary>
    public static long PagesOffsetFor(long bitmapOffset, long blockLength)
    {
        long end = bitmapOffset + BitmapBytes(blockLength);
        return (end + PagesAlignment - 1) / PagesAlignment * PagesAlignment;
    }

    public static void WriteHeader(Span<byte> header, long bitmapOffset, long pagesOffset)
    {
        BinaryPrimitives.WriteUInt32BigEndian(header, HeaderVersion);
        BinaryPrimitives.WriteUInt64BigEndian(header[4..], MigrationFormat.PageSize);
        BinaryPrimitives.WriteUInt64BigEndian(header[12..], (ulong)bitmapOffset);
        BinaryPrimitives.WriteUInt64BigEndian(header[20..], (ulong)pagesOffset);
    }

    /// <summary>A block's bitmap as words (bit N of the block = bit N % 64 of word N / 64).</summary>
    public static ulong[] ParseBitmap(ReadOnlySpan<byte> bytes, long pages)
    {
        var words = new ulong[(pages + 63) / 64];
        for (int i = 0; i < words.Length; i++) words[i] = BinaryPrimitives.ReadUInt64LittleEndian(bytes[(i * 8)..]);
        // Bits past the block's last page mean nothing.
        if (pages % 64 != 0) words[^1] &= (1UL << (int)(pages % 64)) - 1;
        return words;
    }

    public static byte[] BitmapToBytes(ulong[] words)
    {
        byte[] bytes = new byte[words.Length * 8L];
        for (int i = 0; i < words.Length; i++) BinaryPrimitives.WriteUInt64LittleEndian(bytes.AsSpan(i * 8), words[i]);
        return bytes;
    }

    public static bool IsSet(ulong[] words, long page) => (words[page >> 6] & (1UL << (int)(page & 63))) != 0;

    public static void Set(ulong[] words, long page) => words[page >> 6] |= 1UL << (int)(page & 63);

    public static void Clear(ulong[] words, long page) => words[page >> 6] &= ~(1UL << (int)(page & 63));

    public static long CountSet(ulong[] words)
    {
        long n = 0;
        foreach (ulong w in words) n += BitOperations.PopCount(w);
        return n;
    }

    /// <summary>True when no page in [<paramref name="from"/>, <paramref name="to"/>) has its bit set.</summary>
    public static bool NoneSet(ulong[] words, long from, long to)
    {
        for (long p = from; p < to; p++)
            if (IsSet(words, p)) return false;
        return true;
    }

    /// <summary>The runs of equal bits of a block's bitmap in page order: (first page, page count, set).</summary>
    public static IEnumerable<(long First, long Count, bool Set)> Runs(ulong[] words, long pages)
    {
        long start = 0;
        while (start < pages)
        {
            bool set = IsSet(words, start);
            long end = start + 1;
            while (end < pages)
            {
                // Whole words of the same bit at a time.
                if ((end & 63) == 0 && end + 64 <= pages && words[end >> 6] == (set ? ulong.MaxValue : 0))
                {
                    end += 64;
                    continue;
                }
                if (IsSet(words, end) != set) break;
                end++;
            }
            yield return (start, end - start, set);
            start = end;
        }
    }
}
