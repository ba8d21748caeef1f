using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using Vmsnap.Live.Qmp;
using Vmsnap.Qcow2;
using Vmsnap.Qcow2.LowLevel;

using static Vmsnap.Live.QemuBlockDevices;

namespace Vmsnap.Live;

/// <summary>A drive a save snapshots, as its record names it.</summary>
internal sealed record RecordedDrive(string Label, string Image, bool VmState);

/// <summary>
/// What a live save in progress keeps inside QEMU, so that whatever it leaves there when it is killed
/// (SIGKILL, a crash, the machine's OOM killer) is found and undone by the next vmsnap command on that QEMU
/// (<see cref="LiveRecovery"/>): the migration settings it changed and their old values, whether the guest
/// ran, the drives and the snapshot's name, where the VM state goes in the file, and which process saves.
/// </summary>
/// <remarks>
/// <para>It lives in QEMU itself, as a QOM object vmsnap adds with <c>object-add</c>: an <c>authz-simple</c>
/// (present in every QEMU since 4.0, inert unless something names it) with id <see cref="ObjectId"/>, whose
/// string property <c>identity</c> holds this record as JSON and reads back with <c>qom-get</c>. So it lives
/// exactly as long as the QEMU whose state it describes: a new QEMU on the same socket path starts without
/// one, and no file under /run or $XDG_RUNTIME_DIR can go stale or be missed by a vmsnap running as another
/// user or in another mount namespace. Any QMP socket of that QEMU finds it, and a second save on the same
/// QEMU (another socket, another vmsnap) finds it too and leaves that save alone while its process runs.</para>
/// <para>It is written before vmsnap changes anything in QEMU and deleted after everything is put back, so
/// a kill at any point between leaves a record that describes what may need undoing; every step of
/// <see cref="LiveRecovery"/> is safe to repeat. It holds nothing secret: the image paths QEMU already lists.</para>
/// </remarks>
internal sealed record SaveRecord
{
    /// <summary>The QOM id of the record (<c>/objects/vmsnap-save</c>).</summary>
    internal const string ObjectId = "vmsnap-save";

    private const string ObjectType = "authz-simple";
    private const int Format = 1;

    /// <summary>The snapshot's name.</summary>
    internal required string Tag { get; init; }

    /// <summary>True for a <c>--live</c> save.</summary>
    internal bool Live { get; init; }

    /// <summary>True when the guest ran when the save began (vmsnap resumes it afterwards).</summary>
    internal bool WasRunning { get; init; }

    /// <summary>The saving vmsnap's process id and its start time (clock ticks after boot, /proc/PID/stat), to tell whether it still runs.</summary>
    internal int ProcessId { get; init; }

    internal long ProcessStart { get; init; }

    /// <summary>When the save began.</summary>
    internal DateTimeOffset Started { get; init; }

    /// <summary>The drives the save snapshots.</summary>
    internal required IReadOnlyList<RecordedDrive> Drives { get; init; }

    /// <summary>Where the VM state goes in the VM-state drive's image file, and the file's length before the save.</summary>
    internal required DetachedVmStatePlan Region { get; init; }

    internal long FileLengthBefore { get; init; }

    /// <summary>True once the save is about to start QEMU's migration (before that, any migration status QEMU reports is an older one's).</summary>
    internal bool Migrating { get; init; }

    /// <summary>The migration settings the save changes (<see cref="MigrationSettings.ToJson"/>).</summary>
    internal required JsonObject Settings { get; init; }

    /// <summary>The drive that keeps the VM state.</summary>
    internal RecordedDrive VmStateDrive => Drives.First(d => d.VmState);

    /// <summary>A record for this process.</summary>
    internal static SaveRecord ForThisProcess(string tag, bool live, bool wasRunning, IReadOnlyList<RecordedDrive> drives, DetachedVmStatePlan region,
        long fileLengthBefore, MigrationSettings settings)
    {
        int pid = Environment.ProcessId;
        return new SaveRecord
        {
            Tag = tag, Live = live, WasRunning = wasRunning, ProcessId = pid, ProcessStart = StartTime(pid) ?? 0, Started = DateTimeOffset.UtcNow,
            Drives = drives, Region = region, FileLengthBefore = fileLengthBefore, Settings = settings.ToJson(),
        };
    }

    /// <summary>True while the process that wrote the record runs (same id and start time).</summary>
    internal bool OwnerRuns => ProcessId > 0 && StartTime(ProcessId) is long start && start == ProcessStart;

    /// <summary>
    /// Stores the record in QEMU. Fails with <see cref="OperationRefusedException"/> when QEMU already has one: another save is
    /// under way on this QEMU (the caller has just recovered any left by a dead vmsnap, and says that nothing was saved).
    /// </summary>
    internal void Write(IQmpConnection qmp)
    {
        try
        {
            qmp.Execute("object-add", new JsonObject { ["qom-type"] = ObjectType, ["id"] = ObjectId, ["identity"] = ToJson().ToJsonString() });
        }
        catch (QmpException e) when (e.ErrorClass == "GenericError" && Read(qmp) is { } other)
        {
            throw new OperationRefusedException($"another vmsnap save (process {other.ProcessId}, snapshot '{other.Tag}') began on this QEMU meanwhile", e);
        }
    }

