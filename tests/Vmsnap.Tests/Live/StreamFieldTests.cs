using System.Buffers.Binary;
using System.Text;
using Vmsnap.Live;

namespace Vmsnap.Tests.Live;

/// <summary>The fields a live save reads from the device state: the guest clock in the "timer" section (checked against QEMU's own savevm in LiveInteropTests).</summary>
[Trait("Category", "Unit")]
public class StreamFieldTests
{
    /// <summary>A "timer" section as QEMU writes it: SECTION_FULL, id, "timer", instance 0, version, three be64 fields, then a footer or a subsection.</summary>
    private static byte[] Timer(uint version, long clock, byte after)
    {
        var s = new MemoryStream();
        s.WriteByte(0x04);
        Span<byte> b = stackalloc byte[8];
        BinaryPrimitives.WriteUInt32BigEndian(b, 7); s.Write(b[..4]);
        s.WriteByte(5); s.Write(Encoding.ASCII.GetBytes("timer"));
        BinaryPrimitives.WriteUInt32BigEndian(b, 0); s.Write(b[..4]);
        BinaryPrimitives.WriteUInt32BigEndian(b, version); s.Write(b[..4]);
        BinaryPrimitives.WriteInt64BigEndian(b, 123456789); s.Write(b);   // cpu_ticks_offset
        s.Write(new byte[8]);                                               // unused
        BinaryPrimitives.WriteInt64BigEndian(b, clock); s.Write(b);         // cpu_clock_offset
        s.WriteByte(after);
        s.Write(new byte[8]);
        return s.ToArray();
    }

    [Fact]
    public void The_guest_clock_is_the_timer_sections_third_field()
    {
        Assert.Equal(7_313_210_100, GuestClock.Parse(Timer(2, 7_313_210_100, 0x7e)));
    }

    [Fact]
    public void With_an_icount_subsection_or_another_layout_the_clock_is_unknown()
    {
        Assert.Null(GuestClock.Parse(Timer(2, 5, 0x05)));   // icount: the clock is the instruction counter's
        Assert.Null(GuestClock.Parse(Timer(1, 5, 0x7e)));
        Assert.Null(GuestClock.Parse(Timer(2, -1, 0x7e)));
        Assert.Null(GuestClock.Parse(Timer(2, 5, 0x7e).AsSpan(0, 30)));
    }
}
