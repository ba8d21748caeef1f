using System.Text.Json.Nodes;
using Vmsnap.Live.Qmp;

namespace Vmsnap.Live;

/// <summary>What QEMU's savevm does with a drive.</summary>
internal enum LiveDiskKind
{
    /// <summary>A writable qcow2 image in a regular file: gets the snapshot.</summary>
    Qcow2,

    /// <summary>Read-only: skipped, as QEMU's savevm skips it.</summary>
    ReadOnly,

    /// <summary>No medium: skipped.</summary>
    Empty,

    /// <summary>Writable but vmsnap cannot snapshot it (raw, another format, a filter on top, not a regular file): the save is refused.</summary>
    Unsupported,
}

/// <summary>A dirty bitmap QEMU keeps for a drive; persistent ones are written into the image when QEMU releases it.</summary>
internal sealed record LiveDirtyBitmap(string Name, long Granularity, bool Persistent);

/// <summary>One drive of a running QEMU, as query-block, query-blockstats and query-named-block-nodes describe it.</summary>
/// <param name="Device">The drive's name (<c>virtio0</c>, the <c>id</c> of <c>-drive</c>), or "" for a <c>-blockdev</c> drive.</param>
/// <param name="Qdev">The guest device's QOM path or id, if any.</param>
/// <param name="NodeName">The drive's root (format) node.</param>
/// <param name="Driver">The root node's driver (<c>qcow2</c>, <c>raw</c>, <c>throttle</c>, ...), or null when empty.</param>
/// <param name="FileNodeName">The node under the format node (its protocol layer), if any.</param>
/// <param name="FileDriver">That node's driver (<c>file</c> for a regular file).</param>
/// <param name="ImagePath">The image file's path as QEMU opened it (made absolute against QEMU's working folder).</param>
/// <param name="Kind">What savevm does with it.</param>
/// <param name="Problem">Why an <see cref="LiveDiskKind.Unsupported"/> drive cannot be snapshot.</param>
/// <param name="VirtualSize">The virtual disk's size.</param>
/// <param name="DirtyBitmaps">Its dirty bitmaps.</param>
internal sealed record LiveDisk(string Device, string? Qdev, string? NodeName, string? Driver, string? FileNodeName, string? FileDriver,
    string? ImagePath, LiveDiskKind Kind, string? Problem, long VirtualSize, IReadOnlyList<LiveDirtyBitmap> DirtyBitmaps)
{
    /// <summary>How messages name the drive: its name, else its device, else its node.</summary>
    internal string Label => Device.Length > 0 ? Device : Qdev ?? NodeName ?? "(unnamed)";

    /// <summary>True when <paramref name="id"/> names this drive: its name, node name, device id or QOM path.</summary>
    internal bool IsNamed(string id) =>
        id == Device || id == NodeName || id == Qdev || (Qdev is not null && (Qdev.EndsWith("/" + id, StringComparison.Ordinal) || Qdev.EndsWith("/" + id + "/virtio-backend", StringComparison.Ordinal)));
}

