using System.Text.Json.Nodes;

namespace Vmsnap.Live;

/// <summary>
/// The migration parameters and capabilities a save needs, set on QEMU for the save and put back
/// afterwards: every value vmsnap changed is restored to what it was, nothing else is touched.
/// </summary>
/// <remarks>
/// For every save: bandwidth unthrottled (QEMU's default max-bandwidth of 128 MiB/s would make a
/// 1 GiB save take 8 s), and off every capability that changes the stream's layout or its channel
/// (vmsnap reads a plain precopy stream one way over a socket). With <c>--live</c> also: a tighter
/// downtime limit, so the final stop stays short, and auto-converge, so a guest that dirties memory
/// faster than the disk takes it still finishes (QEMU throttles its vCPUs instead of iterating forever).
/// </remarks>
internal sealed class MigrationSettings
{
    /// <summary>QEMU's target for the final stop in a live save (its default is 300 ms).</summary>
    internal const long LiveDowntimeLimitMs = 50;

    // Capabilities whose streams or channels vmsnap does not handle (those this QEMU knows are turned off).
    private static readonly string[] s_mustBeOff =
    [
        "xbzrle", "compress", "multifd", "mapped-ram", "postcopy-ram", "postcopy-preempt", "postcopy-blocktime", "x-ignore-shared",
        "return-path", "switchover-ack", "dirty-bitmaps", "block", "zero-copy-send", "background-snapshot", "pause-before-switchover",
        "x-colo", "rdma-pin-all", "release-ram", "validate-uuid",
    ];

    private readonly QmpClient _qmp;
    private readonly JsonObject _oldParameters = [];
    private readonly JsonArray _oldCapabilities = [];

    private MigrationSettings(QmpClient qmp) => _qmp = qmp;

    /// <summary>Sets what the save needs; the returned object restores it.</summary>
    internal static MigrationSettings Apply(QmpClient qmp, bool live)
    {
        var s = new MigrationSettings(qmp);
        try
        {
            s.ApplyCore(live);
            return s;
        }
        catch
        {
            s.Restore();
            throw;
        }
    }

    private void ApplyCore(bool live)
    {
        var parameters = _qmp.Execute("query-migrate-parameters") as JsonObject ?? [];
        var set = new JsonObject();
        Change(parameters, set, "max-bandwidth", 0L);   // 0: no rate limit
        if (live) Change(parameters, set, "downtime-limit", LiveDowntimeLimitMs);
        if (parameters["mode"] is JsonValue mode && mode.TryGetValue(out string? m) && m != "normal")
        {
            _oldParameters["mode"] = m;
            set["mode"] = "normal";
        }
        var capabilities = _qmp.Execute("query-migrate-capabilities") as JsonArray ?? [];
        var caps = new JsonArray();
        foreach (JsonNode? c in capabilities)
        {
            string? name = QemuBlockDevices.Str(c?["capability"]);
            bool on = c?["state"] is JsonValue v && v.TryGetValue(out bool b) && b;
            if (name is null) continue;
            bool want = on;
            if (s_mustBeOff.Contains(name)) want = false;
            if (name == "auto-converge" && live) want = true;
            if (want == on) continue;
            _oldCapabilities.Add((JsonNode)new JsonObject { ["capability"] = name, ["state"] = on });
            caps.Add((JsonNode)new JsonObject { ["capability"] = name, ["state"] = want });
        }
        if (caps.Count > 0) _qmp.Execute("migrate-set-capabilities", new JsonObject { ["capabilities"] = caps });
        if (set.Count > 0) _qmp.Execute("migrate-set-parameters", set);
    }

    private void Change(JsonObject current, JsonObject set, string name, long value)
    {
        if (current[name] is not JsonValue v || !v.TryGetValue(out long old)) return;   // this QEMU has no such parameter
        if (old == value) return;
        _oldParameters[name] = old;
        set[name] = value;
    }

    /// <summary>Puts back every parameter and capability that was changed; returns why it could not, or null.</summary>
    internal string? Restore()
    {
        var problems = new List<string>();
        if (_oldParameters.Count > 0)
        {
            try
            {
                _qmp.Execute("migrate-set-parameters", (JsonObject)_oldParameters.DeepClone());
                _oldParameters.Clear();
            }
            catch (QmpException e)
            {
                problems.Add(e.Message);
            }
        }
        if (_oldCapabilities.Count > 0)
        {
            try
            {
                _qmp.Execute("migrate-set-capabilities", new JsonObject { ["capabilities"] = _oldCapabilities.DeepClone() });
                _oldCapabilities.Clear();
            }
            catch (QmpException e)
            {
                problems.Add(e.Message);
            }
        }
        return problems.Count == 0 ? null : "could not restore QEMU's migration settings: " + string.Join("; ", problems);
    }
}
