using System.IO.Compression;
using ZstdSharp;

namespace Vmsnap.Qcow2;

/// <summary>
/// Decompresses one compressed cluster. The stored data may be followed by unrelated bytes (the rest
/// of its last 512-byte sector): decompression stops once a whole cluster has been produced.
/// </summary>
internal static class ClusterDecompressor
{
    internal static bool TryDecompress(Qcow2CompressionType type, ReadOnlySpan<byte> input, Span<byte> output, out string? problem)
    {
        problem = null;
        try
        {
            using var source = new MemoryStream(input.ToArray(), writable: false);
            using Stream stream = type switch
            {
                // QEMU stores raw deflate data (no zlib header), whatever the type is called.
                Qcow2CompressionType.Zlib => new DeflateStream(source, CompressionMode.Decompress),
                Qcow2CompressionType.Zstd => new DecompressionStream(source, 0, false, true),
                _ => throw new InvalidDataException($"unknown compression type {(int)type}"),
            };
            int n = stream.ReadAtLeast(output, output.Length, throwOnEndOfStream: false);
            if (n == output.Length) return true;
            problem = $"produced {n} bytes instead of {output.Length}";
            return false;
        }
        catch (Exception e) when (e is InvalidDataException or ZstdException or IOException)
        {
            problem = e.Message;
            return false;
        }
    }
}
