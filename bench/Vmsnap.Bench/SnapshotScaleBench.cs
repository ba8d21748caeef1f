using System.Diagnostics;
using System.Globalization;
using Vmsnap.Qcow2;

namespace Vmsnap.Bench;

/// <summary>
/// Builds and dirties the large image of the snapshot-scale benchmark (bench/snapshot-scale.sh);
/// the timed operations are the real tools (vmsnap, qemu-img, QEMU) run by the script.
/// <c>build</c>: a qcow2 image of --size (default 1 TiB) with --snapshots snapshots (64) and
/// --written bytes (8 GiB) of data spread over the whole disk, written in as many rounds, one
/// snapshot after each: round r writes 64 KiB clusters into --tables L2 ranges (256 of the
/// 2048 a 1 TiB disk has with 64 KiB clusters), a different set each round, so every range
/// gets data and each round leaves only its own tables to copy on the next write.
/// <c>dirty</c>: writes --bytes (64 MiB) the same way into --tables random ranges, so the next
/// snapshot create finds that many active L2 tables with COPIED entries to fix.
/// <c>used</c>: prints the bytes of host clusters in use (refcount above 0).
/// </summary>
internal static class SnapshotScaleBench
{
    internal static int Run(string[] args)
    {
        if (args.Length == 0 || args[0] is not ("build" or "dirty" or "used")) return Usage("build, dirty or used");
        var o = new Dictionary<string, string>();
        for (int i = 1; i < args.Length; i++)
        {
            if (!args[i].StartsWith("--", StringComparison.Ordinal) || i + 1 >= args.Length) return Usage($"unexpected '{args[i]}'");
            o[args[i][2..]] = args[++i];
        }
        if (!o.TryGetValue("image", out string? image)) return Usage("--image is required");
        int tables = int.Parse(o.GetValueOrDefault("tables", "256"), CultureInfo.InvariantCulture);
        int seed = int.Parse(o.GetValueOrDefault("seed", "1"), CultureInfo.InvariantCulture);
        if (args[0] == "used")
        {
            Console.WriteLine(UsedBytes(image).ToString(CultureInfo.InvariantCulture));
            return 0;
        }
        var clock = Stopwatch.StartNew();
        if (args[0] == "build")
        {
            long size = ParseSize(o.GetValueOrDefault("size", "1T"));
            int snapshots = int.Parse(o.GetValueOrDefault("snapshots", "64"), CultureInfo.InvariantCulture);
            long written = ParseSize(o.GetValueOrDefault("written", "8G"));
            using (Qcow2Image.Create(image, size)) { }
            using var img = Qcow2Image.Open(image);
            long perRound = written / snapshots;
            for (int r = 0; r < snapshots; r++)
            {
                Write(img, perRound, tables, seed * 1000 + r, firstTable: (long)r * tables);
                img.CreateSnapshot($"s{r}");
                if (r % 8 == 7) Console.Error.WriteLine($"snapshot-scale build: {r + 1}/{snapshots} snapshots, {clock.Elapsed.TotalSeconds:0}s");
            }
        }
        else
        {
            using var img = Qcow2Image.Open(image);
            Write(img, ParseSize(o.GetValueOrDefault("bytes", "64M")), tables, seed, firstTable: -1);
        }
        Console.Error.WriteLine($"snapshot-scale {args[0]}: {clock.Elapsed.TotalSeconds:0.0}s");
        return 0;
    }

    /// <summary>
    /// Writes <paramref name="bytes"/> as 64 KiB pieces into <paramref name="tables"/> L2 ranges:
    /// consecutive ones from <paramref name="firstTable"/> (wrapping), or random ones when it is -1,
    /// at random cluster-aligned places inside each.
    /// </summary>
    private static void Write(Qcow2Image img, long bytes, int tables, int seed, long firstTable)
    {
        var random = new Random(seed);
        const int Piece = 64 << 10;
        byte[] data = new byte[Piece];
        long bytesPerL2 = (long)img.ClusterSize * (img.ClusterSize / 8);
        long ranges = (img.VirtualSize + bytesPerL2 - 1) / bytesPerL2;
        long pieces = bytes / Piece;
        for (long p = 0; p < pieces; p++)
        {
            long t = firstTable < 0 ? random.NextInt64(ranges) : (firstTable + p % tables) % ranges;
            long within = Math.Min(bytesPerL2, img.VirtualSize - t * bytesPerL2) / Piece;
            long offset = t * bytesPerL2 + random.NextInt64(within) * Piece;
            random.NextBytes(data);
            img.Write(data, offset);
        }
        img.Flush();
    }

    /// <summary>Bytes of the host clusters in use (refcount above 0): what the image holds, whatever holes its file has.</summary>
    private static long UsedBytes(string image)
    {
        using var img = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true, ForceShare = true });
        Qcow2Engine e = img.Engine;
        long clusters = e.State.Geometry.ClustersFor(e.State.Device.Length), used = 0;
        lock (e.SyncRoot)
        {
            var reader = new RefcountManager.Reader(e.Refcounts);
            for (long c = 0; c < clusters; c++) if (reader.Get(c) > 0) used++;
        }
        return used * e.State.Geometry.ClusterSize;
    }

    private static long ParseSize(string s)
    {
        long m = char.ToUpperInvariant(s[^1]) switch { 'K' => 1L << 10, 'M' => 1L << 20, 'G' => 1L << 30, 'T' => 1L << 40, _ => 1 };
        return long.Parse(m == 1 ? s : s[..^1], CultureInfo.InvariantCulture) * m;
    }

    private static int Usage(string problem)
    {
        Console.Error.WriteLine($"snapshot-scale: {problem}");
        Console.Error.WriteLine("usage: Vmsnap.Bench snapshot-scale build --image PATH [--size 1T] [--snapshots 64] [--written 8G] [--tables 256] [--seed 1]");
        Console.Error.WriteLine("       Vmsnap.Bench snapshot-scale dirty --image PATH [--bytes 64M] [--tables 256] [--seed 1]");
        Console.Error.WriteLine("       Vmsnap.Bench snapshot-scale used --image PATH   (bytes of host clusters in use)");
        return 2;
    }
}
