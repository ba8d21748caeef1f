using System.Text;
using System.Text.Json;

namespace Vmsnap.Migration;

/// <summary>
/// The VM description QEMU appends after EOF: JSON giving, for every device section it wrote, the
/// fields with the bytes each took and the subsections written. Device sections carry no length of
/// their own, so this is the only way to walk them without QEMU's device models.
/// </summary>
internal sealed class VmDescription
{
    private VmDescription(IReadOnlyList<DeviceLayout> devices, bool hasConfiguration)
    {
        Devices = devices;
        HasConfiguration = hasConfiguration;
    }

    public IReadOnlyList<DeviceLayout> Devices { get; }

    /// <summary>True for the shape of QEMU 8.2 and later: a <c>"configuration"</c> object (the configuration section's layout) first.</summary>
    public bool HasConfiguration { get; }

    /// <summary>A device's (or subsection's) state layout: its fields and the subsections written after them.</summary>
    internal sealed record Layout(string Name, uint Version, IReadOnlyList<MigrationDeviceField> Fields, IReadOnlyList<Layout> Subsections)
    {
        public long FieldBytes => MigrationDeviceField.Total(Fields);
    }

    internal sealed record DeviceLayout(string Name, uint Instance, Layout State);

    /// <summary>
    /// Parses the JSON; a document that is not JSON, not an object with a device list, or whose devices,
    /// fields or subsections are not objects is refused. Values of the wrong type count as missing.
    /// </summary>
    public static VmDescription Parse(ReadOnlySpan<byte> json, long offset)
    {
        // The JSON reader checks UTF-8 only when a string is read out (GetString throws InvalidOperationException).
        if (!System.Text.Unicode.Utf8.IsValid(json))
            throw new MigrationStreamException("the VM description is not valid JSON: it is not UTF-8 text", offset);
        try
        {
            using var doc = JsonDocument.Parse(json.ToArray(), new JsonDocumentOptions { MaxDepth = 256 });
            JsonElement root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw new MigrationStreamException("the VM description is not a JSON object", offset);
            var devices = new List<DeviceLayout>();
            if (root.TryGetProperty("devices", out var list))
            {
                if (list.ValueKind != JsonValueKind.Array)
                    throw new MigrationStreamException("the VM description's \"devices\" is not a list", offset);
                foreach (JsonElement d in list.EnumerateArray())
                {
                    RequireObject(d, $"device {devices.Count}", offset);
                    string name = String(d, "name") ?? "?";
                    uint instance = UInt(d, "instance_id");
                    devices.Add(new DeviceLayout(name, instance, ParseLayout(d, String(d, "vmsd_name") ?? name, offset)));
                }
            }
            return new VmDescription(devices, root.TryGetProperty("configuration", out var c) && c.ValueKind == JsonValueKind.Object);
        }
        catch (JsonException e)
        {
            throw new MigrationStreamException($"the VM description is not valid JSON: {e.Message}", offset, e);
        }
    }

    private static Layout ParseLayout(JsonElement e, string name, long offset)
    {
        var fields = new List<MigrationDeviceField>();
        if (e.TryGetProperty("fields", out var fs) && fs.ValueKind == JsonValueKind.Array)
        {
            foreach (JsonElement f in fs.EnumerateArray())
            {
                RequireObject(f, $"field {fields.Count} of '{name}'", offset);
                Int128 bytes = (Int128)Long(f, "size", 0) * Long(f, "array_len", 1);
                fields.Add(new MigrationDeviceField(String(f, "name") ?? "?", String(f, "type") ?? "?",
                    (long)Int128.Clamp(bytes, long.MinValue, long.MaxValue)));
            }
        }
        var subsections = new List<Layout>();
        if (e.TryGetProperty("subsections", out var ss) && ss.ValueKind == JsonValueKind.Array)
        {
            foreach (JsonElement s in ss.EnumerateArray())
            {
                RequireObject(s, $"subsection {subsections.Count} of '{name}'", offset);
                subsections.Add(ParseLayout(s, String(s, "vmsd_name") ?? "?", offset));
            }
        }
        return new Layout(name, UInt(e, "version"), fields, subsections);
    }

    private static void RequireObject(JsonElement e, string what, long offset)
    {
        if (e.ValueKind != JsonValueKind.Object)
            throw new MigrationStreamException($"the VM description's {what} is not a JSON object", offset);
    }

    private static string? String(JsonElement e, string key) =>
        e.TryGetProperty(key, out var v) && v.ValueKind == JsonValueKind.String ? v.GetString() : null;

