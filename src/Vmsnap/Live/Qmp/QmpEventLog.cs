using System.Diagnostics;
using System.Text.Json.Nodes;

namespace Vmsnap.Live.Qmp;

/// <summary>
/// The QMP events of one connection, in arrival order with QEMU's timestamps (the last 4096 kept), and waiting for one:
/// what <see cref="QmpClient"/> and <see cref="Libvirt.LibvirtMonitor"/> share. Safe for use from several threads.
/// </summary>
internal sealed class QmpEventLog
{
    private const int MaxEventsKept = 4096;

    private readonly object _lock = new();
    private readonly List<QmpEvent> _events = [];
    private long _count;
    private bool _closed;

    /// <summary>Adds an event that just arrived.</summary>
    internal void Add(string name, DateTimeOffset timestamp, JsonObject? data)
    {
        lock (_lock)
        {
            _events.Add(new QmpEvent(_count++, name, timestamp, data));
            if (_events.Count > MaxEventsKept) _events.RemoveRange(0, _events.Count - MaxEventsKept);
            Monitor.PulseAll(_lock);
        }
    }

    /// <summary>No more events will come (the connection is gone): waiters return at once.</summary>
    internal void Close()
    {
        lock (_lock)
        {
            _closed = true;
            Monitor.PulseAll(_lock);
        }
    }

    /// <summary>Sequence number the next event will get.</summary>
    internal long Mark
    {
        get
        {
            lock (_lock) return _count;
        }
    }

    /// <summary>The events kept that arrived at or after <paramref name="mark"/>, oldest first.</summary>
    internal IReadOnlyList<QmpEvent> Since(long mark)
    {
        lock (_lock) return _events.Where(e => e.Sequence >= mark).ToArray();
    }

    /// <summary>Waits until an event named <paramref name="name"/> arrived at or after <paramref name="mark"/>; null on timeout, close or cancellation.</summary>
    internal QmpEvent? WaitFor(string name, long mark, TimeSpan timeout, CancellationToken cancellationToken)
    {
        var clock = Stopwatch.StartNew();
        lock (_lock)
        {
            while (true)
            {
                QmpEvent? found = _events.FirstOrDefault(e => e.Sequence >= mark && e.Name == name);
                if (found is not null) return found;
                TimeSpan left = timeout - clock.Elapsed;
                if (left <= TimeSpan.Zero || _closed || cancellationToken.IsCancellationRequested) return null;
                Monitor.Wait(_lock, TimeSpan.FromMilliseconds(Math.Min(left.TotalMilliseconds, 100)));
            }
        }
    }
}
