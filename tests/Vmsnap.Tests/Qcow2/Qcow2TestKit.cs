using System.Security.Cryptography;
using System.Text.Json;
using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Qcow2;

/// <summary>One qcow2 configuration: the qemu-img create options and vmsnap's equivalent.</summary>
public sealed record OptionSet(string Name, string QemuOptions, Qcow2CreateOptions Vmsnap, long VirtualSize)
{
    public int ClusterSize => Vmsnap.ClusterSize;
    public int SubclusterSize => Vmsnap.ExtendedL2 ? ClusterSize / 32 : ClusterSize;

    /// <summary>Guest bytes one L2 table maps.</summary>
    public long BytesPerL2 => (long)ClusterSize * (ClusterSize / (Vmsnap.ExtendedL2 ? 16 : 8));

    public override string ToString() => Name;
}

/// <summary>Helpers around the real QEMU tools and image comparisons.</summary>
internal static class Qemu
{
    /// <summary>The option matrix: versions 2 and 3, cluster sizes 512 B to 2 MiB, every refcount width, lazy refcounts, extended L2.</summary>
    internal static readonly OptionSet[] Matrix =
    [
        new("v2-64k", "compat=0.10", new() { Version = 2 }, 1L << 30),
        new("v2-512", "compat=0.10,cluster_size=512", new() { Version = 2, ClusterSize = 512 }, 16 << 20),
        new("v3-64k", "", new(), 1L << 30),
        new("v3-512-rc1", "cluster_size=512,refcount_bits=1", new() { ClusterSize = 512, RefcountBits = 1 }, 16 << 20),
        new("v3-4k-rc2", "cluster_size=4k,refcount_bits=2", new() { ClusterSize = 4096, RefcountBits = 2 }, 64 << 20),
        new("v3-64k-rc4-lazy", "refcount_bits=4,lazy_refcounts=on", new() { RefcountBits = 4, LazyRefcounts = true }, 1L << 30),
        new("v3-64k-rc8", "refcount_bits=8", new() { RefcountBits = 8 }, 1L << 30),
        new("v3-4k-rc32", "cluster_size=4k,refcount_bits=32", new() { ClusterSize = 4096, RefcountBits = 32 }, 64 << 20),
        new("v3-512-rc64", "cluster_size=512,refcount_bits=64", new() { ClusterSize = 512, RefcountBits = 64 }, 16 << 20),
        new("v3-2m", "cluster_size=2M", new() { ClusterSize = 2 << 20 }, 1L << 40),
        new("v3-2m-rc64", "cluster_size=2M,refcount_bits=64", new() { ClusterSize = 2 << 20, RefcountBits = 64 }, 1L << 40),
        new("v3-4k-lazy", "cluster_size=4k,lazy_refcounts=on", new() { ClusterSize = 4096, LazyRefcounts = true }, 64 << 20),
        new("extl2-16k", "cluster_size=16k,extended_l2=on", new() { ClusterSize = 16384, ExtendedL2 = true }, 64 << 20),
        new("extl2-64k", "extended_l2=on", new() { ExtendedL2 = true }, 512L << 20),
        new("extl2-2m", "cluster_size=2M,extended_l2=on", new() { ClusterSize = 2 << 20, ExtendedL2 = true }, 300L << 30),
        new("v3-64k-zstd", "compression_type=zstd", new() { CompressionType = Qcow2CompressionType.Zstd }, 1L << 30),
    ];

    public static TheoryData<string> MatrixNames()
    {
        var data = new TheoryData<string>();
        foreach (OptionSet o in Matrix) data.Add(o.Name);
        return data;
    }

    internal static OptionSet Set(string name) => Matrix.Single(o => o.Name == name);

    internal static void Create(string path, long size, string options = "", string? backing = null, string? backingFormat = null)
    {
        var args = new List<string> { "create", "-q", "-f", "qcow2" };
        if (options.Length > 0) args.AddRange(["-o", options]);
        if (backing is not null) args.AddRange(["-b", backing, "-F", backingFormat ?? "qcow2"]);
        args.AddRange([path, size.ToString()]);
        Tool.QemuImg([.. args]);
    }

    /// <summary>Runs qemu-io commands (e.g. "write -P 0xab 0 4k") on an image.</summary>
    internal static void Io(string path, params string[] commands) => IoAs(path, "qcow2", commands);

    internal static void IoAs(string path, string format, params string[] commands)
    {
        var args = new List<string> { "-f", format };
        foreach (string c in commands) args.AddRange(["-c", c]);
        args.Add(path);
        string output = Tool.QemuIo([.. args]);
        Assert.DoesNotContain("failed", output, StringComparison.OrdinalIgnoreCase);
    }

