using System.Buffers.Binary;
using System.Text;

namespace Vmsnap.Qcow2;

internal sealed partial class SnapshotEntry
{
    private int ExtraDataLength =>
        UnknownExtraData.Length > 0 || Icount is not null ? KnownExtraDataSize + UnknownExtraData.Length
        : DiskSize is not null ? 16
        : VmStateSizeLarge is not null ? 8
        : 0;

    /// <summary>Bytes this entry takes in the table, padding to 8 included.</summary>
    internal int EncodedLength =>
        (FixedSize + ExtraDataLength + Encoding.UTF8.GetByteCount(Id) + Encoding.UTF8.GetByteCount(Name) + 7) & ~7;

    /// <summary>Bytes this entry takes in the table before its padding.</summary>
    internal int UnpaddedLength =>
        FixedSize + ExtraDataLength + Encoding.UTF8.GetByteCount(Id) + Encoding.UTF8.GetByteCount(Name);

    /// <summary>
    /// A copy with the extra data QEMU writes for every entry whenever it writes a snapshot table:
    /// the 64-bit VM-state size, the disk size (<paramref name="diskSize"/>, the current one, when the
    /// entry had none) and icount (-1 when none); the 32-bit size derived from the 64-bit one.
    /// Version 3 images need the first two; QEMU's check reports entries without them.
    /// </summary>
    internal SnapshotEntry WithCompleteExtraData(long diskSize)
    {
        ulong vmState = VmStateSizeLarge ?? VmStateSize32;
        return new SnapshotEntry
        {
            L1TableOffset = L1TableOffset,
            L1Size = L1Size,
            Id = Id,
            Name = Name,
            DateSeconds = DateSeconds,
            DateNanoseconds = DateNanoseconds,
            VmClockNanoseconds = VmClockNanoseconds,
            VmStateSize32 = vmState <= uint.MaxValue ? (uint)vmState : 0,
            VmStateSizeLarge = vmState,
            DiskSize = DiskSize ?? (ulong)diskSize,
            Icount = Icount ?? -1,
            UnknownExtraData = UnknownExtraData,
        };
    }

    /// <summary>Encodes the entry (with padding) into <paramref name="destination"/>; returns the bytes used.</summary>
    internal int Write(Span<byte> destination)
    {
        byte[] id = Encoding.UTF8.GetBytes(Id);
        byte[] name = Encoding.UTF8.GetBytes(Name);
        if (id.Length > ushort.MaxValue || name.Length > ushort.MaxValue)
            throw new ArgumentException("snapshot ID and name must each fit in 65535 bytes");
        int extraLength = ExtraDataLength;
        int length = EncodedLength;
        Span<byte> b = destination[..length];
        b.Clear();
        BinaryPrimitives.WriteUInt64BigEndian(b, (ulong)L1TableOffset);
        BinaryPrimitives.WriteUInt32BigEndian(b[8..], L1Size);
        BinaryPrimitives.WriteUInt16BigEndian(b[12..], (ushort)id.Length);
        BinaryPrimitives.WriteUInt16BigEndian(b[14..], (ushort)name.Length);
        BinaryPrimitives.WriteUInt32BigEndian(b[16..], DateSeconds);
        BinaryPrimitives.WriteUInt32BigEndian(b[20..], DateNanoseconds);
        BinaryPrimitives.WriteUInt64BigEndian(b[24..], VmClockNanoseconds);
        BinaryPrimitives.WriteUInt32BigEndian(b[32..], VmStateSize32);
        BinaryPrimitives.WriteUInt32BigEndian(b[36..], (uint)extraLength);
        Span<byte> extra = b.Slice(FixedSize, extraLength);
        if (extraLength >= 8) BinaryPrimitives.WriteUInt64BigEndian(extra, VmStateSizeLarge ?? VmStateSize32);
        if (extraLength >= 16) BinaryPrimitives.WriteUInt64BigEndian(extra[8..], DiskSize ?? 0);
        if (extraLength >= 24) BinaryPrimitives.WriteInt64BigEndian(extra[16..], Icount ?? -1);
        UnknownExtraData.CopyTo(extra[Math.Min(extraLength, KnownExtraDataSize)..]);
        id.CopyTo(b[(FixedSize + extraLength)..]);
        name.CopyTo(b[(FixedSize + extraLength + id.Length)..]);
        return length;
    }
}
