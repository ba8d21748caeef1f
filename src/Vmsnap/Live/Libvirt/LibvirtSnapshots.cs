using System.Globalization;
using System.Xml.Linq;
using static Vmsnap.Live.Libvirt.LibvirtNative;

namespace Vmsnap.Live.Libvirt;

/// <summary>
/// vmsnap's live save and load for a libvirt domain: QEMU is reached through the monitor libvirt owns
/// (virDomainQemuMonitorCommandWithFiles, libvirt 8.2 and later; libvirt marks the domain tainted "custom-monitor"),
/// and the snapshot is recorded in libvirt's metadata (a REDEFINE, which touches no image) as libvirt itself records an
/// internal snapshot with memory, so that virsh snapshot-list, snapshot-info, snapshot-dumpxml, snapshot-revert and
/// snapshot-delete work on it. See docs/libvirt.md.
/// </summary>
public static class LibvirtSnapshots
{
    /// <summary>
    /// Saves libvirt domain <paramref name="domain"/> (running or paused) as snapshot <paramref name="tag"/> of all its writable
    /// qcow2 disks, then records it in libvirt as the domain's current snapshot, child of the one that was current.
    /// </summary>
    /// <param name="domain">The domain's name.</param>
    /// <param name="tag">The snapshot's name; neither libvirt nor any disk may have it yet.</param>
    /// <param name="connectUri">libvirt's URI; null for libvirt's default, as virsh picks it (LIBVIRT_DEFAULT_URI, else qemu:///system for root).</param>
    /// <param name="options">As for <see cref="LiveSnapshots.SaveVm"/>.</param>
    /// <param name="ramBytesDone">Receives the bytes of RAM saved so far.</param>
    /// <param name="cancellationToken">Stops the save; nothing is left behind and the guest runs again.</param>
    /// <exception cref="VmsnapException">As <see cref="LiveSnapshots.SaveVm"/>; also when libvirt cannot be reached, has no such domain, the
    /// domain is not running, or libvirt already has a snapshot <paramref name="tag"/>. When libvirt refuses the record, the snapshot is
    /// deleted from the disks again: libvirt's view and the disks' always agree.</exception>
    public static LiveSaveResult SaveVm(string domain, string tag, string? connectUri = null, LiveSaveOptions? options = null,
        IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default)
    {
        if (string.IsNullOrEmpty(tag)) throw new OperationRefusedException("a snapshot needs a name (TAG)");
        options ??= new LiveSaveOptions();
        using LibvirtDomain dom = LibvirtDomain.Open(connectUri, domain);
        LiveTrace.Mark("libvirt connected");
        int state = dom.State;
        if (state is not (DomainRunning or DomainPaused))
            throw new OperationRefusedException($"domain '{domain}' is {StateName(state)}: vmsnap savevm saves a running or paused domain (start it with virsh start); nothing was saved");
        if (dom.SnapshotXml(tag) is not null)
            throw new OperationRefusedException($"libvirt already has a snapshot '{tag}' of domain '{domain}'; delete it (virsh snapshot-delete {domain} {tag}) or choose another name; nothing was saved");
        var domainXml = XElement.Parse(dom.Xml(XmlSecure));
        // What an earlier save cut short (vmsnap or libvirtd killed) left is undone first, through QEMU and in libvirt's view.
        Action<LiveRecoveryResult>? recovered = options.Recovered;
        options = options with { Recovered = r => recovered?.Invoke(Reconcile(dom, r)) };

        LiveSaveResult result;
        using (LibvirtMonitor monitor = LibvirtMonitor.Open(dom))
        {
            LiveTrace.Mark("monitor open");
            result = new LiveSave(monitor, tag, options, ramBytesDone, cancellationToken).Run();
            // Read after the save: a recovery at its start may have recorded the cut-off save's snapshot as the current one.
            string? parent = dom.CurrentSnapshot();
            string snapshotXml = SnapshotXml(tag, state == DomainRunning ? "running" : "paused", parent, result.Date, domainXml, result.Disks);
            try
            {
                dom.Redefine(snapshotXml, current: true);
            }
            catch (LiveSnapshotException e)
            {
                // The disks have the snapshot, libvirt does not: take it off the disks again (QEMU holds them again, so through QEMU).
                string undo;
                try
                {
                    monitor.Execute("human-monitor-command", new System.Text.Json.Nodes.JsonObject { ["command-line"] = "delvm " + tag });
                    undo = "the snapshot was deleted from the disks again; nothing was saved";
                }
                catch (QmpException d)
                {
                    undo = $"deleting it from the disks again failed too ({d.Message}): delete it with virsh qemu-monitor-command --hmp {domain} 'delvm {tag}'";
                }
                throw new LiveSnapshotException($"{e.Message}; {undo}", e);
            }
        }
        return result;
    }