/// <summary>The drives of a running QEMU, classified the way QEMU's savevm and loadvm treat them.</summary>
internal static class QemuBlockDevices
{
    /// <summary>Asks QEMU for its drives.</summary>
    internal static IReadOnlyList<LiveDisk> Query(IQmpConnection qmp)
    {
        var blocks = qmp.Execute("query-block") as JsonArray ?? [];
        var stats = qmp.Execute("query-blockstats", new JsonObject { ["query-nodes"] = false }) as JsonArray ?? [];
        var nodes = new Dictionary<string, JsonObject>(StringComparer.Ordinal);
        foreach (JsonNode? n in qmp.Execute("query-named-block-nodes", new JsonObject { ["flat"] = true }) as JsonArray ?? [])
            if (n is JsonObject o && Str(o["node-name"]) is { } name) nodes.TryAdd(name, o);
        string? cwd = QemuWorkingFolder(qmp);

        var disks = new List<LiveDisk>();
        foreach (JsonNode? b in blocks)
        {
            if (b is not JsonObject block) continue;
            string device = Str(block["device"]) ?? "";
            string? qdev = Str(block["qdev"]);
            if (block["inserted"] is not JsonObject inserted)
            {
                disks.Add(new LiveDisk(device, qdev, null, null, null, null, null, LiveDiskKind.Empty, null, 0, []));
                continue;
            }
            string? node = Str(inserted["node-name"]);
            string? driver = Str(inserted["drv"]);
            bool readOnly = inserted["ro"] is JsonValue ro && ro.TryGetValue(out bool r) && r;
            long size = inserted["image"]?["virtual-size"] is JsonValue vs && vs.TryGetValue(out long s) ? s : 0;
            var bitmaps = Bitmaps(inserted["dirty-bitmaps"] as JsonArray ?? block["dirty-bitmaps"] as JsonArray);

            // The format node's protocol child, as blockstats reports it ("parent" is the node's file child).
            JsonObject? stat = stats.OfType<JsonObject>().FirstOrDefault(x =>
                (node is not null && Str(x["node-name"]) == node) || (device.Length > 0 && Str(x["device"]) == device));
            string? fileNode = Str(stat?["parent"]?["node-name"]);
            JsonObject? file = fileNode is not null && nodes.TryGetValue(fileNode, out JsonObject? f) ? f : null;
            string? fileDriver = Str(file?["drv"]);
            string? path = Str(file?["file"]) ?? Str(inserted["file"]);
            if (path is not null && cwd is not null && !path.StartsWith('/') && !path.Contains(':')) path = System.IO.Path.Combine(cwd, path);

            LiveDiskKind kind;
            string? problem = null;
            string label = device.Length > 0 ? device : qdev ?? node ?? "(unnamed)";
            if (readOnly)
            {
                kind = LiveDiskKind.ReadOnly;
            }
            else if (driver != "qcow2")
            {
                kind = LiveDiskKind.Unsupported;
                problem = driver is "raw" or "vmdk" or "vpc" or "vdi" or "vhdx" or "qed" or "parallels" or "luks" or "bochs" or "cloop" or "dmg"
                    ? $"Device '{label}' is writable but does not support snapshots (its format is {driver}; internal snapshots need qcow2)"
                    : $"Device '{label}' is writable and its top node '{node}' is a '{driver}' node; vmsnap snapshots qcow2 images attached directly to a drive";
            }
            else if (inserted["image"]?["format-specific"]?["data"]?["data-file"] is not null)
            {
                kind = LiveDiskKind.Unsupported;
                problem = $"Device '{label}' is a qcow2 image with an external data file; vmsnap cannot keep VM state there";
            }
            else if (fileDriver != "file" || path is null || !System.IO.Path.IsPathRooted(path))
            {
                kind = LiveDiskKind.Unsupported;
                problem = fileDriver != "file"
                    ? $"Device '{label}': its qcow2 image is on a '{fileDriver ?? "unknown"}' node, not a regular file; vmsnap writes VM state into image files only"
                    : $"Device '{label}': cannot tell where its image '{path}' is (a relative path, and QEMU's working folder is unknown)";
            }
            else
            {
                kind = LiveDiskKind.Qcow2;
            }
            disks.Add(new LiveDisk(device, qdev, node, driver, fileNode, fileDriver, path, kind, problem, size, bitmaps));
        }
        return disks;
    }

    /// <summary>The highest host offset QEMU ever wrote to a drive's image file (query-blockstats wr_highest_offset of its protocol node).</summary>
    internal static long HighestWrite(IQmpConnection qmp, LiveDisk disk)
    {
        var stats = qmp.Execute("query-blockstats", new JsonObject { ["query-nodes"] = true }) as JsonArray ?? [];
        foreach (JsonNode? s in stats)
        {
            if (s is not JsonObject o || Str(o["node-name"]) != disk.FileNodeName) continue;
            if (o["stats"]?["wr_highest_offset"] is JsonValue v && v.TryGetValue(out long offset)) return offset;
        }
        throw new QmpException($"QEMU's block statistics do not list the image node '{disk.FileNodeName}' of drive '{disk.Label}' any more");
    }

    private static IReadOnlyList<LiveDirtyBitmap> Bitmaps(JsonArray? list)
    {
        if (list is null) return [];
        var result = new List<LiveDirtyBitmap>();
        foreach (JsonNode? b in list)
        {
            if (b is not JsonObject o) continue;
            long granularity = o["granularity"] is JsonValue g && g.TryGetValue(out long gv) ? gv : 65536;
            bool persistent = o["persistent"] is JsonValue p && p.TryGetValue(out bool pv) && pv;
            result.Add(new LiveDirtyBitmap(Str(o["name"]) ?? "", Math.Max(512, granularity), persistent));
        }
        return result;
    }

    /// <summary>QEMU's working folder (to resolve relative image paths), from the peer process of the QMP socket.</summary>
    private static string? QemuWorkingFolder(IQmpConnection qmp)
    {
        if (qmp.PeerProcessId is not int pid) return null;
        try
        {
            return new DirectoryInfo($"/proc/{pid}/cwd").ResolveLinkTarget(returnFinalTarget: true)?.FullName;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return null;
        }
    }

    internal static string? Str(JsonNode? n) => n is JsonValue v && v.TryGetValue(out string? s) ? s : null;

    /// <summary>A JSON number as a long, 0 when absent or not one.</summary>
    internal static long Long(JsonNode? n) => n is JsonValue v && v.TryGetValue(out long l) ? l : 0;

    /// <summary>A JSON boolean, false when absent or not one.</summary>
    internal static bool Bool(JsonNode? n) => n is JsonValue v && v.TryGetValue(out bool b) && b;
}
