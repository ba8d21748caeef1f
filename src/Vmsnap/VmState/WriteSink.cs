using System.Diagnostics;

namespace Vmsnap.VmState.LowLevel;

/// <summary>
/// How a <see cref="VmStateWriter"/> moves bytes to its backend (gather or buffered). Holds the
/// sticky first error, the transferred-byte count and the rate limit shared by both modes.
/// </summary>
internal abstract class WriteSink
{
    private readonly long _rateLimit;
    private readonly Stopwatch? _clock;
    private long _paced;
    private Exception? _error;
    private long _errorPosition;
    private long _transferred;

    protected WriteSink(VmStateBackend backend, long rateLimit)
    {
        Backend = backend;
        _rateLimit = rateLimit;
        if (rateLimit > 0) _clock = Stopwatch.StartNew();
    }

    protected VmStateBackend Backend { get; }

    /// <summary>The first error met, or null.</summary>
    internal Exception? Error => Volatile.Read(ref _error);

    /// <summary>Stream offset of the write that failed first.</summary>
    internal long ErrorPosition => Volatile.Read(ref _errorPosition);

    /// <summary>Bytes of writes the backend completed.</summary>
    internal long BytesTransferred => Interlocked.Read(ref _transferred);

    /// <summary>Bytes accepted so far: written plus still buffered.</summary>
    internal abstract long Tell { get; }

    /// <summary>Copies bytes into the stream.</summary>
    internal abstract void Put(ReadOnlySpan<byte> data);

    /// <summary>Adds caller memory valid until the next flush; <paramref name="mayFree"/> is disposed once the bytes are written or copied.</summary>
    internal abstract void PutAsync(ReadOnlyMemory<byte> data, IDisposable? mayFree);

    /// <summary>Disposes <paramref name="owner"/> once every byte put so far is written (or copied).</summary>
    internal abstract void ReleaseWhenWritten(IDisposable owner);

    /// <summary>Hands what is buffered to the backend (gather mode).</summary>
    internal abstract void Flush();

    /// <summary>Continues the stream at <paramref name="position"/> (positional backends): later puts go there.</summary>
    internal abstract void Seek(long position);

    /// <summary>
    /// Copies <paramref name="data"/> to <paramref name="position"/>, apart from the stream's own position
    /// (page regions placed by offset). Consecutive calls at adjacent positions are written as one region;
    /// with <paramref name="zeroGap"/> a short gap since the previous call's end, which the caller says
    /// holds nothing, is written as zeroes instead of breaking the region.
    /// </summary>
    internal abstract void PutAt(long position, ReadOnlySpan<byte> data, bool zeroGap);

    /// <summary>Writes what is left and waits for every write to complete.</summary>
    internal abstract void Drain();

    /// <summary>Asynchronous <see cref="Drain"/>.</summary>
    internal abstract Task DrainAsync();

    /// <summary>Waits for writes in flight, drops what was not written and frees every buffer and may-free owner.</summary>
    internal abstract void Abandon();

    /// <summary>Keeps the first error (with its exception and the stream offset of the failed write).</summary>
    protected void SetError(Exception error, long position)
    {
        if (Interlocked.CompareExchange(ref _error, error, null) is null)
            Volatile.Write(ref _errorPosition, position);
    }

    /// <summary>Records a failure of the final sync (the stream's end offset).</summary>
    internal void FailSync(Exception error) => SetError(error, Tell);

    protected void AddTransferred(long count) => Interlocked.Add(ref _transferred, count);

    /// <summary>
    /// Sleeps so that the bytes handed to the backend before this write took at least
    /// count / rate seconds: the average rate stays at or below the limit.
    /// </summary>
    protected void Pace(long count)
    {
        if (_clock is null) return;
        double due = (double)_paced / _rateLimit;
        double wait = due - _clock.Elapsed.TotalSeconds;
        if (wait > 0) Thread.Sleep(TimeSpan.FromSeconds(wait));
        _paced += count;
    }
}
