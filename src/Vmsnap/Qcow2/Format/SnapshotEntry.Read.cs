using System.Buffers.Binary;
using System.Text;

namespace Vmsnap.Qcow2;

internal sealed partial class SnapshotEntry
{
    /// <summary>Length of the fixed part plus the variable part announced by it (before padding).</summary>
    internal static int VariableLength(ReadOnlySpan<byte> fixedPart, long fileOffset, int index)
    {
        uint extra = BinaryPrimitives.ReadUInt32BigEndian(fixedPart[36..]);
        if (extra > MaxExtraDataSize)
            throw new Qcow2FormatException($"snapshot table entry {index}", fileOffset, $"extra data of {extra} bytes is too large (at most {MaxExtraDataSize})");
        int idLength = BinaryPrimitives.ReadUInt16BigEndian(fixedPart[12..]);
        int nameLength = BinaryPrimitives.ReadUInt16BigEndian(fixedPart[14..]);
        return (int)extra + idLength + nameLength;
    }

    /// <summary>
    /// Parses one entry from <paramref name="bytes"/> (fixed part, then extra data, ID and name);
    /// <paramref name="fileOffset"/> and <paramref name="index"/> only name the entry in errors.
    /// Returns the entry; <paramref name="paddedLength"/> is its length rounded up to 8.
    /// </summary>
    internal static SnapshotEntry Read(ReadOnlySpan<byte> bytes, long fileOffset, int index, out int paddedLength)
    {
        if (bytes.Length < FixedSize)
            throw new Qcow2FormatException($"snapshot table entry {index}", fileOffset, "truncated fixed part");
        int variable = VariableLength(bytes, fileOffset, index);
        if (bytes.Length < FixedSize + variable)
            throw new Qcow2FormatException($"snapshot table entry {index}", fileOffset, "truncated: ID, name or extra data run past the end of the table");
        var e = new SnapshotEntry
        {
            L1TableOffset = (long)BinaryPrimitives.ReadUInt64BigEndian(bytes),
            L1Size = BinaryPrimitives.ReadUInt32BigEndian(bytes[8..]),
            DateSeconds = BinaryPrimitives.ReadUInt32BigEndian(bytes[16..]),
            DateNanoseconds = BinaryPrimitives.ReadUInt32BigEndian(bytes[20..]),
            VmClockNanoseconds = BinaryPrimitives.ReadUInt64BigEndian(bytes[24..]),
            VmStateSize32 = BinaryPrimitives.ReadUInt32BigEndian(bytes[32..]),
        };
        int idLength = BinaryPrimitives.ReadUInt16BigEndian(bytes[12..]);
        int nameLength = BinaryPrimitives.ReadUInt16BigEndian(bytes[14..]);
        int extraLength = (int)BinaryPrimitives.ReadUInt32BigEndian(bytes[36..]);
        ReadOnlySpan<byte> extra = bytes.Slice(FixedSize, extraLength);
        if (extra.Length >= 8) e.VmStateSizeLarge = BinaryPrimitives.ReadUInt64BigEndian(extra);
        if (extra.Length >= 16) e.DiskSize = BinaryPrimitives.ReadUInt64BigEndian(extra[8..]);
        if (extra.Length >= 24) e.Icount = BinaryPrimitives.ReadInt64BigEndian(extra[16..]);
        if (extra.Length > KnownExtraDataSize) e.UnknownExtraData = extra[KnownExtraDataSize..].ToArray();
        int at = FixedSize + extraLength;
        e.Id = Encoding.UTF8.GetString(bytes.Slice(at, idLength));
        e.Name = Encoding.UTF8.GetString(bytes.Slice(at + idLength, nameLength));
        paddedLength = (FixedSize + variable + 7) & ~7;
        return e;
    }
}