    internal static string ToRaw(string image, TempDir dir, string? snapshot = null)
    {
        string raw = dir.File(Path.GetFileName(image) + (snapshot ?? "") + ".raw");
        if (snapshot is null) Tool.QemuImg("convert", "-O", "raw", image, raw);
        else Tool.QemuImg("convert", "-l", $"snapshot.name={snapshot}", "-O", "raw", image, raw);
        return raw;
    }

    internal static JsonElement Info(string image) => JsonDocument.Parse(Tool.QemuImg("info", "--output=json", image)).RootElement;

    /// <summary>Asserts qemu-img compare finds both images identical (content, any format).</summary>
    internal static void AssertSameContent(string a, string b, string formatB = "raw")
    {
        Tool.Result r = Tool.Run("qemu-img", ["compare", "-f", "qcow2", "-F", formatB, a, b]);
        Assert.True(r.ExitCode == 0, $"qemu-img compare {a} {b}: {r.ExitCode} {r.Stdout}{r.Stderr}");
    }

    /// <summary>Asserts two raw files hold the same bytes (qemu-img compare skips holes, so big sparse files are cheap).</summary>
    internal static void AssertSameRaw(string a, string b)
    {
        Tool.Result r = Tool.Run("qemu-img", ["compare", "-f", "raw", "-F", "raw", a, b]);
        Assert.True(r.ExitCode == 0, $"qemu-img compare {a} {b}: {r.ExitCode} {r.Stdout}{r.Stderr}");
    }

    internal static byte[] ReadRaw(string path, long offset, int length)
    {
        using var f = File.OpenRead(path);
        byte[] b = new byte[length];
        f.Position = offset;
        f.ReadExactly(b);
        return b;
    }

    internal static string Hash(string path) => Convert.ToHexString(SHA256.HashData(File.ReadAllBytes(path)));

    /// <summary>
    /// Compares what vmsnap reads from <paramref name="image"/> with a raw file: all of it for
    /// small disks, else the given windows plus the first and last MiB and some random windows.
    /// </summary>
    internal static void AssertReadsLike(Qcow2Image image, string raw, IEnumerable<(long Offset, long Length)> windows, int seed = 1)
    {
        long size = image.VirtualSize;
        Assert.Equal(size, new FileInfo(raw).Length);
        var ranges = new List<(long, long)>();
        if (size <= 256L << 20)
        {
            ranges.Add((0, size));
        }
        else
        {
            long cs = image.ClusterSize;
            foreach ((long o, long l) in windows) ranges.Add((Math.Max(0, o - cs), Math.Min(size, o + l + cs) - Math.Max(0, o - cs)));
            ranges.Add((0, 1 << 20));
            ranges.Add((size - (1 << 20), 1 << 20));
            var random = new Random(seed);
            for (int i = 0; i < 8; i++) ranges.Add((random.NextInt64(0, size - 300_000), random.Next(1, 300_000)));
        }
        using var file = new FileStream(raw, FileMode.Open, FileAccess.Read);
        foreach ((long offset, long length) in ranges)
        {
            for (long done = 0; done < length; done += 8 << 20)
            {
                int n = (int)Math.Min(8 << 20, length - done);
                byte[] expected = new byte[n], actual = new byte[n];
                file.Position = offset + done;
                file.ReadExactly(expected);
                image.Read(actual, offset + done);
                if (!expected.AsSpan().SequenceEqual(actual))
                {
                    int at = expected.AsSpan().CommonPrefixLength(actual);
                    Assert.Fail($"bytes differ at guest offset {offset + done + at}: qemu 0x{expected[at]:x2}, vmsnap 0x{actual[at]:x2}");
                }
            }
        }
    }

    /// <summary>A sparse raw file of <paramref name="size"/> bytes.</summary>
    internal static string SparseRaw(TempDir dir, string name, long size)
    {
        string path = dir.File(name);
        using var f = new FileStream(path, FileMode.Create, FileAccess.Write);
        f.SetLength(size);
        return path;
    }

    internal static void WriteRaw(string path, long offset, ReadOnlySpan<byte> data)
    {
        using var f = new FileStream(path, FileMode.Open, FileAccess.Write);
        f.Position = offset;
        f.Write(data);
    }

    /// <summary>Parsed header of an image (to find tables when damaging images on purpose).</summary>
    internal static Qcow2Header Header(string path)
    {
        using var device = FileBlockDevice.Open(path);
        return Qcow2Header.Read(device);
    }

    internal static ulong ReadBE64(string path, long offset)
    {
        using var f = File.OpenRead(path);
        byte[] b = new byte[8];
        f.Position = offset;
        f.ReadExactly(b);
        return System.Buffers.Binary.BinaryPrimitives.ReadUInt64BigEndian(b);
    }

    internal static void WriteBE64(string path, long offset, ulong value)
    {
        byte[] b = new byte[8];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(b, value);
        WriteRaw(path, offset, b);
    }

    internal static void WriteBE32(string path, long offset, uint value)
    {
        byte[] b = new byte[4];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(b, value);
        WriteRaw(path, offset, b);
    }
}
