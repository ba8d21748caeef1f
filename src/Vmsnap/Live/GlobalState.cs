using System.Buffers.Binary;
using System.Text;
using Vmsnap.Migration;

namespace Vmsnap.Live;

/// <summary>
/// The run state a migration stream carries in its "globalstate" section, which decides whether a
/// destination starts the guest: "running" lets QEMU obey its own -S, anything else (such as
/// "paused") is imposed. QEMU's savevm records "running" for a guest that ran before the save, even
/// though it stops it first; a migration records the state at its end. So when vmsnap stops a running
/// guest for a save (no --live), the stream says "paused", and this puts back the "running" that
/// QEMU's savevm would have written, in the bytes already written.
/// </summary>
internal static class GlobalState
{
    private const string Section = "globalstate";

    /// <summary>
    /// Rewrites the stream's global run state from "paused" to "running" through <paramref name="write"/>
    /// (stream offset, bytes); <paramref name="read"/> reads stream bytes. Returns false when the stream
    /// has no such section (a destination then obeys -S anyway) or a layout other than QEMU's
    /// (u32 size, then the run state as a NUL-terminated string in a buffer).
    /// </summary>
    internal static bool MarkRunning(MigrationStreamInfo info, Func<long, byte[], int> read, Action<long, byte[]> write)
    {
        MigrationSectionInfo? section = info.Sections.FirstOrDefault(s => s.Kind == MigrationSectionKind.Device && s.Name == Section);
        MigrationDeviceInfo? device = info.Devices.FirstOrDefault(d => d.Name == Section);
        if (section is null || device is null || device.Fields.Count < 2) return false;
        MigrationDeviceField size = device.Fields[0], runstate = device.Fields[1];
        if (size is not { Name: "size", Bytes: 4 } || runstate.Name != "runstate" || runstate.Bytes is < 8 or > 4096) return false;
        // SECTION_FULL, be32 id, u8 length + "globalstate", be32 instance, be32 version; then the fields.
        long fields = section.Offset + 1 + 4 + 1 + Section.Length + 4 + 4;
        byte[] current = new byte[4 + runstate.Bytes];
        if (read(fields, current) != current.Length) return false;
        int end = Array.IndexOf(current, (byte)0, 4);
        string state = Encoding.ASCII.GetString(current, 4, (end < 0 ? current.Length : end) - 4);
        if (state != "paused") return state == "running";
        byte[] patched = new byte[current.Length];
        byte[] running = Encoding.ASCII.GetBytes("running");
        BinaryPrimitives.WriteUInt32BigEndian(patched, (uint)running.Length + 1);
        running.CopyTo(patched, 4);
        write(fields, patched);
        return true;
    }
}
