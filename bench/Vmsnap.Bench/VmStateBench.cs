using System.Diagnostics;
using System.Globalization;
using Vmsnap.Migration;
using Vmsnap.Storage;
using Vmsnap.VmState;

namespace Vmsnap.Bench;

/// <summary>
/// One run of the VM-state write benchmark: a RAM page stream of --total bytes of guest RAM,
/// encoded with <see cref="RamPageEncoder"/> from a small reused page pool, written by the
/// writer in the chosen mode to a fresh file, timed up to and including fdatasync. Prints one
/// tab-separated result line. Optionally reads the file back through the read-ahead reader.
/// </summary>
internal static class VmStateBench
{
    private const int PageSize = 4096;
    private const int BatchPages = 256; // pages per EncodePages call (1 MiB of guest RAM)

    internal static int Run(string[] args)
    {
        var o = new Dictionary<string, string>();
        for (int i = 0; i < args.Length; i++)
        {
            if (!args[i].StartsWith("--", StringComparison.Ordinal)) return Usage($"unexpected '{args[i]}'");
            string key = args[i][2..];
            if (key == "help") return Usage("options");
            if (key is "direct" or "read" or "header" or "prealloc") o[key] = "1";
            else if (i + 1 < args.Length) o[key] = args[++i];
            else return Usage($"--{key} needs a value");
        }
        if (o.ContainsKey("header"))
        {
            Console.WriteLine(string.Join('\t', "target", "data", "mode", "K", "B", "direct", "seconds", "cpu_s", "ram_MiB/s", "stream_MiB/s",
                "writes", "hwm_MiB", "growth_MiB", "base_MiB", "pool_MiB", "read_MiB/s", "runs_stream_MiB/s"));
            return 0;
        }
        if (!o.TryGetValue("dir", out string? dir)) return Usage("--dir is required");
        string mode = o.GetValueOrDefault("mode", "buffered");
        int count = int.Parse(o.GetValueOrDefault("count", "8"), CultureInfo.InvariantCulture);
        int size = (int)ParseSize(o.GetValueOrDefault("size", "1M"));
        long total = ParseSize(o.GetValueOrDefault("total", "2G"));
        int pool = (int)ParseSize(o.GetValueOrDefault("pool", "64M"));
        int zeroPercent = int.Parse(o.GetValueOrDefault("zero", "0"), CultureInfo.InvariantCulture);
        bool direct = o.ContainsKey("direct");
        bool prealloc = o.ContainsKey("prealloc");
        int repeat = int.Parse(o.GetValueOrDefault("repeat", "1"), CultureInfo.InvariantCulture);
        string label = o.GetValueOrDefault("label", dir);

        byte[] pages = MakePool(pool, zeroPercent);
        var options = new VmStateWriterOptions
        {
            Mode = mode == "gather" ? VmStateWriteMode.Gather : VmStateWriteMode.Buffered,
            BufferCount = count,
            BufferSize = size,
        };
        var results = new List<Result>();
        for (int i = 0; i < repeat; i++) results.Add(RunOnce(dir, pages, options, total, direct, prealloc, o.ContainsKey("read")));
        // The median run by time; memory is the highest peak of all runs.
        Result median = results.OrderBy(r => r.Seconds).ElementAt(results.Count / 2);
        long hwm = results.Max(r => r.Peak);

        Console.WriteLine(string.Join('\t', label, zeroPercent == 0 ? "random" : $"{zeroPercent}% zero", mode,
            mode == "gather" ? "-" : count.ToString(CultureInfo.InvariantCulture),
            mode == "gather" ? "32K" : FormatSize(size), (direct ? "yes" : "no") + (prealloc ? "+falloc" : ""),
            F(median.Seconds), F(median.CpuSeconds), F(total / 1048576.0 / median.Seconds), F(median.StreamBytes / 1048576.0 / median.Seconds),
            median.Writes.ToString(CultureInfo.InvariantCulture), F(hwm / 1048576.0),
            F(results.Max(r => r.Peak - r.Baseline) / 1048576.0), F(results.Min(r => r.Baseline) / 1048576.0), F(pool / 1048576.0),
            median.ReadRate < 0 ? "-" : F(median.ReadRate / 1048576.0),
            string.Join(' ', results.Select(r => F(r.StreamBytes / 1048576.0 / r.Seconds)))));
        return 0;
    }

