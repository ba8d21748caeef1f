using System.Diagnostics;
using System.Globalization;
using Vmsnap.Qcow2;

namespace Vmsnap.Bench;

/// <summary>
/// What the metadata overlap check costs on its own: <c>overlap --image PATH</c> opens an image
/// (read-only) and times the check every write makes (QEMU's qcow2_check_metadata_overlap, in the
/// image's "cached" set, or --check none/constant/all) on --count (1,000,000) host ranges of --size
/// (1 MiB) spread over the file, and prints the time per check, its share of a save of --total
/// (2 GiB) written in pieces of --size (one check per piece), and how many ranges hit metadata.
/// </summary>
internal static class OverlapBench
{
    internal static int Run(string[] args)
    {
        var o = new Dictionary<string, string>();
        for (int i = 0; i < args.Length; i++)
        {
            if (!args[i].StartsWith("--", StringComparison.Ordinal) || i + 1 >= args.Length) return Usage($"unexpected '{args[i]}'");
            o[args[i][2..]] = args[++i];
        }
        if (!o.TryGetValue("image", out string? path)) return Usage("--image is required");
        long size = Size(o.GetValueOrDefault("size", "1M"));
        long total = Size(o.GetValueOrDefault("total", "2G"));
        int count = int.Parse(o.GetValueOrDefault("count", "1000000"), CultureInfo.InvariantCulture);
        Qcow2OverlapCheck check = Enum.Parse<Qcow2OverlapCheck>(o.GetValueOrDefault("check", "cached"), ignoreCase: true);
        using var image = Qcow2Image.Open(path, new Qcow2OpenOptions { ReadOnly = true, ForceShare = true, OpenBackingFile = false, OverlapCheck = check });
        MetadataOverlap overlaps = image.Engine.State.Overlaps;
        long file = image.Engine.State.Device.Length;
        var rng = new Random(1);
        long[] offsets = new long[4096];
        for (int i = 0; i < offsets.Length; i++) offsets[i] = rng.NextInt64(0, Math.Max(1, file - size)) & ~4095L;
        int hits = 0;
        for (int i = 0; i < 100_000; i++) if (overlaps.Find(offsets[i & 4095], size, Qcow2Metadata.None) != Qcow2Metadata.None) hits++;   // warm-up
        hits = 0;
        var clock = Stopwatch.StartNew();
        lock (image.Engine.SyncRoot)
            for (int i = 0; i < count; i++) if (overlaps.Find(offsets[i & 4095], size, Qcow2Metadata.None) != Qcow2Metadata.None) hits++;
        double ns = clock.Elapsed.TotalNanoseconds / count;
        long checks = (total + size - 1) / size;
        Console.WriteLine($"image {path}: {file >> 20} MiB, {image.Snapshots.Count} snapshots, check {check}");
        Console.WriteLine($"{ns:0.0} ns per check of {size} bytes ({hits} of {count} ranges hit metadata); "
            + $"a save of {total >> 20} MiB in {size >> 10} KiB writes makes {checks} checks: {checks * ns / 1e6:0.000} ms");
        return 0;
    }

    private static long Size(string s)
    {
        long m = char.ToUpperInvariant(s[^1]) switch { 'K' => 1L << 10, 'M' => 1L << 20, 'G' => 1L << 30, _ => 1 };
        return long.Parse(m == 1 ? s : s[..^1], CultureInfo.InvariantCulture) * m;
    }

    private static int Usage(string problem)
    {
        Console.Error.WriteLine($"Vmsnap.Bench overlap: {problem}; usage: overlap --image PATH [--size 1M] [--total 2G] [--count 1000000] [--check cached|none|constant|all]");
        return 2;
    }
}
