using System.Text.Json.Nodes;
using Vmsnap.Live.Qmp;

namespace Vmsnap.Live;

/// <summary>
/// The migration parameters and capabilities a save needs, set on QEMU for the save and put back
/// afterwards: every value vmsnap changed is restored to what it was, nothing else is touched.
/// </summary>
/// <remarks>
/// <para>For every save: bandwidth unthrottled (QEMU's default max-bandwidth of 128 MiB/s would make a
/// 1 GiB save take 8 s), and off every capability that changes the stream's layout or its channel
/// (vmsnap reads a plain precopy stream one way over a socket). With <c>--live</c> also: a tighter
/// downtime limit, so the final stop stays short, and auto-converge, so a guest that dirties memory
/// faster than the disk takes it still finishes (QEMU throttles its vCPUs instead of iterating forever).</para>
/// <para>QEMU (7.2 to 10.2) has no per-migration settings: <c>migrate</c> takes none, and the values set
/// stay after the migration. So the changes are planned first (<see cref="Plan"/>), written down in the
/// save's record inside QEMU (<see cref="SaveRecord"/>, as <see cref="ToJson"/>) and only then made
/// (<see cref="Apply"/>): a vmsnap killed at any point leaves the old values where the next vmsnap
/// command on that QEMU finds them (<see cref="FromJson"/>, <see cref="RestoreAfterKill"/>).</para>
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

    private readonly IQmpConnection _qmp;

    // Each changed value: what QEMU had, and what vmsnap sets.
    private readonly Dictionary<string, (JsonNode Was, JsonNode Set)> _parameters = [];
    private readonly Dictionary<string, (bool Was, bool Set)> _capabilities = [];
    private bool _applied;

    private MigrationSettings(IQmpConnection qmp) => _qmp = qmp;

    /// <summary>True when the save needs no change to QEMU's settings.</summary>
    internal bool IsEmpty => _parameters.Count == 0 && _capabilities.Count == 0;

    /// <summary>Works out what the save needs changed, from QEMU's current values; changes nothing.</summary>
    /// <summary>QEMU's migration capabilities (query-migrate-capabilities), by name.</summary>
    internal static Dictionary<string, bool> Capabilities(IQmpConnection qmp)
    {
        var capabilities = new Dictionary<string, bool>(StringComparer.Ordinal);
        foreach (JsonNode? c in qmp.Execute("query-migrate-capabilities") as JsonArray ?? [])
            if (QemuBlockDevices.Str(c?["capability"]) is { } name) capabilities[name] = QemuBlockDevices.Bool(c?["state"]);
        return capabilities;
    }

    internal static MigrationSettings Plan(IQmpConnection qmp, bool live)
    {
        var s = new MigrationSettings(qmp);
        var parameters = qmp.Execute("query-migrate-parameters") as JsonObject ?? [];
        s.Change(parameters, "max-bandwidth", 0L);   // 0: no rate limit
        if (live) s.Change(parameters, "downtime-limit", LiveDowntimeLimitMs);
        if (parameters["mode"] is JsonValue mode && mode.TryGetValue(out string? m) && m != "normal")
            s._parameters["mode"] = (m, "normal");
        foreach ((string name, bool on) in Capabilities(qmp))
        {
            bool want = on;
            if (s_mustBeOff.Contains(name)) want = false;
            if (name == "auto-converge" && live) want = true;
            if (want != on) s._capabilities[name] = (on, want);
        }
        return s;
    }

    private void Change(JsonObject current, string name, long value)
    {
        if (current[name] is not JsonValue v || !v.TryGetValue(out long old)) return;   // this QEMU has no such parameter
        if (old != value) _parameters[name] = (old, value);
    }

    /// <summary>Makes the planned changes; on failure puts back what was changed and throws.</summary>
    internal void Apply()
    {
        _applied = true;
        try
        {
            if (_capabilities.Count > 0) SetCapabilities(_capabilities.Select(c => (c.Key, c.Value.Set)));
            if (_parameters.Count > 0) SetParameters(_parameters.Select(p => (p.Key, p.Value.Set)));
        }
        catch
        {
            Restore();
            throw;
        }
    }

    /// <summary>Puts back every parameter and capability that was changed; returns why it could not, or null.</summary>
    internal string? Restore()
    {
        if (!_applied) return null;
        var problems = new List<string>();
        if (_parameters.Count > 0)
        {
            try { SetParameters(_parameters.Select(p => (p.Key, p.Value.Was))); }
            catch (QmpException e) { problems.Add(e.Message); }
        }
        if (_capabilities.Count > 0)
        {
            try { SetCapabilities(_capabilities.Select(c => (c.Key, c.Value.Was))); }
            catch (QmpException e) { problems.Add(e.Message); }
        }
        if (problems.Count == 0) _applied = false;
        return problems.Count == 0 ? null : "could not restore QEMU's migration settings: " + string.Join("; ", problems);
    }

    /// <summary>
    /// After a vmsnap that changed these settings was killed: puts back each value that is still what vmsnap
    /// set. A value someone changed since is theirs and stays. Returns the names put back and the names left.
    /// </summary>
    internal (List<string> Restored, List<string> Left) RestoreAfterKill()
    {
        var restored = new List<string>();
        var left = new List<string>();
        var parameters = _qmp.Execute("query-migrate-parameters") as JsonObject ?? [];
        var putBack = new List<(string, JsonNode)>();
        foreach ((string name, (JsonNode was, JsonNode set)) in _parameters)
        {
            JsonNode? now = parameters[name];
            if (JsonNode.DeepEquals(now, was)) continue;   // already as it was
            if (JsonNode.DeepEquals(now, set)) putBack.Add((name, was));
            else left.Add(name);
        }
        Dictionary<string, bool> capabilities = Capabilities(_qmp);
        var capsBack = new List<(string, bool)>();
        foreach ((string name, (bool was, bool set)) in _capabilities)
        {
            if (!capabilities.TryGetValue(name, out bool now) || now == was) continue;
            if (now == set) capsBack.Add((name, was));
            else left.Add(name);
        }
        if (capsBack.Count > 0) SetCapabilities(capsBack);
        if (putBack.Count > 0) SetParameters(putBack);
        restored.AddRange(capsBack.Select(c => c.Item1));
        restored.AddRange(putBack.Select(p => p.Item1));
        return (restored, left);
    }

    private void SetParameters(IEnumerable<(string Name, JsonNode Value)> values)
    {
        var set = new JsonObject();
        foreach ((string name, JsonNode value) in values) set[name] = value.DeepClone();
        _qmp.Execute("migrate-set-parameters", set);
    }

    private void SetCapabilities(IEnumerable<(string Name, bool State)> values)
    {
        var caps = new JsonArray();
        foreach ((string name, bool state) in values) caps.Add((JsonNode)new JsonObject { ["capability"] = name, ["state"] = state });
        _qmp.Execute("migrate-set-capabilities", new JsonObject { ["capabilities"] = caps });
    }

    /// <summary>The planned changes, for the save's record: <c>{"parameters": {NAME: {"was": V, "set": V}}, "capabilities": {NAME: {"was": B, "set": B}}}</c>.</summary>
    internal JsonObject ToJson()
    {
        var parameters = new JsonObject();
        foreach ((string name, (JsonNode was, JsonNode set)) in _parameters)
            parameters[name] = new JsonObject { ["was"] = was.DeepClone(), ["set"] = set.DeepClone() };
        var capabilities = new JsonObject();
        foreach ((string name, (bool was, bool set)) in _capabilities)
            capabilities[name] = new JsonObject { ["was"] = was, ["set"] = set };
        return new JsonObject { ["parameters"] = parameters, ["capabilities"] = capabilities };
    }

    /// <summary>The changes a save's record holds (<see cref="ToJson"/>); unreadable entries are skipped.</summary>
    internal static MigrationSettings FromJson(IQmpConnection qmp, JsonObject? json)
    {
        var s = new MigrationSettings(qmp);
        foreach ((string name, JsonNode? value) in json?["parameters"] as JsonObject ?? [])
            if (value?["was"] is { } was && value["set"] is { } set) s._parameters[name] = (was.DeepClone(), set.DeepClone());
        foreach ((string name, JsonNode? value) in json?["capabilities"] as JsonObject ?? [])
            if (value?["was"] is JsonValue was && was.TryGetValue(out bool w) && value["set"] is JsonValue set && set.TryGetValue(out bool x))
                s._capabilities[name] = (w, x);
        return s;
    }
}
