using System.Buffers.Binary;
using System.Text;

namespace Vmsnap.Migration;

/// <summary>
/// Everything after the RAM section's end: device sections, EOF, and the VM description. vmsnap
/// carries these bytes verbatim; this type checks their framing and, with the VM description, cuts
/// them into device section records.
/// </summary>
internal static class DeviceStateTail
{
    /// <summary>
    /// The records of <paramref name="tail"/> (which starts at stream offset <paramref name="offset"/>): the device
    /// sections walked with the VM description, the rest up to EOF as one record when the walk stopped early, EOF,
    /// and the VM description. A tail that does not end with EOF and the VM description is refused (truncated or
    /// trailing bytes); a walk that does not fit the description is only reported, because QEMU itself does not
    /// need the description to load.
    /// </summary>
    public static List<MigrationRecord> Records(ReadOnlyMemory<byte> tail, long offset)
    {
        if (tail.IsEmpty)
            throw new MigrationStreamException(
                "the stream ends right after the RAM section; expected device sections, EOF (0x00) and the VM description (0x06)", offset);

        // QEMU writes the description unless the machine suppresses it (no x86 machine does); requiring
        // it is what lets a stream cut short in its device state be told from a complete one.
        int eof = FindVmDescription(tail.Span);
        if (eof < 0)
            throw new MigrationStreamException(
                "the stream does not end with EOF (0x00) followed by the VM description (0x06, be32 length, JSON): it is truncated, " +
                "has bytes after its end, or comes from a machine that suppresses the VM description (not supported)",
                offset + tail.Length);
        byte[] json = tail[(eof + 6)..].ToArray();
        VmDescription description = VmDescription.Parse(json, offset + eof + 6);

        var records = new List<MigrationRecord>();
        (string? problem, int stopped) = Walk(tail[..eof], offset, description, MigrationSectionKind.Device, records);
        if (problem is not null) records.Add(new UnwalkedDeviceStateRecord(offset + stopped, tail[stopped..eof], problem));
        records.Add(new EofRecord(offset + eof));
        records.Add(new VmDescriptionRecord(offset + eof + 1, json, description));
        return records;
    }

    /// <summary>
    /// Checks an early-setup section (found by its footer, as it carries no length; at <paramref name="offset"/>) against
    /// the VM description: null when its fields take exactly the bytes found, else why not.
    /// </summary>
    public static string? CheckEarlySection(DeviceSectionRecord section, long offset, VmDescription description)
    {
        var found = new List<MigrationRecord>();
        (string? problem, _) = Walk(section.Bytes, offset, description, MigrationSectionKind.EarlySetup, found);
        if (problem is not null) return $"early-setup section '{section.Name}': {problem}";
        return found.Count == 1 ? null : $"early-setup section '{section.Name}' at offset {offset} does not match the VM description";
    }

    /// <summary>Index of the EOF byte that precedes the VM description, or -1 when the tail does not end with one.</summary>
    private static int FindVmDescription(ReadOnlySpan<byte> tail)
    {
        // From the end backwards: the first 0x06 whose be32 length reaches exactly to the end. JSON text
        // has no raw control bytes, so no byte of the description itself can look like that marker.
        for (int p = tail.Length - 5; p >= 1; p--)
        {
            if (tail[p] == MigrationFormat.VmDescription
                && tail[p - 1] == MigrationFormat.Eof
                && BinaryPrimitives.ReadUInt32BigEndian(tail.Slice(p + 1, 4)) == (uint)(tail.Length - p - 5))
                return p - 1;
        }
        return -1;
    }

