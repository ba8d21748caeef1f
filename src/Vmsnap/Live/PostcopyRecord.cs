using System.Text.Json;
using System.Text.Json.Nodes;
using Vmsnap.Live.Qmp;
using Vmsnap.Qcow2;

using static Vmsnap.Live.QemuBlockDevices;

namespace Vmsnap.Live;

/// <summary>
/// What a postcopy load keeps inside QEMU while QEMU's guest depends on pages vmsnap serves: the snapshot (its name, the
/// VM-state drive's image, and what identifies that snapshot's VM state), the drives it reverted, whether the load set
/// <c>postcopy-ram</c>, and which process serves. A load cut off (vmsnap killed, an image read failing) leaves QEMU in
/// <c>postcopy-paused</c> with this record, so the same command run again, or <c>vmsnap recover</c>, knows what to
/// resume from and refuses another snapshot.
/// </summary>
/// <remarks>
/// Like <see cref="SaveRecord"/>, an inert <c>authz-simple</c> object whose <c>identity</c> holds the JSON, so it lives as
/// long as that QEMU does. Written before <c>migrate-incoming</c>, deleted once QEMU has every page.
/// </remarks>
internal sealed record PostcopyRecord
{
    /// <summary>The QOM id of the record (<c>/objects/vmsnap-postcopy</c>).</summary>
    internal const string ObjectId = "vmsnap-postcopy";

    private const int Format = 1;

    internal required string Tag { get; init; }

    /// <summary>The VM-state drive's image file the pages are read from.</summary>
    internal required string Image { get; init; }

    /// <summary>The snapshot as the load found it in <see cref="Image"/>: id, VM-state size, date, VM clock and L1 table offset.</summary>
    internal required string SnapshotId { get; init; }

    internal long VmStateSize { get; init; }

    internal long DateSeconds { get; init; }

    internal long DateNanoseconds { get; init; }

    internal long VmClock { get; init; }

    internal long L1TableOffset { get; init; }

    /// <summary>True when the load set <c>postcopy-ram</c> (it is put back off once every page is in).</summary>
    internal bool CapabilityWasOff { get; init; }

    /// <summary>The drives the first load reverted (reported again by a resume, which reverts nothing).</summary>
    internal required IReadOnlyList<LiveDiskSnapshot> Drives { get; init; }

    /// <summary>The serving vmsnap's process id and start time, to tell whether it still runs.</summary>
    internal int ProcessId { get; init; }

    internal long ProcessStart { get; init; }

    /// <summary>A record for this process serving <paramref name="snapshot"/> from <paramref name="image"/>.</summary>
    internal static PostcopyRecord ForThisProcess(string tag, string image, Qcow2Snapshot snapshot, bool capabilityWasOff, IReadOnlyList<LiveDiskSnapshot> drives)
    {
        int pid = Environment.ProcessId;
        return new PostcopyRecord
        {
            Tag = tag, Image = image, SnapshotId = snapshot.Id, VmStateSize = snapshot.VmStateSize, DateSeconds = snapshot.DateSeconds,
            DateNanoseconds = snapshot.DateNanoseconds, VmClock = snapshot.VmClock, L1TableOffset = snapshot.L1TableOffset,
            CapabilityWasOff = capabilityWasOff, Drives = drives, ProcessId = pid, ProcessStart = SaveRecord.StartTime(pid) ?? 0,
        };
    }

    /// <summary>The same record, now served by this process.</summary>
    internal PostcopyRecord TakenOver()
    {
        int pid = Environment.ProcessId;
        return this with { ProcessId = pid, ProcessStart = SaveRecord.StartTime(pid) ?? 0 };
    }

    /// <summary>True while the process that serves runs (same id and start time).</summary>
    internal bool OwnerRuns => ProcessId > 0 && ProcessId != Environment.ProcessId && SaveRecord.StartTime(ProcessId) is long start && start == ProcessStart;

    /// <summary>True when <paramref name="snapshot"/> is the one the record names, with the same VM state.</summary>
    internal bool Matches(Qcow2Snapshot snapshot) =>
        snapshot.Id == SnapshotId && snapshot.Name == Tag && snapshot.VmStateSize == VmStateSize && snapshot.DateSeconds == DateSeconds &&
        snapshot.DateNanoseconds == DateNanoseconds && snapshot.VmClock == VmClock && snapshot.L1TableOffset == L1TableOffset;

