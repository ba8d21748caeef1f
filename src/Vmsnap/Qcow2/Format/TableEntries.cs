using System.Buffers.Binary;

namespace Vmsnap.Qcow2;

/// <summary>L1 table and refcount table entry encoding.</summary>
internal static class L1Entry
{
    internal const ulong Copied = 1UL << 63;
    internal const ulong OffsetMask = 0x00ff_ffff_ffff_fe00;
    internal const ulong ReservedMask = 0x7f00_0000_0000_01ff;

    internal static long L2Offset(ulong entry) => (long)(entry & OffsetMask);
    internal static bool IsCopied(ulong entry) => (entry & Copied) != 0;
    internal static ulong Make(long l2Offset, bool copied) => (ulong)l2Offset | (copied ? Copied : 0);

    internal static ulong[] Decode(ReadOnlySpan<byte> bytes)
    {
        var entries = new ulong[bytes.Length / 8];
        for (int i = 0; i < entries.Length; i++) entries[i] = BinaryPrimitives.ReadUInt64BigEndian(bytes[(i * 8)..]);
        return entries;
    }

    internal static void Encode(ReadOnlySpan<ulong> entries, Span<byte> bytes)
    {
        for (int i = 0; i < entries.Length; i++) BinaryPrimitives.WriteUInt64BigEndian(bytes[(i * 8)..], entries[i]);
    }
}

/// <summary>Refcount table entries: a refcount block's offset, low 9 bits reserved.</summary>
internal static class RefcountTableEntry
{
    internal const ulong OffsetMask = 0xffff_ffff_ffff_fe00;
    internal const ulong ReservedMask = 0x1ff;
}

/// <summary>What an L2 entry says about its guest cluster.</summary>
internal enum ClusterKind
{
    /// <summary>No host cluster and no zero flag: reads from the backing file, or zeroes.</summary>
    Unallocated,
    /// <summary>Zero flag, no host cluster (standard L2 only).</summary>
    ZeroPlain,
    /// <summary>Zero flag with a preallocated host cluster (standard L2 only).</summary>
    ZeroAllocated,
    /// <summary>A host cluster holds the data (with extended L2, per-subcluster bits say which parts).</summary>
    Normal,
    /// <summary>Compressed data somewhere in the file.</summary>
    Compressed,
}

/// <summary>
/// One L2 entry: the 64-bit cluster descriptor and, with extended L2 entries, the 64-bit subcluster
/// bitmap (low 32 bits: allocated; high 32 bits: reads as zeroes).
/// </summary>
internal readonly record struct L2Entry(ulong Word, ulong Bitmap)
{
    internal const ulong Copied = 1UL << 63;
    internal const ulong CompressedFlag = 1UL << 62;
    internal const ulong ZeroFlag = 1UL;
    internal const ulong OffsetMask = 0x00ff_ffff_ffff_fe00;
    internal const ulong StandardReservedMask = 0x3f00_0000_0000_01fe;
    internal const ulong AllAllocated = 0xffff_ffffUL;
    internal const ulong AllZeroes = 0xffff_ffffUL << 32;

    internal bool IsCopied => (Word & Copied) != 0;
    internal bool IsCompressed => (Word & CompressedFlag) != 0;
    internal long HostOffset => (long)(Word & OffsetMask);
    internal uint AllocatedMask => (uint)Bitmap;
    internal uint ZeroMask => (uint)(Bitmap >> 32);

    internal ClusterKind Kind(bool extendedL2)
    {
        if (IsCompressed) return ClusterKind.Compressed;
        if (!extendedL2 && (Word & ZeroFlag) != 0) return HostOffset != 0 ? ClusterKind.ZeroAllocated : ClusterKind.ZeroPlain;
        return HostOffset != 0 ? ClusterKind.Normal : ClusterKind.Unallocated;
    }

    /// <summary>Host offset of compressed data (not aligned) and its length in bytes as QEMU computes it.</summary>
    internal (long Offset, int Length) CompressedRange(ClusterGeometry g)
    {
        long offset = (long)(Word & g.CompressedOffsetMask);
        long sectors = (long)((Word >> g.CompressedSizeShift) & g.CompressedSizeMask) + 1;
        return (offset, (int)(sectors * 512 - (offset & 511)));
    }

    internal static L2Entry Read(ReadOnlySpan<byte> table, int index, bool extendedL2)
    {
        if (!extendedL2) return new L2Entry(BinaryPrimitives.ReadUInt64BigEndian(table[(index * 8)..]), 0);
        int at = index * 16;
        return new L2Entry(BinaryPrimitives.ReadUInt64BigEndian(table[at..]), BinaryPrimitives.ReadUInt64BigEndian(table[(at + 8)..]));
    }

    internal static void Write(Span<byte> table, int index, bool extendedL2, L2Entry entry)
    {
        if (!extendedL2)
        {
            BinaryPrimitives.WriteUInt64BigEndian(table[(index * 8)..], entry.Word);
            return;
        }
        int at = index * 16;
        BinaryPrimitives.WriteUInt64BigEndian(table[at..], entry.Word);
        BinaryPrimitives.WriteUInt64BigEndian(table[(at + 8)..], entry.Bitmap);
    }

    /// <summary>Encodes a compressed cluster descriptor (used by tests to build images by hand).</summary>
    internal static L2Entry MakeCompressed(ClusterGeometry g, long hostOffset, int compressedLength)
    {
        long sectors = ((hostOffset & 511) + compressedLength + 511) / 512;
        return new L2Entry(CompressedFlag | (((ulong)(sectors - 1) & g.CompressedSizeMask) << g.CompressedSizeShift) | ((ulong)hostOffset & g.CompressedOffsetMask), 0);
    }
}
