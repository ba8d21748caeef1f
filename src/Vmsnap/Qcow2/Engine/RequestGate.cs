namespace Vmsnap.Qcow2;

/// <summary>
/// Admits requests to the engine: the metadata lock, the guest cluster ranges requests are working
/// on (overlapping requests wait for each other; disjoint ones run their data I/O in parallel), and
/// whether the engine was disposed.
/// </summary>
internal sealed class RequestGate(int clusterBits, MetadataCaches caches)
{
    /// <summary>A guest cluster range some request is working on.</summary>
    internal sealed class Request(long first, long last, bool write)
    {
        internal long First { get; } = first;
        internal long Last { get; } = last;
        internal bool Write { get; } = write;
    }

    private readonly List<Request> _inFlight = [];

    /// <summary>The metadata lock: metadata is only touched under it.</summary>
    internal object SyncRoot { get; } = new();

    internal bool Disposed { get; set; }

    internal void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(Disposed, typeof(Qcow2Engine));

    /// <summary>Registers a request on guest range [offset, offset + length), waiting for overlapping ones (writes exclude everything). Under the lock.</summary>
    internal Request Enter(long offset, long length, bool write)
    {
        long first = offset >> clusterBits, last = (offset + length - 1) >> clusterBits;
        while (_inFlight.Exists(o => o.First <= last && first <= o.Last && (write || o.Write)))
        {
            Monitor.Wait(SyncRoot);
            ThrowIfDisposed();
        }
        var r = new Request(first, last, write);
        _inFlight.Add(r);
        return r;
    }

    /// <summary>Ends a request (under the lock) and wakes those waiting.</summary>
    internal void Leave(Request r)
    {
        _inFlight.Remove(r);
        Monitor.PulseAll(SyncRoot);
    }

    /// <summary>Runs <paramref name="action"/> under the lock once no request is in flight (snapshot operations), then trims the caches.</summary>
    internal T RunExclusive<T>(Func<T> action)
    {
        lock (SyncRoot)
        {
            ThrowIfDisposed();
            while (_inFlight.Count > 0) Monitor.Wait(SyncRoot);
            T result = action();
            caches.Trim();
            return result;
        }
    }
}
