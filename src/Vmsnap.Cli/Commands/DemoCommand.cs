using System.CommandLine;
using System.Diagnostics;
using Vmsnap.Qcow2;

namespace Vmsnap.Cli.Commands;

/// <summary>
/// The built-in demonstration (no arguments): makes an image in a temporary folder, writes seeded
/// random data at several offsets (unaligned ones and one across an L2-table boundary), reads it
/// back, verifies it, checks the image and prints the result. Exit code 0 when all of that holds.
/// </summary>
internal static class DemoCommand
{
    private const long VirtualSize = 1L << 30;

    internal static Command Build()
    {
        var command = new Command("demo", "Run the built-in demonstration on a temporary folder (no arguments needed)");
        var json = Cli.JsonOption();
        var keep = new Option<bool>("--keep") { Description = "Keep the temporary folder and the image" };
        command.Options.Add(json);
        command.Options.Add(keep);
        command.SetHandler((parse, ct) =>
        {
            bool asJson = parse.GetValue(json);
            string dir = Path.Combine(Path.GetTempPath(), "vmsnap-demo-" + Guid.NewGuid().ToString("N")[..8]);
            Directory.CreateDirectory(dir);
            try
            {
                DemoResult result = Run(Path.Combine(dir, "demo.qcow2"), asJson ? null : Console.Out);
                if (asJson) Cli.WriteJson(result);
                if (!result.Verified) Console.Error.WriteLine("vmsnap: demo failed: data read back differs from what was written");
                else if (!result.CheckClean) Console.Error.WriteLine("vmsnap: demo failed: the image check found problems");
                return result.Verified && result.CheckClean ? Cli.ExitOk : Cli.ExitFailure;
            }
            finally
            {
                if (parse.GetValue(keep)) Console.Error.WriteLine($"vmsnap: kept {dir}");
                else Directory.Delete(dir, recursive: true);
            }
        });
        return command;
    }

    internal sealed record DemoWrite(long Offset, int Length);

    internal sealed record DemoResult(string Image, long VirtualSize, int ClusterSize, IReadOnlyList<DemoWrite> Writes, long BytesWritten,
        double WriteSeconds, double ReadSeconds, bool Verified, bool CheckClean, int Corruptions, int Leaks, long FileSize);

    internal static DemoResult Run(string path, TextWriter? log)
    {
        // Aligned and unaligned writes, one across the 512 MiB boundary between the first two L2 tables
        // (64 KiB clusters), one ending at the last byte of the disk.
        DemoWrite[] writes =
        [
            new(0, 4 << 20),
            new(12_345, 100_000),
            new((512L << 20) - 3_000, 10_000),
            new((700L << 20) + 1, 1),
            new((800L << 20) + 511, 3 * 65_536 + 7),
            new(VirtualSize - 70_000, 70_000),
        ];
        var random = new Random(20240601);
        var data = writes.Select(w => { byte[] b = new byte[w.Length]; random.NextBytes(b); return b; }).ToArray();
        long total = writes.Sum(w => (long)w.Length);

        log?.WriteLine($"Creating {path} ({Cli.FormatSize(VirtualSize)} virtual, 64 KiB clusters)");
        var clock = Stopwatch.StartNew();
        using (var image = Qcow2Image.Create(path, VirtualSize))
        {
            for (int i = 0; i < writes.Length; i++)
            {
                image.Write(data[i], writes[i].Offset);
                log?.WriteLine($"  wrote {writes[i].Length,9} bytes at offset {writes[i].Offset}");
            }
            image.Flush();
        }
        double writeSeconds = clock.Elapsed.TotalSeconds;

        clock.Restart();
        bool verified = true;
        Qcow2CheckResult check;
        long fileSize;
        using (var image = Qcow2Image.Open(path, new Qcow2OpenOptions { ReadOnly = true }))
        {
            // The last writes win where ranges overlap: build the expected bytes per range in order.
            for (int i = 0; i < writes.Length; i++)
            {
                byte[] back = new byte[writes[i].Length];
                image.Read(back, writes[i].Offset);
                byte[] expected = Expected(writes, data, i);
                if (!back.AsSpan().SequenceEqual(expected)) verified = false;
            }
            byte[] gap = new byte[65_536];
            image.Read(gap, 600L << 20);   // never written: must read as zeroes
            if (gap.Any(b => b != 0)) verified = false;
            check = image.Check();
            fileSize = image.Info.FileSize;
        }
        double readSeconds = clock.Elapsed.TotalSeconds;
        log?.WriteLine($"Read back and compared {total} bytes: {(verified ? "identical" : "DIFFERENT")}");
        log?.WriteLine($"Check: {(check.IsClean ? "no errors, no leaks" : $"{check.Corruptions} corruptions, {check.Leaks} leaks, {check.CheckErrors} errors")}; " +
                       $"{check.AllocatedClusters}/{check.TotalClusters} clusters allocated, file {Cli.FormatSize(fileSize)}");
        log?.WriteLine($"Write {writeSeconds * 1000:0.0} ms, read+verify+check {readSeconds * 1000:0.0} ms");
        return new DemoResult(path, VirtualSize, 65_536, writes, total, writeSeconds, readSeconds, verified, check.IsClean,
            check.Corruptions, check.Leaks, fileSize);
    }

    private static byte[] Expected(DemoWrite[] writes, byte[][] data, int index)
    {
        DemoWrite w = writes[index];
        byte[] expected = (byte[])data[index].Clone();
        for (int j = index + 1; j < writes.Length; j++)
        {
            long from = Math.Max(w.Offset, writes[j].Offset), to = Math.Min(w.Offset + w.Length, writes[j].Offset + writes[j].Length);
            if (from < to) data[j].AsSpan((int)(from - writes[j].Offset), (int)(to - from)).CopyTo(expected.AsSpan((int)(from - w.Offset)));
        }
        return expected;
    }
}
