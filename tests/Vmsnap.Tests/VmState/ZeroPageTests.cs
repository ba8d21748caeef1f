using Vmsnap.VmState;

namespace Vmsnap.Tests.VmState;

/// <summary>Zero detection is exact in every vector width: one non-zero byte anywhere makes a page non-zero.</summary>
[Trait("Category", "Unit")]
public sealed class ZeroPageTests
{
    private static readonly Func<byte[], bool>[] Widths =
    [
        b => ZeroPage.IsZero(b),
        b => ZeroPage.IsZero512(b),
        b => ZeroPage.IsZero256(b),
        b => ZeroPage.IsZero128(b),
        b => ZeroPage.IsZeroScalar(b),
    ];

    [Fact]
    public void A_page_with_one_non_zero_byte_at_any_position_is_not_zero()
    {
        byte[] page = new byte[ZeroPage.Size];
        foreach (Func<byte[], bool> isZero in Widths)
        {
            Assert.True(isZero(page));
            for (int i = 0; i < page.Length; i++)
            {
                foreach (byte value in new byte[] { 0x01, 0x80, 0xFF })
                {
                    page[i] = value;
                    Assert.False(isZero(page), $"byte {i} = {value:x2} missed");
                }
                page[i] = 0;
            }
        }
    }

    [Fact]
    public void Any_length_with_one_non_zero_byte_is_not_zero()
    {
        // Lengths around every vector width and its unrolled step, so each tail path runs.
        foreach (Func<byte[], bool> isZero in Widths)
        {
            for (int length = 0; length <= 300; length++)
            {
                byte[] data = new byte[length];
                Assert.True(isZero(data));
                for (int i = 0; i < length; i++)
                {
                    data[i] = 1;
                    Assert.False(isZero(data), $"length {length}: byte {i} missed");
                    data[i] = 0;
                }
            }
        }
    }

    [Fact]
    public void A_slice_that_excludes_the_non_zero_bytes_is_zero()
    {
        // Unaligned starts: the check must not read outside the span.
        byte[] data = new byte[ZeroPage.Size + 200];
        data[99] = 1;
        data[100 + ZeroPage.Size] = 1;
        Assert.True(ZeroPage.IsZero(data.AsSpan(100, ZeroPage.Size)));
        Assert.False(ZeroPage.IsZero(data.AsSpan(99, ZeroPage.Size)));
        Assert.False(ZeroPage.IsZero(data.AsSpan(101, ZeroPage.Size)));
    }
}
