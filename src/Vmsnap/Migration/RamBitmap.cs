using System.Buffers.Binary;
using System.Numerics;

namespace Vmsnap.Migration;

/// <summary>
/// A mapped-ram block's bitmap (QEMU 9.0+, capability <c>mapped-ram</c>): one bit per page, set for a page whose bytes
/// were written, clear for a zero page (never written). It is made of the source host's <c>unsigned long</c> words,
/// read here as little-endian 64-bit words (x86-64 and AArch64 hosts). The headers that say where a block's bitmap and
/// pages lie are read and written with the other records' fixed parts (<see cref="RecordHeaders"/>).
/// </summary>
internal static class RamBitmap
{
    /// <summary>Bytes of a block's bitmap: whole 64-bit words, one bit per page.</summary>
    public static long ByteLength(long blockLength) => (blockLength / MigrationFormat.PageSize + 63) / 64 * 8;

    /// <summary>A block's bitmap as words (bit N of the block = bit N % 64 of word N / 64).</summary>
    public static ulong[] Parse(ReadOnlySpan<byte> bytes, long pages)
    {
        var words = new ulong[(pages + 63) / 64];
        for (int i = 0; i < words.Length; i++) words[i] = BinaryPrimitives.ReadUInt64LittleEndian(bytes[(i * 8)..]);
        // Bits past the block's last page mean nothing.
        if (pages % 64 != 0) words[^1] &= (1UL << (int)(pages % 64)) - 1;
        return words;
    }

    public static byte[] ToBytes(ulong[] words)
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
