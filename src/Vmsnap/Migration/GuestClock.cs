using System.Buffers.Binary;
using System.Text;

namespace Vmsnap.Migration;

/// <summary>
/// The guest's virtual clock at the stop, as QEMU's savevm records it in a snapshot (vm_clock_nsec),
/// read from the migration stream's "timer" device section as it is copied.
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
internal sealed class GuestClock : IRecordTransform
{
    private const string TimerSection = "timer";
    private const int FieldsBytes = 24;
    private bool _timerSeen;

    /// <summary>The clock in nanoseconds, once the device state went by; null when the stream has no usable timer section.</summary>
    public long? Nanoseconds { get; private set; }

    public MigrationRecord Apply(MigrationRecord record)
    {
        switch (record)
        {
            case DeviceSectionRecord { Kind: MigrationSectionKind.Device } section when !_timerSeen && section.Name == TimerSection:
                _timerSeen = true;
                Nanoseconds = Parse(section.Bytes.Span[..Math.Min(section.Bytes.Length, 4096)]);
                break;
            case UnwalkedDeviceStateRecord unwalked when !_timerSeen:
                // The device sections could not be walked with the VM description: the timer section is still easy to
                // find near the start of the device state, where QEMU writes it (it is registered first).
                Nanoseconds = Search(unwalked.Bytes.Span[..Math.Min(unwalked.Bytes.Length, 64 << 10)]);
                break;
        }
        return record;
    }

    private static long? Search(ReadOnlySpan<byte> bytes)
    {
        byte[] name = Encoding.ASCII.GetBytes(TimerSection);
        for (int at = 0; at + 19 + FieldsBytes <= bytes.Length; at++)
        {
            if (bytes[at] != MigrationFormat.SectionFull || bytes[at + 5] != name.Length || !bytes.Slice(at + 6, name.Length).SequenceEqual(name)) continue;
            if (Parse(bytes[at..]) is { } clock) return clock;
        }
        return null;
    }

    /// <summary>The clock from a whole "timer" section (SECTION_FULL header onwards), or null if it is not the version-2 layout without subsections.</summary>
    internal static long? Parse(ReadOnlySpan<byte> section)
    {
        // 0x04, be32 section id, u8 5 "timer", be32 instance, be32 version: 19 bytes.
        if (section.Length < 19 + FieldsBytes + 1 || section[0] != MigrationFormat.SectionFull || section[5] != TimerSection.Length) return null;
        if (!section.Slice(6, TimerSection.Length).SequenceEqual(Encoding.ASCII.GetBytes(TimerSection))) return null;
        uint version = BinaryPrimitives.ReadUInt32BigEndian(section.Slice(15, 4));
        if (version != 2) return null;
        ReadOnlySpan<byte> fields = section.Slice(19, FieldsBytes);
        if (section[19 + FieldsBytes] != MigrationFormat.SectionFooter) return null;   // a subsection (icount) follows: the clock is the instruction counter's
        long clock = BinaryPrimitives.ReadInt64BigEndian(fields.Slice(16, 8));
        return clock >= 0 ? clock : null;
    }
}