    private static long Long(JsonElement e, string key, long missing) =>
        e.TryGetProperty(key, out var v) && v.ValueKind == JsonValueKind.Number && v.TryGetInt64(out long x) ? x : missing;

    private static uint UInt(JsonElement e, string key) =>
        e.TryGetProperty(key, out var v) && v.ValueKind == JsonValueKind.Number && v.TryGetUInt32(out uint x) ? x : 0;

    // QEMU's JSON writer: ", " between members and elements, ": " after keys. What vmsnap adds is
    // spelled the same way, and everything it does not change stays byte for byte.

    /// <summary>The configuration section's layout as QEMU 8.2+ describes it, for a machine type name of <paramref name="nameBytes"/> bytes.</summary>
    private static string ConfigurationObject(int nameBytes, bool mappedRam) =>
        "{\"vmsd_name\": \"configuration\", \"version\": 1, \"fields\": [{\"name\": \"len\", \"type\": \"uint32\", \"size\": 4}, " +
        $"{{\"name\": \"name\", \"type\": \"buffer\", \"size\": {nameBytes}}}]" +
        (mappedRam ? ", \"subsections\": [" + CapabilitiesSubsection + "]" : "") + "}";

    /// <summary>The capabilities subsection listing only mapped-ram, as QEMU 9.0+ describes it.</summary>
    private const string CapabilitiesSubsection =
        "{\"vmsd_name\": \"configuration/capabilities\", \"version\": 1, \"fields\": [{\"name\": \"caps_count\", \"type\": \"uint32\", \"size\": 4}, " +
        "{\"name\": \"capabilities\", \"type\": \"capability\", \"size\": 11}]}";

    /// <summary>
    /// The description of a machine without device sections: QEMU 8.2+'s shape (configuration object first)
    /// or, with <paramref name="configurationObject"/> false, the older one QEMU 7.2 writes.
    /// </summary>
    public static byte[] Empty(string machineType, bool configurationObject) => Encoding.UTF8.GetBytes(
        configurationObject
            ? "{\"configuration\": " + ConfigurationObject(Encoding.UTF8.GetByteCount(machineType), false) + ", \"page_size\": 4096, \"devices\": []}"
            : MigrationFormat.EmptyVmDescription);

    /// <summary>
    /// The description with the configuration's capabilities subsection gone (a mapped-ram stream rewritten as a
    /// plain one): the description QEMU writes for the same machine without the capability. Unchanged when it has none.
    /// </summary>
    public static byte[] WithoutCapabilities(byte[] json, long offset)
    {
        var root = Members(json, 0, json.Length, offset);
        int ri = root.FindIndex(m => m.Name == "configuration");
        if (ri < 0 || json[root[ri].ValueStart] != (byte)'{') return json;
        Member config = root[ri];
        var configMembers = Members(json, config.ValueStart, config.ValueEnd, offset);
        int si = configMembers.FindIndex(m => m.Name == "subsections");
        if (si < 0 || json[configMembers[si].ValueStart] != (byte)'[') return json;
        Member subsections = configMembers[si];
        var elements = Elements(json, subsections.ValueStart, subsections.ValueEnd, offset);
        int ci = elements.FindIndex(e => VmsdName(json.AsSpan(e.Start, e.End - e.Start)) == MigrationFormat.SubsectionCapabilities);
        if (ci < 0) return json;
        (int cut, int end) = elements.Count == 1
            // The only subsection: the whole member goes, with the separator before it.
            ? (si > 0 ? configMembers[si - 1].ValueEnd : subsections.NameStart, si > 0 ? subsections.ValueEnd : NextStart(configMembers, si, subsections.ValueEnd))
            : (ci > 0 ? elements[ci - 1].End : elements[ci].Start, ci > 0 ? elements[ci].End : elements[ci + 1].Start);
        return [.. json[..cut], .. json[end..]];
    }

