using System.Text.Json.Nodes;

namespace Vmsnap.Live.Qmp;

/// <summary>
/// A way to talk QMP to one QEMU: its own socket (<see cref="QmpClient"/>) or the monitor that libvirt owns
/// (<see cref="Libvirt.LibvirtMonitor"/>). What a live save, load and recovery need of it: commands (one with a file
/// descriptor, for getfd) and the events QEMU sent, with QEMU's timestamps.
/// </summary>
internal interface IQmpConnection
{
    /// <summary>Where QEMU is reached, as messages name it (a socket's path, or a libvirt domain).</summary>
    string Path { get; }

    /// <summary>True once the connection is gone (QEMU exited or closed it).</summary>
    bool IsClosed { get; }

    /// <summary>Why the connection is closed, for messages: QEMU exited, unless the connection knows better (libvirtd gone, QEMU running on).</summary>
    string ClosedReason => $"QEMU exited (its QMP connection on '{Path}' closed)";

    /// <summary>True when the connection closed while QEMU may run on (libvirtd gone): what a save left there waits for a recovery.</summary>
    bool ClosedWithQemuRunning => false;

    /// <summary>The QEMU process at the other end, when known (its working folder resolves relative image paths).</summary>
    int? PeerProcessId { get; }

    /// <summary>True when QEMU is at least <paramref name="major"/>.<paramref name="minor"/>.</summary>
    bool IsAtLeast(int major, int minor);

    /// <summary>Runs a command and returns its "return" value; <paramref name="fd"/>, when given, travels with it (for <c>getfd</c>).</summary>
    /// <exception cref="QmpException">QEMU refused the command, did not answer in time, or the connection is gone.</exception>
    JsonNode? Execute(string command, JsonObject? arguments = null, TimeSpan? timeout = null, int fd = -1);

    /// <summary>Sequence number the next event will get: pass it to <see cref="EventsSince"/> to see what came after.</summary>
    long EventMark { get; }

    /// <summary>The events kept that arrived at or after <paramref name="mark"/>, oldest first.</summary>
    IReadOnlyList<QmpEvent> EventsSince(long mark);

    /// <summary>Waits until an event named <paramref name="name"/> arrived at or after <paramref name="mark"/>; null on timeout or a closed connection.</summary>
    QmpEvent? WaitForEvent(string name, long mark, TimeSpan timeout, CancellationToken cancellationToken = default);
}