    /// <summary>Stores the record in QEMU, replacing one left there.</summary>
    internal void Write(IQmpConnection qmp)
    {
        JsonObject Add() => new() { ["qom-type"] = "authz-simple", ["id"] = ObjectId, ["identity"] = ToJson().ToJsonString() };
        try
        {
            qmp.Execute("object-add", Add());
        }
        catch (QmpException) when (!qmp.IsClosed)
        {
            // A record left behind (a load that ended without removing it): replaced. Only then the second round trip, as the guest waits.
            Delete(qmp);
            qmp.Execute("object-add", Add());
        }
    }

    /// <summary>Replaces the record's contents (one qom-set).</summary>
    internal void Update(IQmpConnection qmp) =>
        qmp.Execute("qom-set", new JsonObject { ["path"] = "/objects/" + ObjectId, ["property"] = "identity", ["value"] = ToJson().ToJsonString() });

    /// <summary>The record QEMU holds, or null when it holds none or one vmsnap cannot read.</summary>
    internal static PostcopyRecord? Read(IQmpConnection qmp)
    {
        try
        {
            string text = QemuBlockDevices.Str(qmp.Execute("qom-get", new JsonObject { ["path"] = "/objects/" + ObjectId, ["property"] = "identity" })) ?? "";
            return FromJson(JsonNode.Parse(text) as JsonObject);
        }
        catch (Exception e) when (e is QmpException or JsonException && !qmp.IsClosed)
        {
            return null;
        }
    }

    /// <summary>Removes the record from QEMU (one that is already gone is fine).</summary>
    internal static void Delete(IQmpConnection qmp)
    {
        try
        {
            qmp.Execute("object-del", new JsonObject { ["id"] = ObjectId });
        }
        catch (QmpException) when (!qmp.IsClosed)
        {
        }
    }

    private JsonObject ToJson() => new()
    {
        ["vmsnap-postcopy"] = Format,
        ["tag"] = Tag,
        ["image"] = Image,
        ["snapshot-id"] = SnapshotId,
        ["vm-state-size"] = VmStateSize,
        ["date-sec"] = DateSeconds,
        ["date-nsec"] = DateNanoseconds,
        ["vm-clock-nsec"] = VmClock,
        ["l1-table-offset"] = L1TableOffset,
        ["capability-was-off"] = CapabilityWasOff,
        ["pid"] = ProcessId,
        ["pid-start"] = ProcessStart,
        ["drives"] = new JsonArray(Drives.Select(d => (JsonNode)new JsonObject
        {
            ["drive"] = d.Drive, ["image"] = d.Image, ["snapshot-id"] = d.SnapshotId, ["vm-state"] = d.VmState,
        }).ToArray()),
    };

    private static PostcopyRecord? FromJson(JsonObject? o)
    {
        if (o is null || Long(o["vmsnap-postcopy"]) != Format || QemuBlockDevices.Str(o["tag"]) is not { } tag || QemuBlockDevices.Str(o["image"]) is not { } image
            || QemuBlockDevices.Str(o["snapshot-id"]) is not { } id)
            return null;
        var drives = new List<LiveDiskSnapshot>();
        foreach (JsonNode? d in o["drives"] as JsonArray ?? [])
        {
            if (QemuBlockDevices.Str(d?["drive"]) is not { } label || QemuBlockDevices.Str(d?["image"]) is not { } path || QemuBlockDevices.Str(d?["snapshot-id"]) is not { } sid)
                return null;
            drives.Add(new LiveDiskSnapshot(label, path, sid, Bool(d?["vm-state"])));
        }
        return new PostcopyRecord
        {
            Tag = tag, Image = image, SnapshotId = id, VmStateSize = Long(o["vm-state-size"]), DateSeconds = Long(o["date-sec"]),
            DateNanoseconds = Long(o["date-nsec"]), VmClock = Long(o["vm-clock-nsec"]), L1TableOffset = Long(o["l1-table-offset"]),
            CapabilityWasOff = Bool(o["capability-was-off"]), ProcessId = (int)Long(o["pid"]), ProcessStart = Long(o["pid-start"]), Drives = drives,
        };
    }

}
