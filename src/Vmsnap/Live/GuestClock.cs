using System.Buffers.Binary;
using System.Text;
using Vmsnap.Migration;

namespace Vmsnap.Live;

/// <summary>
/// The guest's virtual clock at the stop, as QEMU's savevm records it in a snapshot (vm_clock_nsec),
/// read from the migration stream's "timer" device section.
/// </summary>
/// <remarks>
/// While the VM is stopped QEMU keeps its virtual clock in the timer state's cpu_clock_offset
/// (cpu_disable_ticks stores the clock there), and that is the third field of the "timer" section
/// (version 2: cpu_ticks_offset, 8 unused bytes, cpu_clock_offset, all big-endian). A migration
/// writes device sections after the stop, so the field holds the clock at the stop: what savevm's
/// qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) returns then. With icount (record/replay) the virtual clock
/// comes from the instruction counter instead; the section then carries an icount subsection and the
/// clock is not known here (0 is recorded, and icount -1 as without record/replay).
/// </remarks>
internal static class GuestClock
{
    private const string TimerSection = "timer";
    private const int FieldsBytes = 24;

    /// <summary>
    /// The clock in nanoseconds from the stream <paramref name="info"/> describes, reading its bytes
    /// with <paramref name="read"/> (stream offset, buffer); null when the stream has no usable timer section.
    /// </summary>
    internal static long? FromStream(MigrationStreamInfo info, Func<long, byte[], int> read)
    {
        MigrationSectionInfo? timer = info.Sections.FirstOrDefault(s => s.Kind == MigrationSectionKind.Device && s.Name == TimerSection);
        if (timer is not null)
        {
            byte[] bytes = new byte[(int)Math.Min(timer.Bytes, 4096)];
            return read(timer.Offset, bytes) == bytes.Length ? Parse(bytes) : null;
        }
        // The device sections could not be walked with the VM description: the timer section is still
        // easy to find right after the RAM section, where QEMU writes it (it is registered first).
        MigrationSectionInfo? ram = info.Sections.FirstOrDefault(s => s.Kind == MigrationSectionKind.Ram);
        if (ram is null) return null;
        byte[] tail = new byte[(int)Math.Min(64 << 10, Math.Max(0, info.TotalBytes - (ram.Offset + ram.Bytes)))];
        int n = read(ram.Offset + ram.Bytes, tail);
        ReadOnlySpan<byte> span = tail.AsSpan(0, n);
        byte[] name = Encoding.ASCII.GetBytes(TimerSection);
        for (int at = 0; at + 19 + FieldsBytes <= span.Length; at++)
        {
            if (span[at] != 0x04 || span[at + 5] != name.Length || !span.Slice(at + 6, name.Length).SequenceEqual(name)) continue;
            long? clock = Parse(span[at..]);
            if (clock is not null) return clock;
        }
        return null;
    }

    /// <summary>The clock from a whole "timer" section (SECTION_FULL header onwards), or null if it is not the version-2 layout without subsections.</summary>
    internal static long? Parse(ReadOnlySpan<byte> section)
    {
        // 0x04, be32 section id, u8 5 "timer", be32 instance, be32 version: 19 bytes.
        if (section.Length < 19 + FieldsBytes + 1 || section[0] != 0x04 || section[5] != TimerSection.Length) return null;
        if (!section.Slice(6, TimerSection.Length).SequenceEqual(Encoding.ASCII.GetBytes(TimerSection))) return null;
        uint version = BinaryPrimitives.ReadUInt32BigEndian(section.Slice(15, 4));
        if (version != 2) return null;
        ReadOnlySpan<byte> fields = section.Slice(19, FieldsBytes);
        byte next = section[19 + FieldsBytes];
        if (next != 0x7e) return null;   // a subsection (icount) follows: the clock is the instruction counter's
        long clock = BinaryPrimitives.ReadInt64BigEndian(fields.Slice(16, 8));
        return clock >= 0 ? clock : null;
    }
}