    /// <summary>Notes in QEMU's record that the migration starts now (one qom-set, before the migrate command).</summary>
    internal SaveRecord MarkMigrating(IQmpConnection qmp)
    {
        SaveRecord next = this with { Migrating = true };
        qmp.Execute("qom-set", new JsonObject { ["path"] = "/objects/" + ObjectId, ["property"] = "identity", ["value"] = next.ToJson().ToJsonString() });
        return next;
    }

    /// <summary>The record QEMU holds, or null when it holds none.</summary>
    /// <exception cref="LiveSnapshotException">QEMU holds an object with the record's id that vmsnap cannot read.</exception>
    internal static SaveRecord? Read(IQmpConnection qmp)
    {
        JsonNode? identity;
        try
        {
            identity = qmp.Execute("qom-get", new JsonObject { ["path"] = "/objects/" + ObjectId, ["property"] = "identity" });
        }
        catch (QmpException e) when (e.ErrorClass == "DeviceNotFound")
        {
            return null;
        }
        catch (QmpException e) when (e.ErrorClass == "GenericError" && !qmp.IsClosed)
        {
            throw new LiveSnapshotException($"QEMU holds an object '/objects/{ObjectId}' that is not a vmsnap save record ({e.Message}); remove it with object-del if nothing else uses it; nothing was done", e);
        }
        string text = QemuBlockDevices.Str(identity) ?? "";
        try
        {
            return FromJson(JsonNode.Parse(text) as JsonObject)
                ?? throw new LiveSnapshotException($"QEMU holds an object '/objects/{ObjectId}' that is not a vmsnap save record ('{Abbreviate(text)}'); remove it with object-del if nothing else uses it; nothing was done");
        }
        catch (JsonException e)
        {
            throw new LiveSnapshotException($"QEMU holds an object '/objects/{ObjectId}' that is not a vmsnap save record ({e.Message}); remove it with object-del if nothing else uses it; nothing was done", e);
        }
    }

    /// <summary>Removes the record from QEMU (one that is already gone is fine).</summary>
    internal static void Delete(IQmpConnection qmp)
    {
        try
        {
            qmp.Execute("object-del", new JsonObject { ["id"] = ObjectId });
        }
        catch (QmpException e) when (e.ErrorClass is "GenericError" or "DeviceNotFound" && !qmp.IsClosed && Read(qmp) is null)
        {
        }
    }

    private JsonObject ToJson() => new()
    {
        ["vmsnap-save"] = Format,
        ["tag"] = Tag,
        ["live"] = Live,
        ["was-running"] = WasRunning,
        ["pid"] = ProcessId,
        ["pid-start"] = ProcessStart,
        ["started"] = Started.ToUnixTimeMilliseconds(),
        ["migrating"] = Migrating,
        ["drives"] = new JsonArray(Drives.Select(d => (JsonNode)new JsonObject { ["drive"] = d.Label, ["image"] = d.Image, ["vm-state"] = d.VmState }).ToArray()),
        ["region"] = new JsonObject
        {
            ["base"] = Region.Base, ["bound"] = Region.Bound, ["offset"] = Region.Offset, ["guard"] = Region.Guard, ["file-length-before"] = FileLengthBefore,
        },
        ["settings"] = Settings.DeepClone(),
    };

    private static SaveRecord? FromJson(JsonObject? o)
    {
        if (o is null || Long(o["vmsnap-save"]) != Format || QemuBlockDevices.Str(o["tag"]) is not { } tag) return null;
        var drives = new List<RecordedDrive>();
        foreach (JsonNode? d in o["drives"] as JsonArray ?? [])
        {
            if (QemuBlockDevices.Str(d?["drive"]) is not { } label || QemuBlockDevices.Str(d?["image"]) is not { } image) return null;
            drives.Add(new RecordedDrive(label, image, Bool(d?["vm-state"])));
        }
        if (drives.Count(d => d.VmState) != 1 || o["region"] is not JsonObject region) return null;
        return new SaveRecord
        {
            Tag = tag,
            Live = Bool(o["live"]),
            WasRunning = Bool(o["was-running"]),
            ProcessId = (int)Long(o["pid"]),
            ProcessStart = Long(o["pid-start"]),
            Started = DateTimeOffset.FromUnixTimeMilliseconds(Long(o["started"])),
            Migrating = Bool(o["migrating"]),
            Drives = drives,
            Region = new DetachedVmStatePlan(Long(region["base"]), Long(region["bound"]), Long(region["offset"]), Long(region["guard"])),
            FileLengthBefore = Long(region["file-length-before"]),
            Settings = o["settings"] as JsonObject ?? [],
        };
    }

    private static string Abbreviate(string s) => s.Length <= 80 ? s : s[..80] + "...";

    /// <summary>A process's start time in clock ticks after boot (field 22 of /proc/PID/stat), or null when it does not run (or is a zombie).</summary>
    internal static long? StartTime(int pid)
    {
        string stat;
        try
        {
            stat = File.ReadAllText($"/proc/{pid}/stat");
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return null;
        }
        // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses, so count fields after the last ')'.
        string[] fields = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
        if (fields[0] is "Z" or "X") return null;
        return fields.Length > 19 && long.TryParse(fields[19], NumberStyles.None, CultureInfo.InvariantCulture, out long start) ? start : null;
    }
}
