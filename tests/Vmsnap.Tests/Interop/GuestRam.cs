using System.Security.Cryptography;

namespace Vmsnap.Tests.Interop;

/// <summary>Synthetic guest RAM for interop tests: a seeded mix of random, text-like and zero pages.</summary>
internal static class GuestRam
{
    public const int PageSize = 4096;

    /// <summary>
    /// Writes <paramref name="bytes"/> of RAM to <paramref name="path"/>: each page is random (about 40%),
    /// text-like (about 30%: printable words with runs of spaces) or all zero (about 30%, written as holes),
    /// chosen by <paramref name="seed"/>. Returns the number of all-zero pages.
    /// </summary>
    public static long Create(string path, long bytes, int seed)
    {
        var random = new Random(seed);
        byte[] page = new byte[PageSize];
        long zeroPages = 0;
        using var file = new FileStream(path, FileMode.Create, FileAccess.Write);
        file.SetLength(bytes);
        for (long offset = 0; offset < bytes; offset += PageSize)
        {
            int kind = random.Next(10);
            if (kind < 3)
            {
                zeroPages++;
                continue; // a hole reads back as zeroes
            }
            if (kind < 7)
            {
                random.NextBytes(page);
                page[random.Next(PageSize)] |= 1; // never all-zero by chance
            }
            else
            {
                FillText(page, random);
            }
            file.Position = offset;
            file.Write(page);
        }
        return zeroPages;
    }

    private static void FillText(byte[] page, Random random)
    {
        const string letters = "etaoinshrdlucmfwypvbgkjqxz";
        int i = 0;
        while (i < page.Length)
        {
            int word = random.Next(1, 12);
            for (int k = 0; k < word && i < page.Length; k++) page[i++] = (byte)letters[random.Next(letters.Length)];
            int spaces = random.Next(1, 3) == 1 ? random.Next(1, 40) : 1;
            for (int k = 0; k < spaces && i < page.Length; k++) page[i++] = (byte)' ';
            if (i < page.Length && random.Next(20) == 0) page[i++] = (byte)'\n';
        }
    }

    /// <summary>SHA-256 of a file, hex.</summary>
    public static string Hash(string path)
    {
        using var f = File.OpenRead(path);
        return Hash(f);
    }

    /// <summary>SHA-256 of what an open stream reads from its position on, hex (a file held open across a load).</summary>
    public static string Hash(Stream stream) => Convert.ToHexString(SHA256.HashData(stream));

    /// <summary>Counts all-zero 4 KiB pages of a file by looking at every byte (independent of the code under test).</summary>
    public static long CountZeroPages(string path)
    {
        byte[] page = new byte[PageSize];
        long zero = 0;
        using var f = File.OpenRead(path);
        while (true)
        {
            int got = 0;
            while (got < PageSize)
            {
                int n = f.Read(page, got, PageSize - got);
                if (n == 0) break;
                got += n;
            }
            if (got == 0) break;
            bool allZero = true;
            for (int i = 0; i < got; i++)
                if (page[i] != 0) { allZero = false; break; }
            if (allZero) zero++;
            if (got < PageSize) break;
        }
        return zero;
    }
}
