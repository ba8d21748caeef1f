using Vmsnap.Storage;
using Vmsnap.Storage.LowLevel;

namespace Vmsnap.Qcow2;

/// <summary>The snapshot table: nb_snapshots variable-length entries starting at snapshots_offset.</summary>
internal static class SnapshotTable
{
    internal const int MaxSnapshots = 65536;          // QEMU: QCOW_MAX_SNAPSHOTS
    internal const long MaxTableBytes = 64L << 20;

    /// <summary>Reads every entry; <paramref name="tableBytes"/> is the table's size on disk.</summary>
    internal static List<SnapshotEntry> Read(IBlockDevice device, Qcow2Header header, long fileLength, out long tableBytes)
    {
        var entries = new List<SnapshotEntry>();
        tableBytes = 0;
        if (header.SnapshotCount > MaxSnapshots)
            throw new Qcow2FormatException("header", Qcow2Header.SnapshotFieldsOffset, $"{header.SnapshotCount} snapshots is more than the {MaxSnapshots} qcow2 allows");
        // Like QEMU, the pointer must be valid even when there are no snapshots.
        if ((header.SnapshotsOffset & (ulong)(header.ClusterSize - 1)) != 0)
            throw new Qcow2FormatException("header", Qcow2Header.SnapshotFieldsOffset, $"snapshot table offset 0x{header.SnapshotsOffset:x} is not aligned to a cluster");
        if (header.SnapshotsOffset > (ulong)long.MaxValue - header.SnapshotCount * (ulong)SnapshotEntry.FixedSize)
            throw new Qcow2FormatException("header", Qcow2Header.SnapshotFieldsOffset, $"snapshot table offset 0x{header.SnapshotsOffset:x} is beyond any file");
        if (header.SnapshotCount == 0) return entries;
        long start = (long)header.SnapshotsOffset;
        if (start < header.ClusterSize)
            throw new Qcow2FormatException("snapshot table", start, "overlaps the header cluster");
        long pos = start;
        byte[] fixedPart = new byte[SnapshotEntry.FixedSize];
        for (int i = 0; i < header.SnapshotCount; i++)
        {
            ReadExactly(device, fixedPart, pos, fileLength, i);
            int variable = SnapshotEntry.VariableLength(fixedPart, pos, i);
            byte[] whole = new byte[SnapshotEntry.FixedSize + variable];
            fixedPart.CopyTo(whole, 0);
            ReadExactly(device, whole.AsSpan(SnapshotEntry.FixedSize), pos + SnapshotEntry.FixedSize, fileLength, i);
            SnapshotEntry entry = SnapshotEntry.Read(whole, pos, i, out int padded);
            entry.FileOffset = pos;
            entries.Add(entry);
            pos += padded;
            if (pos - start > MaxTableBytes)
                throw new Qcow2FormatException("snapshot table", start, $"larger than {MaxTableBytes} bytes");
        }
        tableBytes = pos - start;
        return entries;
    }

    private static void ReadExactly(IBlockDevice device, Span<byte> buffer, long offset, long fileLength, int index)
    {
        if (offset + buffer.Length > fileLength || device.Read(buffer, offset) != buffer.Length)
            throw new Qcow2FormatException($"snapshot table entry {index}", offset, $"lies beyond the end of the file ({fileLength} bytes)");
    }

    /// <summary>Encodes all entries back to back (each padded to 8 bytes).</summary>
    internal static byte[] Encode(IReadOnlyList<SnapshotEntry> entries)
    {
        int total = 0;
        foreach (SnapshotEntry e in entries) total += e.EncodedLength;
        byte[] bytes = new byte[total];
        int pos = 0;
        foreach (SnapshotEntry e in entries) pos += e.Write(bytes.AsSpan(pos));
        return bytes;
    }
}
