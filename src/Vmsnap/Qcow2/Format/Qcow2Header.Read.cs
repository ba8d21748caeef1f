using System.Buffers.Binary;
using System.Text;
using Vmsnap.Storage;
using Vmsnap.Storage.LowLevel;

namespace Vmsnap.Qcow2;

internal sealed partial class Qcow2Header
{
    /// <summary>Reads and parses the header cluster of <paramref name="device"/>.</summary>
    internal static Qcow2Header Read(IBlockDevice device)
    {
        long fileLength = device.Length;
        Span<byte> start = stackalloc byte[Version3MinLength];
        int n = device.Read(start, 0);
        if (n < 24)
            throw new Qcow2FormatException("header", 0, $"truncated: the file has {fileLength} bytes, a qcow2 header needs at least {Version2Length}");
        int clusterBits = (int)BinaryPrimitives.ReadUInt32BigEndian(start[20..]);
        CheckMagicVersionClusterBits(start[..n]);
        int want = (int)Math.Min(1L << clusterBits, fileLength);
        byte[] cluster = new byte[Math.Max(want, n)];
        int got = device.Read(cluster, 0);
        return Parse(cluster.AsSpan(0, got), fileLength);
    }

    private static void CheckMagicVersionClusterBits(ReadOnlySpan<byte> b)
    {
        uint magic = BinaryPrimitives.ReadUInt32BigEndian(b);
        if (magic != Magic)
            throw new Qcow2FormatException("header", 0, $"bad magic 0x{magic:x8} (a qcow2 image starts with \"QFI\\xfb\", 0x{Magic:x8}); not a qcow2 image");
        uint version = BinaryPrimitives.ReadUInt32BigEndian(b[4..]);
        if (version is not (2 or 3))
            throw new Qcow2FormatException("header", 4, $"unsupported qcow2 version {version} (vmsnap reads versions 2 and 3)");
        uint clusterBits = BinaryPrimitives.ReadUInt32BigEndian(b[20..]);
        if (clusterBits is < MinClusterBits or > MaxClusterBits)
            throw new Qcow2FormatException("header", 20, $"cluster_bits {clusterBits} out of range ({MinClusterBits}..{MaxClusterBits}, i.e. 512 B to 2 MiB clusters)");
    }