    /// <summary>
    /// Undoes what a save of libvirt domain <paramref name="domain"/> cut short (vmsnap killed, or libvirtd killed under it) left,
    /// through the monitor libvirt owns, as <see cref="LiveSnapshots.Recover"/> does on a QMP socket; then brings libvirt's view in
    /// line with the disks: a snapshot left complete on every disk is recorded in libvirt as the save would have recorded it.
    /// <see cref="SaveVm"/> does the same first, on its own.
    /// </summary>
    /// <param name="domain">The domain's name; it must be running or paused (libvirt reconnects to its QEMU when libvirtd restarts).</param>
    /// <param name="connectUri">libvirt's URI; null for libvirt's default.</param>
    /// <param name="cancellationToken">Stops waiting.</param>
    /// <returns>What was found and done; <see cref="LiveRecoveryResult.Found"/> is false when no save had been cut short.</returns>
    /// <exception cref="VmsnapException">As <see cref="LiveSnapshots.Recover"/>; also when libvirt cannot be reached or the domain is not running.</exception>
    public static LiveRecoveryResult Recover(string domain, string? connectUri = null, CancellationToken cancellationToken = default)
    {
        using LibvirtDomain dom = LibvirtDomain.Open(connectUri, domain);
        int state = dom.State;
        if (state is not (DomainRunning or DomainPaused))
            throw new OperationRefusedException($"domain '{domain}' is {StateName(state)}: a cut-off save leaves its traces in a running QEMU; with the domain stopped there is nothing to recover there (vmsnap snapshot list --domain {domain} shows the disks beside libvirt); nothing was done");
        using LibvirtMonitor monitor = LibvirtMonitor.Open(dom);
        LiveRecoveryResult r = LiveRecovery.Explicit(monitor, cancellationToken);
        return r.Found ? Reconcile(dom, r) : r;
    }

    /// <summary>
    /// After a recovery: the cut-off save's snapshot, complete on every writable qcow2 disk of the domain but unknown to libvirt, is
    /// recorded (REDEFINE) as the domain's current snapshot, as the save would have done. A snapshot on some disks only is left as the
    /// recovery left it (its actions say so), and nothing is recorded for it.
    /// </summary>
    private static LiveRecoveryResult Reconcile(LibvirtDomain dom, LiveRecoveryResult r)
    {
        if (r.Tag is not { } tag || r.Snapshot is not ("kept" or "finished") || dom.SnapshotXml(tag) is not null) return r;
        var domainXml = XElement.Parse(dom.Xml(XmlSecure));
        var saved = new List<LiveDiskSnapshot>();
        DateTimeOffset date = DateTimeOffset.UtcNow;
        foreach ((string target, string image) in WritableQcow2Disks(domainXml))
        {
            using Qcow2.Qcow2Image img = Qcow2.Qcow2Image.Open(image, new Qcow2.Qcow2OpenOptions { ReadOnly = true, ForceShare = true });
            if (img.FindSnapshot(tag) is not { } s) return r;
            if (s.VmStateSize > 0) date = s.Date;
            saved.Add(new LiveDiskSnapshot(target, image, s.Id, s.VmStateSize > 0));
        }
        if (saved.Count == 0) return r;
        string state = r.Resumed || r.RunState == "running" ? "running" : "paused";
        dom.Redefine(SnapshotXml(tag, state, dom.CurrentSnapshot(), date, domainXml, saved), current: true);
        return r with { Actions = [.. r.Actions, $"recorded snapshot '{tag}', complete on every disk, in libvirt as the domain's current snapshot"] };
    }

    /// <summary>The domain's writable qcow2 file disks (target and image), those a save snapshots.</summary>
    private static IEnumerable<(string Target, string Image)> WritableQcow2Disks(XElement domainXml)
    {
        foreach (XElement disk in domainXml.Element("devices")?.Elements("disk") ?? [])
        {
            if (disk.Attribute("device")?.Value is "cdrom" or "floppy" || disk.Element("readonly") is not null) continue;
            if (disk.Element("driver")?.Attribute("type")?.Value != "qcow2") continue;
            if (disk.Element("target")?.Attribute("dev")?.Value is { } target && disk.Element("source")?.Attribute("file")?.Value is { } file)
                yield return (target, file);
        }
    }

