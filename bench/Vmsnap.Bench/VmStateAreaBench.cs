using System.Diagnostics;
using System.Globalization;
using Vmsnap.Qcow2;
using Vmsnap.Storage;
using Vmsnap.VmState;

namespace Vmsnap.Bench;

/// <summary>
/// One run of the qcow2 VM-state area benchmark: --total bytes of random data (from a reused
/// pool) written by the buffered VM-state writer (K x B aligned buffers, asynchronous positional
/// writes) into <see cref="Qcow2Image.OpenVmStateAreaForWriting"/> of a fresh qcow2 image, timed from
/// the open to the end of <see cref="Qcow2VmStateArea.Flush"/> (data and metadata durable); then
/// the snapshot create is timed on its own, and the VM state is read back through the snapshot's
/// area with the read-ahead reader. Prints one tab-separated line.
/// </summary>
internal static class VmStateAreaBench
{
    internal static int Run(string[] args)
    {
        var o = new Dictionary<string, string>();
        for (int i = 0; i < args.Length; i++)
        {
            if (!args[i].StartsWith("--", StringComparison.Ordinal)) return Usage($"unexpected '{args[i]}'");
            string key = args[i][2..];
            if (key == "help") return Usage("options");
            if (key is "direct" or "header" or "reuse") o[key] = "1";
            else if (i + 1 < args.Length) o[key] = args[++i];
            else return Usage($"--{key} needs a value");
        }
        if (o.ContainsKey("header"))
        {
            Console.WriteLine(string.Join('\t', "cluster", "K", "B", "direct", "reuse", "write_s", "write_MiB/s", "create_s", "read_MiB/s", "file_MiB"));
            return 0;
        }
        if (!o.TryGetValue("dir", out string? dir)) return Usage("--dir is required");
        long total = ParseSize(o.GetValueOrDefault("total", "2G"));
        int count = int.Parse(o.GetValueOrDefault("count", "8"), CultureInfo.InvariantCulture);
        int size = (int)ParseSize(o.GetValueOrDefault("size", "1M"));
        int cluster = (int)ParseSize(o.GetValueOrDefault("cluster", "64K"));
        bool direct = o.ContainsKey("direct");
        bool reuse = o.ContainsKey("reuse");

        byte[] pool = GC.AllocateUninitializedArray<byte>(64 << 20, pinned: true);
        new Random(42).NextBytes(pool);
        string path = Path.Combine(dir, $"vmstate-area-bench-{Environment.ProcessId}.qcow2");
        try
        {
            using (Qcow2Image.Create(path, 1L << 30, new Qcow2CreateOptions { ClusterSize = cluster })) { }
            if (reuse)
            {
                // A first save, snapshot and delete: the second save then reuses freed clusters.
                using var img = Qcow2Image.Open(path);
                Write(img, pool, total, count, size);
                img.CreateSnapshot("warmup", new Qcow2SnapshotCreateOptions { VmStateSize = total });
                img.DeleteSnapshot("warmup");
            }
            using var image = Qcow2Image.Open(path, new Qcow2OpenOptions { Direct = direct });
            var clock = Stopwatch.StartNew();
            Write(image, pool, total, count, size);
            double writeSeconds = clock.Elapsed.TotalSeconds;
            clock.Restart();
            Qcow2Snapshot s = image.CreateSnapshot("bench", new Qcow2SnapshotCreateOptions { VmStateSize = total });
            double createSeconds = clock.Elapsed.TotalSeconds;

            clock.Restart();
            long read = 0;
            using (Qcow2VmStateArea area = image.OpenVmStateAreaForReading(s))
            using (var backend = VmStateBackend.ForBlockDevice(area))
            using (var reader = new VmStateReader(backend, 1 << 20, 8))
            {
                while (read < total)
                {
                    int n = (int)Math.Min(1 << 20, total - read);
                    reader.ReadSpan(n);
                    read += n;
                }
            }
            double readSeconds = clock.Elapsed.TotalSeconds;
            Console.WriteLine(string.Join('\t', FormatSize(cluster), count, FormatSize(size), direct ? "yes" : "no", reuse ? "yes" : "no",
                F(writeSeconds), F(total / 1048576.0 / writeSeconds), F(createSeconds), F(read / 1048576.0 / readSeconds),
                F(new FileInfo(path).Length / 1048576.0)));
            return 0;
        }
        finally
        {
            File.Delete(path);
        }
    }

    private static void Write(Qcow2Image image, byte[] pool, long total, int count, int size)
    {
        using Qcow2VmStateArea area = image.OpenVmStateAreaForWriting();
        using (var backend = VmStateBackend.ForBlockDevice(area))
        using (var writer = new VmStateWriter(backend, new VmStateWriterOptions { Mode = VmStateWriteMode.Buffered, BufferCount = count, BufferSize = size }))
        {
            for (long done = 0; done < total; done += 1 << 20)
            {
                int n = (int)Math.Min(1 << 20, total - done);
                writer.PutBuffer(pool.AsSpan((int)(done % pool.Length), n));
            }
            writer.Close();
        }
        area.Flush();
    }

    private static long ParseSize(string s)
    {
        long unit = char.ToUpperInvariant(s[^1]) switch { 'K' => 1L << 10, 'M' => 1L << 20, 'G' => 1L << 30, _ => 1 };
        return long.Parse(unit == 1 ? s : s[..^1], CultureInfo.InvariantCulture) * unit;
    }

    private static string FormatSize(long n) => n % (1 << 20) == 0 ? $"{n >> 20}M" : n % 1024 == 0 ? $"{n >> 10}K" : $"{n}";

    private static string F(double v) => v.ToString(v >= 100 ? "F0" : "F2", CultureInfo.InvariantCulture);

    private static int Usage(string problem)
    {
        Console.Error.WriteLine($"Vmsnap.Bench vmstate-area: {problem}");
        Console.Error.WriteLine("  --dir DIR [--total 2G] [--count 8] [--size 1M] [--cluster 64K] [--direct] [--reuse] | --header");
        return 2;
    }
}