    /// <summary>Parses the header from the start of the file (ideally its whole first cluster).</summary>
    internal static Qcow2Header Parse(ReadOnlySpan<byte> b, long fileLength)
    {
        if (b.Length < Version2Length)
            throw new Qcow2FormatException("header", 0, $"truncated: the file has {fileLength} bytes, a qcow2 header needs at least {Version2Length}");
        CheckMagicVersionClusterBits(b);
        var h = new Qcow2Header
        {
            Version = (int)BinaryPrimitives.ReadUInt32BigEndian(b[4..]),
            BackingFileOffset = BinaryPrimitives.ReadUInt64BigEndian(b[8..]),
            BackingFileSize = BinaryPrimitives.ReadUInt32BigEndian(b[16..]),
            ClusterBits = (int)BinaryPrimitives.ReadUInt32BigEndian(b[20..]),
            Size = BinaryPrimitives.ReadUInt64BigEndian(b[24..]),
            CryptMethod = BinaryPrimitives.ReadUInt32BigEndian(b[32..]),
            L1Size = BinaryPrimitives.ReadUInt32BigEndian(b[36..]),
            L1TableOffset = BinaryPrimitives.ReadUInt64BigEndian(b[40..]),
            RefcountTableOffset = BinaryPrimitives.ReadUInt64BigEndian(b[48..]),
            RefcountTableClusters = BinaryPrimitives.ReadUInt32BigEndian(b[56..]),
            SnapshotCount = BinaryPrimitives.ReadUInt32BigEndian(b[60..]),
            SnapshotsOffset = BinaryPrimitives.ReadUInt64BigEndian(b[64..]),
        };
        int clusterSize = h.ClusterSize;
        if (h.Version >= 3)
        {
            if (b.Length < Version3MinLength)
                throw new Qcow2FormatException("header", 0, $"truncated: the file has {fileLength} bytes, a version 3 header needs at least {Version3MinLength}");
            h.IncompatibleFeatures = BinaryPrimitives.ReadUInt64BigEndian(b[72..]);
            h.CompatibleFeatures = BinaryPrimitives.ReadUInt64BigEndian(b[80..]);
            h.AutoclearFeatures = BinaryPrimitives.ReadUInt64BigEndian(b[88..]);
            uint order = BinaryPrimitives.ReadUInt32BigEndian(b[96..]);
            if (order > 6)
                throw new Qcow2FormatException("header", 96, $"refcount_order {order} too large (at most 6, i.e. 64-bit refcounts)");
            h.RefcountOrder = (int)order;
            uint length = BinaryPrimitives.ReadUInt32BigEndian(b[100..]);
            if (length < Version3MinLength)
                throw new Qcow2FormatException("header", 100, $"header_length {length} too short (a version 3 header has at least {Version3MinLength} bytes)");
            if (length > clusterSize)
                throw new Qcow2FormatException("header", 100, $"header_length {length} exceeds the cluster size {clusterSize}");
            if (length > b.Length)
                throw new Qcow2FormatException("header", 0, $"truncated: header_length is {length} but the file has {fileLength} bytes");
            h.HeaderLength = (int)length;
            if (length > Version3MinLength)
            {
                h.CompressionType = b[Version3MinLength];
                h.TrailingFields = b[(Version3MinLength + 1)..(int)length].ToArray();
            }
        }
        else
        {
            h.HeaderLength = Version2Length;
            h.RefcountOrder = 4;
        }

        if (h.BackingFileOffset != 0)
        {
            if (h.BackingFileSize > MaxBackingFileNameLength)
                throw new Qcow2FormatException("header", 16, $"backing file name length {h.BackingFileSize} too long (at most {MaxBackingFileNameLength})");
            if (h.BackingFileOffset > (ulong)clusterSize || h.BackingFileOffset + h.BackingFileSize > (ulong)clusterSize)
                throw new Qcow2FormatException("header", 8, $"backing file name at offset {h.BackingFileOffset} ({h.BackingFileSize} bytes) lies outside the header cluster");
            if (h.BackingFileOffset + h.BackingFileSize > (ulong)b.Length)
                throw new Qcow2FormatException("header", 8, $"truncated: backing file name at offset {h.BackingFileOffset} ({h.BackingFileSize} bytes) lies beyond the end of the file ({fileLength} bytes)");
            h.BackingFile = Encoding.UTF8.GetString(b.Slice((int)h.BackingFileOffset, (int)h.BackingFileSize));
        }

        h.ReadExtensions(b, fileLength);
        return h;
    }

    private void ReadExtensions(ReadOnlySpan<byte> b, long fileLength)
    {
        long end = BackingFileOffset != 0 ? (long)BackingFileOffset : ClusterSize;
        long offset = HeaderLength;
        while (offset < end)
        {
            if (offset + 8 > b.Length)
            {
                // A header shorter than its cluster simply ends: treat the missing bytes as the end marker.
                if (offset >= fileLength) break;
                throw new Qcow2FormatException("header extension", offset, $"truncated: the file ends at {fileLength} bytes");
            }
            uint type = BinaryPrimitives.ReadUInt32BigEndian(b[(int)offset..]);
            uint length = BinaryPrimitives.ReadUInt32BigEndian(b[((int)offset + 4)..]);
            long dataStart = offset + 8;
            if (dataStart > end || length > end - dataStart)
                throw new Qcow2FormatException("header extension", offset, $"type 0x{type:x8} with length {length} extends past the header area (ends at {end})");
            if (type == HeaderExtension.End) return;
            if (dataStart + length > b.Length)
                throw new Qcow2FormatException("header extension", offset, $"type 0x{type:x8} with length {length}: truncated, the file ends at {fileLength} bytes");
            byte[] data = b.Slice((int)dataStart, (int)length).ToArray();
            CheckKnownExtension(type, data, offset);
            Extensions.Add(new HeaderExtension(type, data));
            offset = dataStart + HeaderExtension.Align8((int)length);
        }
    }

    private static void CheckKnownExtension(uint type, byte[] data, long offset)
    {
        switch (type)
        {
            case HeaderExtension.BackingFormat when data.Length >= 16:
                throw new Qcow2FormatException("backing format extension", offset, $"format name of {data.Length} bytes is too long");
            case HeaderExtension.Bitmaps when data.Length != 24:
                throw new Qcow2FormatException("bitmaps extension", offset, $"length {data.Length} is not 24");
        }
    }
}