    /// <summary>
    /// Reverts libvirt domain <paramref name="domain"/> to snapshot <paramref name="tag"/> (made by vmsnap or by virsh snapshot-create-as):
    /// with the domain shut off, its disks are reverted, then libvirt restores the domain from a save image vmsnap serves through a
    /// FIFO (the snapshot's domain XML and VM state; nothing copied to disk first). TAG becomes libvirt's current snapshot.
    /// With <paramref name="postcopy"/>, libvirt instead takes the domain in as an incoming postcopy migration whose source is
    /// vmsnap: the guest runs once its device state is in, and its pages follow (see docs/libvirt.md).
    /// </summary>
    /// <param name="domain">The domain's name.</param>
    /// <param name="tag">The snapshot's name, as libvirt lists it.</param>
    /// <param name="connectUri">libvirt's URI; null for libvirt's default.</param>
    /// <param name="force">Stop a running domain at once (virsh destroy) instead of refusing.</param>
    /// <param name="ramBytesDone">Receives the bytes of VM state sent so far.</param>
    /// <param name="cancellationToken">Stops the load.</param>
    /// <param name="postcopy">Postcopy (a running snapshot only): the guest runs before its pages are in. Should postcopy fail before the guest
    /// started, the domain is restored whole instead (<see cref="LibvirtLoadResult.PostcopyNote"/> says why).</param>
    /// <exception cref="VmsnapException">The load was refused (nothing changed) or failed (the message says what was done).</exception>
    public static LibvirtLoadResult LoadVm(string domain, string tag, string? connectUri = null, bool force = false,
        IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default, bool postcopy = false)
    {
        if (string.IsNullOrEmpty(tag)) throw new OperationRefusedException("say which snapshot to load (TAG)");
        using LibvirtDomain dom = LibvirtDomain.Open(connectUri, domain);
        LiveTrace.Mark("libvirt connected");
        return new LibvirtLoad(dom, tag, force, postcopy, ramBytesDone, cancellationToken).Run();
    }

    /// <summary>
    /// libvirt's snapshots of domain <paramref name="domain"/> beside those of its qcow2 disks, name by name, with every disagreement
    /// named (metadata without the snapshot on a disk, a snapshot on disks that libvirt does not know).
    /// </summary>
    /// <param name="domain">The domain's name.</param>
    /// <param name="connectUri">libvirt's URI; null for libvirt's default.</param>
    /// <exception cref="VmsnapException">libvirt cannot be reached, has no such domain, or an image cannot be read.</exception>
    public static IReadOnlyList<LibvirtSnapshotView> List(string domain, string? connectUri = null)
    {
        using LibvirtDomain dom = LibvirtDomain.Open(connectUri, domain);
        return LibvirtListing.Of(dom);
    }

    /// <summary>
    /// The snapshot's XML as libvirt writes it for an internal snapshot with memory: name, state, parent, creation time,
    /// memory and disks internal (read-only and non-qcow2 disks: no), and the domain's definition at the time.
    /// </summary>
    internal static string SnapshotXml(string tag, string state, string? parent, DateTimeOffset date, XElement domainXml, IReadOnlyList<LiveDiskSnapshot> saved)
    {
        var savedImages = saved.Select(d => d.Image).ToHashSet(StringComparer.Ordinal);
        var disks = new XElement("disks");
        foreach (XElement disk in domainXml.Element("devices")?.Elements("disk") ?? [])
        {
            string? target = disk.Element("target")?.Attribute("dev")?.Value;
            if (target is null) continue;
            string? file = disk.Element("source")?.Attribute("file")?.Value;
            bool internalSnapshot = file is not null && savedImages.Contains(file);
            disks.Add(new XElement("disk", new XAttribute("name", target), new XAttribute("snapshot", internalSnapshot ? "internal" : "no")));
        }
        var snapshot = new XElement("domainsnapshot",
            new XElement("name", tag),
            new XElement("state", state),
            parent is null ? null : new XElement("parent", new XElement("name", parent)),
            new XElement("creationTime", date.ToUnixTimeSeconds().ToString(CultureInfo.InvariantCulture)),
            new XElement("memory", new XAttribute("snapshot", "internal")),
            disks,
            domainXml);
        return snapshot.ToString();
    }

    private static string StateName(int state) => state switch
    {
        0 => "in no state",
        DomainRunning => "running",
        2 => "blocked",
        DomainPaused => "paused",
        4 => "shutting down",
        DomainShutoff => "shut off",
        6 => "crashed",
        7 => "suspended by the guest",
        _ => $"in state {state}",
    };
}