    private sealed record Result(double Seconds, double CpuSeconds, long StreamBytes, long Writes, long Peak, long Baseline, double ReadRate);

    private static Result RunOnce(string dir, byte[] pages, VmStateWriterOptions options, long total, bool direct, bool prealloc, bool read)
    {
        string path = Path.Combine(dir, $"vmstate-bench-{Environment.ProcessId}.bin");
        if (dir != "null") File.Delete(path);
        GC.Collect();
        GC.WaitForPendingFinalizers();
        long baseline = Status("VmRSS");
        ResetPeak();

        // Like fio's default (fallocate=native, not timed): blocks allocated up front, so O_DIRECT
        // writes land inside the file and ext4 lets several run at once (writes that extend a file
        // or fill holes are serialized); on tmpfs it takes the page allocation out of the timing.
        // The file is trimmed to the stream's exact length inside the timed region.
        if (prealloc && dir != "null") Preallocate(path, total + total / 512 + (1 << 20));
        TimeSpan cpu = Process.GetCurrentProcess().TotalProcessorTime;
        var clock = Stopwatch.StartNew();
        long streamBytes, writes;
        using (IBlockDevice device = dir == "null" ? new NullDevice() : FileBlockDevice.Open(path, new FileBlockDeviceOptions { Create = true, Direct = direct }))
        {
            using (var backend = new CountingBackend(VmStateBackend.ForBlockDevice(device)))
            using (var writer = new VmStateWriter(backend, options))
            {
                var encoder = new RamPageEncoder(writer);
                encoder.ResetBlock();
                int batchBytes = BatchPages * PageSize;
                for (long offset = 0; offset < total; offset += batchBytes)
                {
                    int at = (int)(offset % pages.Length);
                    encoder.EncodePages("ram0", offset, pages.AsMemory(at, batchBytes));
                }
                writer.PutBe64(0x10); // EOS, so the file is a complete RAM section body
                writer.Close();       // waits for every write and fdatasyncs
                streamBytes = writer.BytesTransferred;
                writes = backend.Writes;
            }
            if (prealloc)
            {
                device.SetLength(streamBytes);
                device.Flush();
            }
        }
        double seconds = clock.Elapsed.TotalSeconds;
        double cpuSeconds = (Process.GetCurrentProcess().TotalProcessorTime - cpu).TotalSeconds;
        long peak = Status("VmHWM");
        if (dir == "null") return new Result(seconds, cpuSeconds, streamBytes, writes, peak, baseline, -1);
        if (new FileInfo(path).Length != streamBytes) throw new InvalidOperationException("the file is not the stream's exact length");

        double readRate = read ? ReadBack(path, direct, total) : -1;
        File.Delete(path);
        return new Result(seconds, cpuSeconds, streamBytes, writes, peak, baseline, readRate);
    }

    /// <summary>Reads the stream back as a loader would (headers, ids, pages via zero-copy spans); returns stream bytes per second.</summary>
    private static double ReadBack(string path, bool direct, long total)
    {
        var clock = Stopwatch.StartNew();
        using var device = FileBlockDevice.Open(path, new FileBlockDeviceOptions { Direct = direct });
        using var backend = VmStateBackend.ForBlockDevice(device);
        using var reader = new VmStateReader(backend, 1 << 20, 8);
        long pages = 0;
        ulong checksum = 0;
        while (true)
        {
            ulong header = reader.GetBe64();
            if (header == 0x10) break;
            if ((header & RamPageEncoder.FlagContinue) == 0) reader.Skip(reader.GetByte());
            if ((header & RamPageEncoder.FlagPage) != 0) checksum += ReadPage(reader.ReadSpan(PageSize));
            else reader.GetByte();
            pages++;
        }
        if (pages * PageSize != total) throw new InvalidOperationException($"read {pages} pages, expected {total / PageSize}");
        GC.KeepAlive(checksum);
        return reader.Position / clock.Elapsed.TotalSeconds;

        static ulong ReadPage(ReadOnlySpan<byte> page) => BitConverter.ToUInt64(page);
    }

    /// <summary>Pre-generated pages reused for the whole stream, so memory use reflects the writer; every other page zero for half-zero data.</summary>
    private static byte[] MakePool(int size, int zeroPercent)
    {
        byte[] pool = GC.AllocateUninitializedArray<byte>(size, pinned: true);
        var r = new Random(42);
        r.NextBytes(pool);
        int pages = size / PageSize;
        for (int i = 0; i < pages; i++)
            if (zeroPercent > 0 && (i * zeroPercent / 100) != ((i + 1) * zeroPercent / 100))
                pool.AsSpan(i * PageSize, PageSize).Clear();
        return pool;
    }

