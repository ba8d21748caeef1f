using System.Buffers.Binary;
using System.Text;

namespace Vmsnap.Migration;

/// <summary>
/// The run state a migration stream carries in its "globalstate" section, which decides whether a
/// destination starts the guest: "running" lets QEMU obey its own -S, anything else (such as
/// "paused") is imposed. QEMU's savevm records "running" for a guest that ran before the save, even
/// though it stops it first; a migration records the state at its end. So when vmsnap stops a running
/// guest for a save (no --live), the stream says "paused", and <see cref="MarkRunning"/> puts back the
/// "running" that QEMU's savevm would have written, as the section is copied.
/// </summary>
internal sealed class GlobalState : IRecordTransform
{
    private const string Section = "globalstate";

    private GlobalState() { }

    /// <summary>
    /// Rewrites the stream's global run state from "paused" to "running". A stream without the section (a destination then
    /// obeys -S anyway) or with a layout other than QEMU's (u32 size, then the run state as a NUL-terminated string in a
    /// buffer, as the VM description lists them) is copied as it is.
    /// </summary>
    public static IRecordTransform MarkRunning { get; } = new GlobalState();

    public MigrationRecord Apply(MigrationRecord record)
    {
        if (record is not DeviceSectionRecord { Kind: MigrationSectionKind.Device, Layout: { Fields.Count: >= 2 } layout } section
            || section.Name != Section)
            return record;
        MigrationDeviceField size = layout.Fields[0], runstate = layout.Fields[1];
        if (size is not { Name: "size", Bytes: 4 } || runstate.Name != "runstate" || runstate.Bytes is < 8 or > 4096) return record;
        int fields = section.HeaderLength, length = 4 + (int)runstate.Bytes;
        if (fields + length > section.Length) return record;
        ReadOnlySpan<byte> buffer = section.Bytes.Span.Slice(fields + 4, length - 4);
        int end = buffer.IndexOf((byte)0);
        if (Encoding.ASCII.GetString(end < 0 ? buffer : buffer[..end]) != "paused") return record;
        byte[] patched = section.Bytes.ToArray();
        patched.AsSpan(fields, length).Clear();
        byte[] running = Encoding.ASCII.GetBytes("running");
        BinaryPrimitives.WriteUInt32BigEndian(patched.AsSpan(fields), (uint)running.Length + 1);
        running.CopyTo(patched, fields + 4);
        return section.With(patched);
    }
}