    /// <summary>Cuts device sections off <paramref name="sectionsBytes"/> while they fit the description; returns why it stopped (null at the end) and where.</summary>
    private static (string? Problem, int Stopped) Walk(ReadOnlyMemory<byte> sectionsBytes, long offset, VmDescription description,
        MigrationSectionKind kind, List<MigrationRecord> result)
    {
        var byKey = new Dictionary<(string, uint), VmDescription.Layout>();
        foreach (var d in description.Devices) byKey.TryAdd((d.Name, d.Instance), d.State);

        ReadOnlySpan<byte> bytes = sectionsBytes.Span;
        int pos = 0;
        while (pos < bytes.Length)
        {
            int start = pos;
            string? problem = WalkSection(bytes, ref pos, offset, byKey, out VmDescription.Layout? layout);
            if (problem is not null) return (problem, start);
            result.Add(new DeviceSectionRecord(offset + start, kind, sectionsBytes[start..pos], layout));
        }
        return (null, pos);
    }

    private static string? WalkSection(ReadOnlySpan<byte> sectionsBytes, ref int pos, long offset,
        Dictionary<(string, uint), VmDescription.Layout> byKey, out VmDescription.Layout? layout)
    {
        layout = null;
        int start = pos;
        byte type = sectionsBytes[pos];
        if (type != MigrationFormat.SectionFull)
            return $"at offset {offset + pos}: expected a device section (SECTION_FULL 0x04), found {MigrationFormat.DescribeSectionType(type)}";
        pos++;
        if (!TryBe32(sectionsBytes, ref pos, out uint id) || !TryId(sectionsBytes, ref pos, out string name)
            || !TryBe32(sectionsBytes, ref pos, out uint instance) || !TryBe32(sectionsBytes, ref pos, out _))
            return $"at offset {offset + start}: device section header runs past EOF";
        if (!byKey.TryGetValue((name, instance), out layout))
            return $"at offset {offset + start}: device section '{name}' instance {instance} is not in the VM description";
        string? problem = WalkLayout(sectionsBytes, ref pos, offset, layout, name);
        if (problem is not null) return problem;
        if (pos >= sectionsBytes.Length || sectionsBytes[pos] != MigrationFormat.SectionFooter)
            return $"at offset {offset + pos}: expected the footer of device section '{name}' (id {id}) after the fields the VM description lists";
        pos++;
        if (!TryBe32(sectionsBytes, ref pos, out uint footerId) || footerId != id)
            return $"at offset {offset + pos - 4}: footer of device section '{name}' does not name section id {id}";
        return null;
    }

    private static string? WalkLayout(ReadOnlySpan<byte> bytes, ref int pos, long offset, VmDescription.Layout layout, string section)
    {
        long fieldBytes = layout.FieldBytes;
        if (fieldBytes < 0 || fieldBytes > bytes.Length - pos)
            return $"at offset {offset + pos}: the fields of '{layout.Name}' ({fieldBytes} bytes by the VM description) run past EOF";
        pos += (int)fieldBytes;
        foreach (var sub in layout.Subsections)
        {
            int at = pos;
            if (pos >= bytes.Length || bytes[pos] != MigrationFormat.Subsection)
                return $"at offset {offset + at}: expected subsection '{sub.Name}' of device section '{section}'";
            pos++;
            if (!TryId(bytes, ref pos, out string name) || name != sub.Name || !TryBe32(bytes, ref pos, out _))
                return $"at offset {offset + at}: expected subsection '{sub.Name}' of device section '{section}'";
            string? problem = WalkLayout(bytes, ref pos, offset, sub, section);
            if (problem is not null) return problem;
        }
        return null;
    }

    private static bool TryBe32(ReadOnlySpan<byte> b, ref int pos, out uint value)
    {
        value = 0;
        if (b.Length - pos < 4) return false;
        value = BinaryPrimitives.ReadUInt32BigEndian(b.Slice(pos, 4));
        pos += 4;
        return true;
    }

    private static bool TryId(ReadOnlySpan<byte> b, ref int pos, out string id)
    {
        id = "";
        if (pos >= b.Length) return false;
        int len = b[pos];
        if (b.Length - pos - 1 < len) return false;
        id = Encoding.UTF8.GetString(b.Slice(pos + 1, len));
        pos += 1 + len;
        return true;
    }
}
