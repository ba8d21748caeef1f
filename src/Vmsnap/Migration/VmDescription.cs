using System.Text.Json;

namespace Vmsnap.Migration;

/// <summary>
/// The VM description QEMU appends after EOF: JSON giving, for every device section it wrote, the
/// fields with the bytes each took and the subsections written. Device sections carry no length of
/// their own, so this is the only way to walk them without QEMU's device models.
/// </summary>
internal sealed class VmDescription
{
    private VmDescription(int pageSize, IReadOnlyList<DeviceLayout> devices)
    {
        PageSize = pageSize;
        Devices = devices;
    }

    public int PageSize { get; }

    public IReadOnlyList<DeviceLayout> Devices { get; }

    /// <summary>A device's (or subsection's) state layout: its fields and the subsections written after them.</summary>
    internal sealed record Layout(string Name, uint Version, IReadOnlyList<MigrationDeviceField> Fields, IReadOnlyList<Layout> Subsections)
    {
        public long FieldBytes => Fields.Sum(f => f.Bytes);
    }

    internal sealed record DeviceLayout(string Name, uint Instance, Layout State);

    /// <summary>Parses the JSON; a document that is not JSON or not an object with a device list is refused.</summary>
    public static VmDescription Parse(ReadOnlySpan<byte> json, long offset)
    {
        try
        {
            using var doc = JsonDocument.Parse(json.ToArray(), new JsonDocumentOptions { MaxDepth = 256 });
            JsonElement root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw new MigrationStreamException("the VM description is not a JSON object", offset);
            int pageSize = root.TryGetProperty("page_size", out var ps) && ps.TryGetInt32(out int p) ? p : MigrationFormat.PageSize;
            var devices = new List<DeviceLayout>();
            if (root.TryGetProperty("devices", out var list))
            {
                if (list.ValueKind != JsonValueKind.Array)
                    throw new MigrationStreamException("the VM description's \"devices\" is not a list", offset);
                foreach (JsonElement d in list.EnumerateArray())
                {
                    string name = String(d, "name") ?? "?";
                    uint instance = UInt(d, "instance_id");
                    devices.Add(new DeviceLayout(name, instance, ParseLayout(d, String(d, "vmsd_name") ?? name)));
                }
            }
            return new VmDescription(pageSize, devices);
        }
        catch (JsonException e)
        {
            throw new MigrationStreamException($"the VM description is not valid JSON: {e.Message}", offset, e);
        }
    }

    private static Layout ParseLayout(JsonElement e, string name)
    {
        var fields = new List<MigrationDeviceField>();
        if (e.TryGetProperty("fields", out var fs) && fs.ValueKind == JsonValueKind.Array)
        {
            foreach (JsonElement f in fs.EnumerateArray())
            {
                long size = Long(f, "size");
                long count = f.TryGetProperty("array_len", out var n) && n.TryGetInt64(out long len) ? len : 1;
                fields.Add(new MigrationDeviceField(String(f, "name") ?? "?", String(f, "type") ?? "?", size * count));
            }
        }
        var subsections = new List<Layout>();
        if (e.TryGetProperty("subsections", out var ss) && ss.ValueKind == JsonValueKind.Array)
            foreach (JsonElement s in ss.EnumerateArray())
                subsections.Add(ParseLayout(s, String(s, "vmsd_name") ?? "?"));
        return new Layout(name, UInt(e, "version"), fields, subsections);
    }

    private static string? String(JsonElement e, string key) =>
        e.ValueKind == JsonValueKind.Object && e.TryGetProperty(key, out var v) && v.ValueKind == JsonValueKind.String ? v.GetString() : null;

    private static long Long(JsonElement e, string key) =>
        e.ValueKind == JsonValueKind.Object && e.TryGetProperty(key, out var v) && v.TryGetInt64(out long x) ? x : 0;

    private static uint UInt(JsonElement e, string key) =>
        e.ValueKind == JsonValueKind.Object && e.TryGetProperty(key, out var v) && v.TryGetUInt32(out uint x) ? x : 0;

    /// <summary>The public view of the devices.</summary>
    public IReadOnlyList<MigrationDeviceInfo> ToDeviceInfos() =>
        Devices.Select(d => new MigrationDeviceInfo(d.Name, d.Instance, d.State.Version, d.State.Fields, d.State.Subsections.Select(s => s.Name).ToArray())).ToArray();
}
