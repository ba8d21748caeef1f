using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;

namespace Vmsnap.Migration;

/// <summary>
/// Zero-page detection for RAM encoding: SIMD over the widest hardware vector (512, 256 or 128
/// bits), four vectors per step, stopping at the first non-zero block.
/// </summary>
internal static class ZeroPage
{
    /// <summary>Guest page size of the RAM stream.</summary>
    internal const int Size = 4096;

    /// <summary>True when every byte of <paramref name="data"/> is zero.</summary>
    internal static bool IsZero(ReadOnlySpan<byte> data)
    {
        // Pages with data nearly always differ from zero at the start or the end: check those first.
        if (data.Length >= 16)
        {
            ref byte p = ref MemoryMarshal.GetReference(data);
            if ((Unsafe.ReadUnaligned<ulong>(ref p) | Unsafe.ReadUnaligned<ulong>(ref Unsafe.Add(ref p, data.Length - 8))) != 0)
                return false;
        }
        if (Vector512.IsHardwareAccelerated) return IsZero512(data);
        if (Vector256.IsHardwareAccelerated) return IsZero256(data);
        if (Vector128.IsHardwareAccelerated) return IsZero128(data);
        return IsZeroScalar(data);
    }

    internal static bool IsZero512(ReadOnlySpan<byte> data)
    {
        ref byte p = ref MemoryMarshal.GetReference(data);
        nuint length = (nuint)data.Length, width = (nuint)Vector512<byte>.Count, i = 0;
        if (length < width) return IsZeroScalar(data);
        for (; i + 4 * width <= length; i += 4 * width)
        {
            Vector512<byte> any = Vector512.LoadUnsafe(ref p, i) | Vector512.LoadUnsafe(ref p, i + width)
                | Vector512.LoadUnsafe(ref p, i + 2 * width) | Vector512.LoadUnsafe(ref p, i + 3 * width);
            if (any != Vector512<byte>.Zero) return false;
        }
        for (; i + width <= length; i += width)
            if (Vector512.LoadUnsafe(ref p, i) != Vector512<byte>.Zero) return false;
        // The tail: one last vector ending at the end (overlapping bytes already seen).
        return i == length || Vector512.LoadUnsafe(ref p, length - width) == Vector512<byte>.Zero;
    }

    internal static bool IsZero256(ReadOnlySpan<byte> data)
    {
        ref byte p = ref MemoryMarshal.GetReference(data);
        nuint length = (nuint)data.Length, width = (nuint)Vector256<byte>.Count, i = 0;
        if (length < width) return IsZeroScalar(data);
        for (; i + 4 * width <= length; i += 4 * width)
        {
            Vector256<byte> any = Vector256.LoadUnsafe(ref p, i) | Vector256.LoadUnsafe(ref p, i + width)
                | Vector256.LoadUnsafe(ref p, i + 2 * width) | Vector256.LoadUnsafe(ref p, i + 3 * width);
            if (any != Vector256<byte>.Zero) return false;
        }
        for (; i + width <= length; i += width)
            if (Vector256.LoadUnsafe(ref p, i) != Vector256<byte>.Zero) return false;
        return i == length || Vector256.LoadUnsafe(ref p, length - width) == Vector256<byte>.Zero;
    }

    internal static bool IsZero128(ReadOnlySpan<byte> data)
    {
        ref byte p = ref MemoryMarshal.GetReference(data);
        nuint length = (nuint)data.Length, width = (nuint)Vector128<byte>.Count, i = 0;
        if (length < width) return IsZeroScalar(data);
        for (; i + 4 * width <= length; i += 4 * width)
        {
            Vector128<byte> any = Vector128.LoadUnsafe(ref p, i) | Vector128.LoadUnsafe(ref p, i + width)
                | Vector128.LoadUnsafe(ref p, i + 2 * width) | Vector128.LoadUnsafe(ref p, i + 3 * width);
            if (any != Vector128<byte>.Zero) return false;
        }
        for (; i + width <= length; i += width)
            if (Vector128.LoadUnsafe(ref p, i) != Vector128<byte>.Zero) return false;
        return i == length || Vector128.LoadUnsafe(ref p, length - width) == Vector128<byte>.Zero;
    }

    internal static bool IsZeroScalar(ReadOnlySpan<byte> data)
    {
        int i = 0;
        for (; i + 8 <= data.Length; i += 8)
            if (MemoryMarshal.Read<ulong>(data[i..]) != 0) return false;
        for (; i < data.Length; i++)
            if (data[i] != 0) return false;
        return true;
    }
}
