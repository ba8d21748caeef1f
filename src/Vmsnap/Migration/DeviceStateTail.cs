using System.Buffers.Binary;
using System.Text;

namespace Vmsnap.Migration;

/// <summary>
/// Everything after the RAM section's end: device sections, EOF, and the VM description. vmsnap
/// carries these bytes verbatim; this type checks their framing and, with the VM description, lists
/// the device sections one by one.
/// </summary>
internal sealed class DeviceStateTail
{
    private DeviceStateTail(VmDescription description, IReadOnlyList<MigrationSectionInfo> sections, string? problem)
    {
        Description = description;
        Sections = sections;
        Problem = problem;
    }

    /// <summary>The parsed VM description.</summary>
    public VmDescription Description { get; }

    /// <summary>Device sections walked with the VM description (all of them when <see cref="Problem"/> is null).</summary>
    public IReadOnlyList<MigrationSectionInfo> Sections { get; }

    /// <summary>Why the walk stopped early, or null.</summary>
    public string? Problem { get; }

    /// <summary>
    /// Checks that <paramref name="tail"/> (which starts at stream offset <paramref name="offset"/>) ends
    /// with EOF and the VM description, then walks the device sections. A tail that
    /// does not end that way is refused (truncated or trailing bytes); a walk that does not fit the
    /// description is only reported, because QEMU itself does not need the description to load.
    /// </summary>
    public static DeviceStateTail Analyze(ReadOnlySpan<byte> tail, long offset)
    {
        if (tail.IsEmpty)
            throw new MigrationStreamException(
                "the stream ends right after the RAM section; expected device sections, EOF (0x00) and the VM description (0x06)", offset);

        // QEMU writes the description unless the machine suppresses it (no x86 machine does); requiring
        // it is what lets a stream cut short in its device state be told from a complete one.
        int eof = FindVmDescription(tail);
        if (eof < 0)
            throw new MigrationStreamException(
                "the stream does not end with EOF (0x00) followed by the VM description (0x06, be32 length, JSON): it is truncated, " +
                "has bytes after its end, or comes from a machine that suppresses the VM description (not supported)",
                offset + tail.Length);
        VmDescription description = VmDescription.Parse(tail[(eof + 6)..], offset + eof + 6);

        var sections = new List<MigrationSectionInfo>();
        string? problem = Walk(tail[..eof], offset, description, sections);
        return new DeviceStateTail(description, sections, problem);
    }

    /// <summary>
    /// The tail with its VM description replaced by <paramref name="edit"/>'s result (the device sections and EOF
    /// unchanged): what a rewrite into another RAM layout writes.
    /// </summary>
    public static byte[] WithDescription(byte[] tail, long offset, Func<byte[], byte[]> edit)
    {
        int eof = FindVmDescription(tail);
        if (eof < 0) throw new MigrationStreamException("the stream does not end with EOF (0x00) followed by the VM description (0x06)", offset + tail.Length);
        byte[] json = edit(tail[(eof + 6)..]);
        byte[] result = new byte[eof + 6 + json.Length];
        tail.AsSpan(0, eof + 2).CopyTo(result);
        BinaryPrimitives.WriteUInt32BigEndian(result.AsSpan(eof + 2), (uint)json.Length);
        json.CopyTo(result, eof + 6);
        return result;
    }

    /// <summary>
    /// Checks an early-setup section (found by its footer, as it carries no length) against the VM description:
    /// null when its fields take exactly the bytes found, else why not.
    /// </summary>
    public static string? CheckEarlySection(byte[] section, long offset, VmDescription description, string name)
    {
        var found = new List<MigrationSectionInfo>();
        string? problem = Walk(section, offset, description, found);
        if (problem is not null) return $"early-setup section '{name}': {problem}";
        return found.Count == 1 ? null : $"early-setup section '{name}' at offset {offset} does not match the VM description";
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

    private static string? Walk(ReadOnlySpan<byte> sectionsBytes, long offset, VmDescription description, List<MigrationSectionInfo> result)
    {
        var byKey = new Dictionary<(string, uint), VmDescription.Layout>();
        foreach (var d in description.Devices) byKey.TryAdd((d.Name, d.Instance), d.State);

        int pos = 0;
        while (pos < sectionsBytes.Length)
        {
            int start = pos;
            byte type = sectionsBytes[pos];
            if (type != MigrationFormat.SectionFull)
                return $"at offset {offset + pos}: expected a device section (SECTION_FULL 0x04), found {MigrationFormat.DescribeSectionType(type)}";
            pos++;
            if (!TryBe32(sectionsBytes, ref pos, out uint id) || !TryId(sectionsBytes, ref pos, out string name)
                || !TryBe32(sectionsBytes, ref pos, out uint instance) || !TryBe32(sectionsBytes, ref pos, out uint version))
                return $"at offset {offset + start}: device section header runs past EOF";
            if (!byKey.TryGetValue((name, instance), out var layout))
                return $"at offset {offset + start}: device section '{name}' instance {instance} is not in the VM description";
            string? problem = WalkLayout(sectionsBytes, ref pos, offset, layout, name);
            if (problem is not null) return problem;
            if (pos >= sectionsBytes.Length || sectionsBytes[pos] != MigrationFormat.SectionFooter)
                return $"at offset {offset + pos}: expected the footer of device section '{name}' (id {id}) after the fields the VM description lists";
            pos++;
            if (!TryBe32(sectionsBytes, ref pos, out uint footerId) || footerId != id)
                return $"at offset {offset + pos - 4}: footer of device section '{name}' does not name section id {id}";
            result.Add(new MigrationSectionInfo(MigrationSectionKind.Device, id, name, instance, version, offset + start, 1, pos - start));
        }
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