    [System.Runtime.InteropServices.DllImport("libc", SetLastError = true)]
    private static extern int fallocate(int fd, int mode, long offset, long length);

    private static void Preallocate(string path, long length)
    {
        using Microsoft.Win32.SafeHandles.SafeFileHandle h = File.OpenHandle(path, FileMode.CreateNew, FileAccess.ReadWrite);
        if (fallocate((int)h.DangerousGetHandle(), 0, 0, length) != 0)
            throw new IOException($"fallocate failed: errno {System.Runtime.InteropServices.Marshal.GetLastPInvokeError()}");
    }

    private static long Status(string field)
    {
        foreach (string line in File.ReadLines("/proc/self/status"))
            if (line.StartsWith(field + ":", StringComparison.Ordinal))
                return long.Parse(line[(field.Length + 1)..].Trim().Split(' ')[0], CultureInfo.InvariantCulture) * 1024;
        return -1;
    }

    /// <summary>Resets VmHWM to the current RSS (Linux: write 5 to clear_refs), so the peak is the run's own.</summary>
    private static void ResetPeak()
    {
        try { File.WriteAllText("/proc/self/clear_refs", "5"); }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
    }

    private static long ParseSize(string s)
    {
        long unit = char.ToUpperInvariant(s[^1]) switch { 'K' => 1L << 10, 'M' => 1L << 20, 'G' => 1L << 30, _ => 1 };
        return long.Parse(unit == 1 ? s : s[..^1], CultureInfo.InvariantCulture) * unit;
    }

    private static string FormatSize(long n) => n % (1 << 20) == 0 ? $"{n >> 20}M" : $"{n >> 10}K";

    private static string F(double v) => v.ToString(v >= 100 ? "F0" : "F2", CultureInfo.InvariantCulture);

    private static int Usage(string problem)
    {
        Console.Error.WriteLine($"Vmsnap.Bench vmstate: {problem}");
        Console.Error.WriteLine("  --dir DIR --mode gather|buffered [--count K] [--size B] [--total 2G] [--pool 64M] [--zero PERCENT] [--direct] [--prealloc] [--read] [--repeat N] [--label TEXT]");
        return 2;
    }
}

/// <summary>Counts the write calls that reach the backend.</summary>
internal sealed class CountingBackend(VmStateBackend inner) : VmStateBackend
{
    private long _writes;

    public long Writes => Interlocked.Read(ref _writes);

    public override bool PrefersBufferedMode => inner.PrefersBufferedMode;

    public override int Alignment => inner.Alignment;

    public override bool IsPositional => inner.IsPositional;

    public override void WriteVectored(ReadOnlySpan<ReadOnlyMemory<byte>> segments, long position)
    {
        Interlocked.Increment(ref _writes);
        inner.WriteVectored(segments, position);
    }

    public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, long position, CancellationToken cancellationToken = default)
    {
        Interlocked.Increment(ref _writes);
        return inner.WriteAsync(buffer, position, cancellationToken);
    }

    public override int Read(Span<byte> buffer, long position) => inner.Read(buffer, position);

    public override ValueTask<int> ReadAsync(Memory<byte> buffer, long position, CancellationToken cancellationToken = default) =>
        inner.ReadAsync(buffer, position, cancellationToken);

    public override void Flush() => inner.Flush();

    protected override void Dispose(bool disposing)
    {
        if (disposing) inner.Dispose();
    }
}

/// <summary>A device that accepts every write and keeps nothing: the writer's and encoder's own ceiling.</summary>
internal sealed class NullDevice : IBlockDevice
{
    public long Length => 0;

    public bool IsReadOnly => false;

    public int Alignment => 4096;

    public int Read(Span<byte> buffer, long offset) => 0;

    public void Write(ReadOnlySpan<byte> buffer, long offset) { }

    public ValueTask<int> ReadAsync(Memory<byte> buffer, long offset, CancellationToken cancellationToken = default) => ValueTask.FromResult(0);

    public ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, long offset, CancellationToken cancellationToken = default) => ValueTask.CompletedTask;

    public void Flush() { }

    public void SetLength(long length) { }

    public void Discard(long offset, long length) { }

    public void Dispose() { }
}
