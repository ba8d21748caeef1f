using System.Runtime.InteropServices;
using System.Text.Json;
using System.Text.Json.Nodes;
using Vmsnap.Live.Qmp;
using static Vmsnap.Live.Libvirt.LibvirtNative;

namespace Vmsnap.Live.Libvirt;

/// <summary>
/// QMP through the monitor libvirt owns: commands go through virDomainQemuMonitorCommandWithFiles (libvirt 8.2 and
/// later; a file descriptor travels with <c>getfd</c>), events come from virConnectDomainQemuMonitorEventRegister with
/// QEMU's timestamps. libvirt marks the domain tainted ("custom-monitor") at the first command. The connection counts as
/// closed once a command failed with libvirt gone or the domain no longer active.
/// </summary>
internal sealed class LibvirtMonitor : IQmpConnection, IDisposable
{
    private readonly LibvirtDomain _domain;
    private readonly QmpEventLog _events = new();
    private GCHandle _self;
    private int _callbackId = -1;
    private volatile bool _closed;
    private Version _qemuVersion = new(0, 0, 0);

    private LibvirtMonitor(LibvirtDomain domain)
    {
        _domain = domain;
        Path = $"libvirt domain '{domain.Name}' ({domain.Uri})";
    }

    /// <summary>Opens the monitor of <paramref name="domain"/>, which must be running or paused.</summary>
    internal static unsafe LibvirtMonitor Open(LibvirtDomain domain)
    {
        var monitor = new LibvirtMonitor(domain);
        try
        {
            monitor._self = GCHandle.Alloc(monitor);
            monitor._callbackId = virConnectDomainQemuMonitorEventRegister(domain.Connection, domain.Handle, null, &OnEvent, GCHandle.ToIntPtr(monitor._self), 0, 0);
            if (monitor._callbackId < 0) throw LibvirtDomain.Failed("subscribing to QEMU's events");
            JsonNode? version = monitor.Execute("query-version")?["qemu"];
            monitor._qemuVersion = new Version(Int(version?["major"]), Int(version?["minor"]), Int(version?["micro"]));
            return monitor;
        }
        catch
        {
            monitor.Dispose();
            throw;
        }
    }

    private static int Int(JsonNode? n) => n is JsonValue v && v.TryGetValue(out int i) ? i : 0;

    public string Path { get; }

    public bool IsClosed => _closed;

    public bool ClosedWithQemuRunning => _closed && !_domain.IsAlive;

    public string ClosedReason => _domain.IsAlive
        ? $"the domain stopped (QEMU exited; {Path})"
        : $"the connection to libvirt was lost ({Path}: libvirtd stopped or restarted; the domain's QEMU runs on, and libvirt reconnects to it when it starts again)";

    public int? PeerProcessId => null;   // libvirt gives QEMU absolute image paths

    public bool IsAtLeast(int major, int minor) => _qemuVersion >= new Version(major, minor);

    public unsafe JsonNode? Execute(string command, JsonObject? arguments = null, TimeSpan? timeout = null, int fd = -1)
    {
        if (_closed) throw new QmpException($"QMP command '{command}' through {Path} failed: the domain stopped or libvirt went away");
        var message = new JsonObject { ["execute"] = command };
        if (arguments is not null) message["arguments"] = arguments;
        int rc;
        nint result;
        int file = fd;
        // libvirt waits for its own per-domain job lock (30 s) and for QEMU; the command's time limit is libvirt's.
        rc = virDomainQemuMonitorCommandWithFiles(_domain.Handle, message.ToJsonString(), fd >= 0 ? 1u : 0u, fd >= 0 ? &file : null, null, null, out result, 0);
        if (rc != 0)
        {
            string why = LastError();
            if (!_domain.IsAlive || virDomainIsActive(_domain.Handle) != 1) _closed = true;
            throw new QmpException($"QMP command '{command}' through {Path} failed: {why}");
        }
        string text = TakeString(result) ?? "";
        if (LiveTrace.On) LiveTrace.Mark("qmp " + command);
        JsonObject? answer;
        try { answer = JsonNode.Parse(text) as JsonObject; }
        catch (JsonException) { answer = null; }
        if (answer is null) throw new QmpException($"QMP command '{command}' through {Path}: libvirt returned '{text}', not a QMP answer");
        if (answer["error"] is JsonObject error)
        {
            string? errorClass = error["class"]?.GetValue<string>();
            string desc = error["desc"]?.GetValue<string>() ?? error.ToJsonString();
            throw new QmpException($"QEMU refused '{command}': {desc}", errorClass);
        }
        return answer["return"];
    }

    [UnmanagedCallersOnly]
    private static unsafe void OnEvent(nint conn, nint domain, byte* name, long seconds, uint micros, byte* details, nint opaque)
    {
        try
        {
            if (GCHandle.FromIntPtr(opaque).Target is not LibvirtMonitor monitor) return;
            string eventName = Marshal.PtrToStringUTF8((nint)name) ?? "";
            JsonObject? data = null;
            if (details != null)
            {
                try { data = JsonNode.Parse(Marshal.PtrToStringUTF8((nint)details) ?? "") as JsonObject; }
                catch (JsonException) { }
            }
            DateTimeOffset at = DateTimeOffset.FromUnixTimeSeconds(seconds).AddTicks(micros * 10L);
            monitor.AddEvent(eventName, at, data);
        }
        catch (Exception e) when (e is InvalidOperationException or ArgumentException)
        {
            // A handle freed meanwhile: the monitor is being disposed.
        }
    }

    private void AddEvent(string name, DateTimeOffset at, JsonObject? data)
    {
        _events.Add(name, at, data);
        if (name == "SHUTDOWN")
        {
            _closed = true;
            _events.Close();
        }
    }

    public long EventMark => _events.Mark;

    public IReadOnlyList<QmpEvent> EventsSince(long mark) => _events.Since(mark);

    public QmpEvent? WaitForEvent(string name, long mark, TimeSpan timeout, CancellationToken cancellationToken = default) =>
        _events.WaitFor(name, mark, timeout, cancellationToken);

    public void Dispose()
    {
        if (_callbackId >= 0) virConnectDomainQemuMonitorEventDeregister(_domain.Connection, _callbackId);
        _callbackId = -1;
        if (_self.IsAllocated) _self.Free();
    }
}
