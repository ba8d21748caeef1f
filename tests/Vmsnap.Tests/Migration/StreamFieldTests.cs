using System.Buffers.Binary;
using System.Text;
using Vmsnap.Migration;

namespace Vmsnap.Tests.Migration;

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

/// <summary>The run state a stopped save writes back as "running" while the stream is copied (checked with a real guest in LiveSaveLoadTests).</summary>
[Trait("Category", "Unit")]
public class GlobalStateTests
{
    /// <summary>A stream whose device state is QEMU's "globalstate" section: u32 size, then the run state in a 100-byte buffer.</summary>
    private static byte[] Stream(string runState, string secondField = "runstate")
    {
        byte[] buffer = new byte[100];
        Encoding.ASCII.GetBytes(runState).CopyTo(buffer, 0);
        return new StreamBuilder()
            .Header().Configuration("none")
            .Start(2).BlockList(("ram0", 4096)).EndOfRecords().Footer(2)
            .End(2).ZeroRecord(0, "ram0").EndOfRecords().Footer(2)
            .Full(5, "globalstate", 0, 1).Be32((uint)runState.Length + 1).Raw(buffer).Footer(5)
            .Tail("{\"page_size\": 4096, \"devices\": [{\"name\": \"globalstate\", \"instance_id\": 0, \"vmsd_name\": \"globalstate\", \"version\": 1, " +
                  $"\"fields\": [{{\"name\": \"size\", \"type\": \"uint32\", \"size\": 4}}, {{\"name\": \"{secondField}\", \"type\": \"buffer\", \"size\": 100}}]}}]}}")
            .ToArray();
    }

    private static byte[] CopyMarkingRunning(byte[] stream) =>
        StreamFiles.WriteBytes(w => StreamFiles.ReadBytes(stream, r =>
            MigrationStream.CopyStream(r, null, w, MigrationStreamFormat.Plain, [GlobalState.MarkRunning], null, default))).Bytes;

    [Fact]
    public void Paused_becomes_running_and_every_other_byte_stays()
    {
        byte[] paused = Stream("paused"), running = Stream("running");
        Assert.Equal(paused.Length, running.Length);
        Assert.Equal(running, CopyMarkingRunning(paused));
    }

    [Fact]
    public void Another_state_or_another_layout_is_copied_as_it_is()
    {
        byte[] running = Stream("running"), suspended = Stream("suspended"), other = Stream("paused", secondField: "state");
        Assert.Equal(running, CopyMarkingRunning(running));
        Assert.Equal(suspended, CopyMarkingRunning(suspended));
        Assert.Equal(other, CopyMarkingRunning(other));
    }
}
