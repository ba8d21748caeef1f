using System.Text.Json;

namespace Vmsnap.Migration;

/// <summary>
/// The VM description QEMU appends after EOF: JSON giving, for every device section it wrote, the
/// fields with the bytes each took and the subsections written. Device sections carry no length of
/// their own, so this is the only way to walk them without QEMU's device models.
/// </summary>
internal sealed class VmDescription
{
    private VmDescription(IReadOnlyList<DeviceLayout> devices) => Devices = devices;

    public IReadOnlyList<DeviceLayout> Devices { get; }

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
            return new VmDescription(devices);
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

    /// <summary>The public view of the devices.</summary>
    public IReadOnlyList<MigrationDeviceInfo> ToDeviceInfos() =>
        Devices.Select(d => new MigrationDeviceInfo(d.Name, d.Instance, d.State.Version, d.State.Fields, d.State.Subsections.Select(s => s.Name).ToArray())).ToArray();
}
