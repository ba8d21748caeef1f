using Vmsnap.Storage;

namespace Vmsnap.VmState;

/// <summary>
/// Buffered mode (block targets): every byte is copied into one of K aligned buffers of B bytes;
/// a full buffer goes to an asynchronous positional write whose position is fixed at hand-off, so
/// writes may complete in any order. A free list feeds the producer, which waits only when all K
/// buffers are in flight. Buffers are allocated on first need, so a short stream uses few.
/// </summary>
internal sealed class BufferedSink : WriteSink
{
    private readonly object _lock = new();
    private readonly int _count;
    private readonly int _size;
    private readonly int _alignment;
    private readonly Stack<AlignedBuffer> _free = new();
    private readonly List<AlignedBuffer> _all = new();
    private readonly Action<Task, object?> _onCompleted;
    private AlignedBuffer? _current;
    private int _fill;
    private long _base;          // stream offset of _current's first byte
    private int _inFlight;
    private TaskCompletionSource? _drained;

    internal BufferedSink(VmStateBackend backend, long rateLimit, int count, int size, int alignment) : base(backend, rateLimit)
    {
        _count = count;
        _size = size;
        _alignment = alignment;
        _onCompleted = (task, state) => Completed(task, (Pending)state!);
    }

    internal override long Tell => _base + _fill;

    internal override void Put(ReadOnlySpan<byte> data)
    {
        if (Error is not null) return;
        while (!data.IsEmpty)
        {
            if (_current is null && !Acquire()) return;
            Span<byte> room = _current!.GetSpan()[_fill..];
            int n = Math.Min(room.Length, data.Length);
            data[..n].CopyTo(room);
            _fill += n;
            data = data[n..];
            if (_fill == _size) HandOff();
        }
    }

    internal override void PutAsync(ReadOnlyMemory<byte> data, IDisposable? mayFree)
    {
        if (Error is null) Put(data.Span);
        // Copied (or dropped after an error): the caller's memory may go now.
        mayFree?.Dispose();
    }

    internal override void ReleaseWhenWritten(IDisposable owner) => owner.Dispose();

    // Order is kept by positions, not by waiting: nothing to do.
    internal override void Flush() { }

    internal override void Drain()
    {
        if (_fill > 0) HandOff();
        lock (_lock)
        {
            while (_inFlight > 0) Monitor.Wait(_lock);
        }
        FreeAll();
    }

    internal override async Task DrainAsync()
    {
        if (_fill > 0) HandOff();
        Task wait;
        lock (_lock)
        {
            if (_inFlight == 0) wait = Task.CompletedTask;
            else wait = (_drained = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously)).Task;
        }
        await wait.ConfigureAwait(false);
        FreeAll();
    }

    internal override void Abandon()
    {
        // Memory in flight belongs to the backend until its write completes: wait before freeing it.
        lock (_lock)
        {
            while (_inFlight > 0) Monitor.Wait(_lock);
        }
        FreeAll();
    }

    /// <summary>Takes a buffer from the free list, allocates one while fewer than K exist, or waits for a write to complete.</summary>
    private bool Acquire()
    {
        lock (_lock)
        {
            while (true)
            {
                if (Error is not null) return false;
                if (_free.Count > 0)
                {
                    _current = _free.Pop();
                    return true;
                }
                if (_all.Count < _count)
                {
                    _current = new AlignedBuffer(_size, _alignment);
                    _all.Add(_current);
                    return true;
                }
                Monitor.Wait(_lock);
            }
        }
    }

    /// <summary>Sends the current buffer (full, or the exact tail at close) to its fixed position.</summary>
    private void HandOff()
    {
        AlignedBuffer buffer = _current!;
        int length = _fill;
        long position = _base;
        _current = null;
        _fill = 0;
        _base += length;
        Pace(length);
        // Issued under the lock that completions take to record an error: once an error is
        // recorded no further write is issued.
        lock (_lock)
        {
            if (Error is not null)
            {
                _free.Push(buffer);
                return;
            }
            ValueTask write;
            try
            {
                write = Backend.WriteAsync(buffer.Memory[..length], position);
            }
            catch (Exception e)
            {
                SetError(e, position);
                _free.Push(buffer);
                Monitor.PulseAll(_lock);
                return;
            }
            _inFlight++;
            var pending = new Pending(buffer, length, position);
            if (write.IsCompletedSuccessfully)
            {
                write.GetAwaiter().GetResult();
                Completed(Task.CompletedTask, pending);
            }
            else
            {
                write.AsTask().ContinueWith(_onCompleted, pending, CancellationToken.None,
                    TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
            }
        }
    }

    private void Completed(Task write, Pending pending)
    {
        lock (_lock)
        {
            if (write.IsFaulted) SetError(write.Exception!.InnerExceptions[0], pending.Position);
            else if (write.IsCanceled) SetError(new OperationCanceledException($"write at stream offset {pending.Position} was cancelled"), pending.Position);
            else AddTransferred(pending.Length);
            _inFlight--;
            _free.Push(pending.Buffer);
            Monitor.PulseAll(_lock);
            if (_inFlight == 0) _drained?.TrySetResult();
        }
    }

    private void FreeAll()
    {
        lock (_lock)
        {
            foreach (AlignedBuffer b in _all) b.Dispose();
            _all.Clear();
            _free.Clear();
            _current = null;
            _fill = 0;
        }
    }

    private sealed record Pending(AlignedBuffer Buffer, int Length, long Position);
}
