using System.Xml.Linq;
using Vmsnap.Qcow2;
using static Vmsnap.Live.Libvirt.LibvirtNative;

namespace Vmsnap.Live.Libvirt;

/// <summary>One snapshot name as libvirt and the domain's disks see it.</summary>
/// <param name="Name">The snapshot's name.</param>
/// <param name="InLibvirt">True when libvirt's metadata has it.</param>
/// <param name="Current">True when it is libvirt's current snapshot.</param>
/// <param name="Parent">Its parent in libvirt, if any.</param>
/// <param name="Disks">Each qcow2 disk of the domain (target name) with the ID of the snapshot of that name in its image, null when it has none.</param>
/// <param name="Problem">Where the views disagree, in a sentence; null when they agree.</param>
public sealed record LibvirtSnapshotView(string Name, bool InLibvirt, bool Current, string? Parent, IReadOnlyDictionary<string, string?> Disks, string? Problem);

/// <summary>libvirt's view of a domain's snapshots beside the disks' own, name by name.</summary>
internal static class LibvirtListing
{
    internal static IReadOnlyList<LibvirtSnapshotView> Of(LibvirtDomain domain)
    {
        XElement domainXml = XElement.Parse(domain.Xml(XmlSecure));
        var disks = new List<(string Target, string Image)>();
        foreach (XElement disk in domainXml.Element("devices")?.Elements("disk") ?? [])
        {
            if (disk.Attribute("device")?.Value is "cdrom" or "floppy" || disk.Element("driver")?.Attribute("type")?.Value != "qcow2") continue;
            if (disk.Element("target")?.Attribute("dev")?.Value is { } target && disk.Element("source")?.Attribute("file")?.Value is { } file)
                disks.Add((target, file));
        }
        // Shared and read-only: QEMU may be running on the images.
        var onDisk = new Dictionary<string, IReadOnlyList<Qcow2Snapshot>>(StringComparer.Ordinal);
        foreach ((string target, string image) in disks)
        {
            using Qcow2Image img = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true, ForceShare = true, OpenBackingFile = false });
            onDisk[target] = img.Snapshots;
        }
        string? current = domain.CurrentSnapshot();
        var libvirt = new Dictionary<string, XElement>(StringComparer.Ordinal);
        foreach (string name in domain.SnapshotNames())
            if (domain.SnapshotXml(name) is { } xml) libvirt[name] = XElement.Parse(xml);

        var names = libvirt.Keys.Concat(onDisk.Values.SelectMany(list => list.Select(s => s.Name))).Distinct(StringComparer.Ordinal).Order(StringComparer.Ordinal);
        var views = new List<LibvirtSnapshotView>();
        foreach (string name in names)
        {
            var perDisk = disks.ToDictionary(d => d.Target, d => onDisk[d.Target].FirstOrDefault(s => s.Name == name)?.Id, StringComparer.Ordinal);
            string? problem = null;
            if (libvirt.TryGetValue(name, out XElement? meta))
            {
                var internalDisks = (meta.Element("disks")?.Elements("disk") ?? []).Where(d => d.Attribute("snapshot")?.Value == "internal")
                    .Select(d => d.Attribute("name")?.Value ?? "").ToList();
                bool internalSnapshot = meta.Element("memory")?.Attribute("snapshot")?.Value == "internal" || internalDisks.Count > 0;
                var missing = internalDisks.Where(t => perDisk.TryGetValue(t, out string? id) && id is null).ToList();
                if (internalSnapshot && missing.Count > 0) problem = $"libvirt has it, but not disk(s) {string.Join(", ", missing)}";
                views.Add(new LibvirtSnapshotView(name, true, name == current, meta.Element("parent")?.Element("name")?.Value, perDisk, problem));
            }
            else
            {
                var without = perDisk.Where(d => d.Value is null).Select(d => d.Key).ToList();
                problem = "on the disks but not in libvirt" + (without.Count > 0 ? $" (and not on {string.Join(", ", without)})" : "");
                views.Add(new LibvirtSnapshotView(name, false, false, null, perDisk, problem));
            }
        }
        return views;
    }
}
