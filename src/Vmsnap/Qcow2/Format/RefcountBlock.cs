using System.Buffers.Binary;

namespace Vmsnap.Qcow2;

/// <summary>
/// Refcount block encoding: entries of 2^order bits. Sub-byte widths (1, 2, 4 bits) pack from the
/// least significant bit of each byte; wider ones are big-endian.
/// </summary>
internal static class RefcountBlock
{
    internal static ulong Get(ReadOnlySpan<byte> block, long index, int order)
    {
        switch (order)
        {
            case 0: return (ulong)(block[(int)(index >> 3)] >> (int)(index & 7)) & 1;
            case 1: return (ulong)(block[(int)(index >> 2)] >> (int)(2 * (index & 3))) & 3;
            case 2: return (ulong)(block[(int)(index >> 1)] >> (int)(4 * (index & 1))) & 15;
            case 3: return block[(int)index];
            case 4: return BinaryPrimitives.ReadUInt16BigEndian(block[(int)(index * 2)..]);
            case 5: return BinaryPrimitives.ReadUInt32BigEndian(block[(int)(index * 4)..]);
            case 6: return BinaryPrimitives.ReadUInt64BigEndian(block[(int)(index * 8)..]);
            default: throw new ArgumentOutOfRangeException(nameof(order));
        }
    }

    internal static void Set(Span<byte> block, long index, int order, ulong value)
    {
        switch (order)
        {
            case 0: SetBits(block, (int)(index >> 3), (int)(index & 7), 1, value); break;
            case 1: SetBits(block, (int)(index >> 2), (int)(2 * (index & 3)), 3, value); break;
            case 2: SetBits(block, (int)(index >> 1), (int)(4 * (index & 1)), 15, value); break;
            case 3: block[(int)index] = checked((byte)value); break;
            case 4: BinaryPrimitives.WriteUInt16BigEndian(block[(int)(index * 2)..], checked((ushort)value)); break;
            case 5: BinaryPrimitives.WriteUInt32BigEndian(block[(int)(index * 4)..], checked((uint)value)); break;
            case 6: BinaryPrimitives.WriteUInt64BigEndian(block[(int)(index * 8)..], value); break;
            default: throw new ArgumentOutOfRangeException(nameof(order));
        }
    }

    private static void SetBits(Span<byte> block, int at, int shift, int mask, ulong value)
    {
        if (value > (ulong)mask) throw new OverflowException($"refcount {value} does not fit in {mask switch { 1 => 1, 3 => 2, _ => 4 }} bits");
        block[at] = (byte)((block[at] & ~(mask << shift)) | ((int)value << shift));
    }
}