    /// <summary>
    /// The description with the configuration's capabilities subsection listing mapped-ram (a stream rewritten as a
    /// mapped-ram file): added to the configuration object, which is added first when the description has none
    /// (QEMU before 8.2). Unchanged when it already has a capabilities subsection.
    /// </summary>
    public static byte[] WithMappedRam(byte[] json, string machineType, long offset)
    {
        var root = Members(json, 0, json.Length, offset);
        int ri = root.FindIndex(m => m.Name == "configuration");
        if (ri < 0 || json[root[ri].ValueStart] != (byte)'{')
        {
            string add = "\"configuration\": " + ConfigurationObject(Encoding.UTF8.GetByteCount(machineType), true) + (root.Count > 0 ? ", " : "");
            int at = Array.IndexOf(json, (byte)'{') + 1;
            return [.. json[..at], .. Encoding.UTF8.GetBytes(add), .. json[at..]];
        }
        Member config = root[ri];
        var configMembers = Members(json, config.ValueStart, config.ValueEnd, offset);
        int si = configMembers.FindIndex(m => m.Name == "subsections");
        if (si < 0)
        {
            int close = config.ValueEnd - 1;   // the configuration object's '}'
            byte[] add = Encoding.UTF8.GetBytes((configMembers.Count > 0 ? ", " : "") + "\"subsections\": [" + CapabilitiesSubsection + "]");
            return [.. json[..close], .. add, .. json[close..]];
        }
        Member subsections = configMembers[si];
        var elements = Elements(json, subsections.ValueStart, subsections.ValueEnd, offset);
        if (elements.Exists(e => VmsdName(json.AsSpan(e.Start, e.End - e.Start)) == MigrationFormat.SubsectionCapabilities)) return json;
        // QEMU's order: target page bits, capabilities, UUID.
        int before = elements.FindIndex(e => VmsdName(json.AsSpan(e.Start, e.End - e.Start)) == MigrationFormat.SubsectionUuid);
        byte[] element = Encoding.UTF8.GetBytes(CapabilitiesSubsection);
        if (elements.Count == 0)
            return [.. json[..(subsections.ValueEnd - 1)], .. element, .. json[(subsections.ValueEnd - 1)..]];
        if (before < 0)
            return [.. json[..elements[^1].End], .. ", "u8, .. element, .. json[elements[^1].End..]];
        return [.. json[..elements[before].Start], .. element, .. ", "u8, .. json[elements[before].Start..]];
    }

    private readonly record struct Member(string Name, int NameStart, int ValueStart, int ValueEnd);

    private static int NextStart(List<Member> members, int index, int fallback) =>
        index + 1 < members.Count ? members[index + 1].NameStart : fallback;

    /// <summary>The members of the object at json[start..end): names and where their values lie.</summary>
    private static List<Member> Members(ReadOnlySpan<byte> json, int start, int end, long offset)
    {
        var list = new List<Member>();
        var reader = new Utf8JsonReader(json[start..end], new JsonReaderOptions { MaxDepth = 256 });
        try
        {
            if (!reader.Read() || reader.TokenType != JsonTokenType.StartObject)
                throw new MigrationStreamException("the VM description is not a JSON object", offset);
            while (reader.Read() && reader.TokenType == JsonTokenType.PropertyName)
            {
                string name = reader.GetString() ?? "";
                int nameStart = start + (int)reader.TokenStartIndex;
                reader.Read();
                int valueStart = start + (int)reader.TokenStartIndex;
                reader.Skip();
                list.Add(new Member(name, nameStart, valueStart, start + (int)reader.BytesConsumed));
            }
        }
        catch (JsonException e)
        {
            throw new MigrationStreamException($"the VM description is not valid JSON: {e.Message}", offset, e);
        }
        return list;
    }

    /// <summary>The elements of the array at json[start..end).</summary>
    private static List<(int Start, int End)> Elements(ReadOnlySpan<byte> json, int start, int end, long offset)
    {
        var list = new List<(int, int)>();
        var reader = new Utf8JsonReader(json[start..end], new JsonReaderOptions { MaxDepth = 256 });
        try
        {
            reader.Read();
            while (reader.Read() && reader.TokenType != JsonTokenType.EndArray)
            {
                int s = start + (int)reader.TokenStartIndex;
                reader.Skip();
                list.Add((s, start + (int)reader.BytesConsumed));
            }
        }
        catch (JsonException e)
        {
            throw new MigrationStreamException($"the VM description is not valid JSON: {e.Message}", offset, e);
        }
        return list;
    }

    private static string? VmsdName(ReadOnlySpan<byte> element)
    {
        try
        {
            using var doc = JsonDocument.Parse(element.ToArray());
            return doc.RootElement.ValueKind == JsonValueKind.Object ? String(doc.RootElement, "vmsd_name") : null;
        }
        catch (JsonException)
        {
            return null;
        }
    }

    /// <summary>The public view of the devices.</summary>
    public IReadOnlyList<MigrationDeviceInfo> ToDeviceInfos() =>
        Devices.Select(d => new MigrationDeviceInfo(d.Name, d.Instance, d.State.Version, d.State.Fields, d.State.Subsections.Select(s => s.Name).ToArray())).ToArray();
}
