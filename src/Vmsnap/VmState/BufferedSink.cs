using Vmsnap.Storage;
using Vmsnap.Storage.LowLevel;

namespace Vmsnap.VmState.LowLevel;

/// <summary>
/// Buffered mode (block targets): every byte is copied into one of K aligned buffers of B bytes;
/// a full buffer goes to an asynchronous positional write whose position is fixed at hand-off, so
/// writes may complete in any order. A free list feeds the producer, which waits only when all K
/// buffers are in flight. Buffers are allocated on first need, so a short stream uses few.
/// </summary>
/// <remarks>
/// Two cursors share the buffers: the stream's own (<see cref="Put"/>, moved by <see cref="Seek"/>)
/// and a positional one for page regions placed by offset (<see cref="PutAt"/>, mapped-ram). Each
/// fills its buffer from the position it was started at, so a region that starts aligned is written
/// in aligned requests. A write that overlaps one still in flight waits for it: a later write of the
/// same bytes always lands last.
/// </remarks>
internal sealed class BufferedSink : WriteSink
{
    private readonly object _lock = new();
    private readonly int _count;
    private readonly int _size;
    private readonly int _alignment;
    private readonly Stack<AlignedBuffer> _free = new();
    private readonly List<AlignedBuffer> _all = new();
    private readonly List<Pending> _inFlightWrites = new();
    private readonly Action<Task, object?> _onCompleted;
    private readonly Cursor _stream = new();
    private readonly Cursor _placed = new();
    private TaskCompletionSource? _drained;

    internal BufferedSink(VmStateBackend backend, long rateLimit, int count, int size, int alignment) : base(backend, rateLimit)
    {
        _count = count;
        _size = size;
        _alignment = alignment;
        _onCompleted = (task, state) => Completed(task, (Pending)state!);
    }

    internal override long Tell => _stream.Base + _stream.Fill;

    internal override void Put(ReadOnlySpan<byte> data)
    {
        if (Error is not null) return;
        Append(_stream, data);
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

    internal override void Seek(long position)
    {
        if (Error is not null || position == Tell) return;
        if (_stream.Buffer is not null) HandOff(_stream);
        _stream.Base = position;
    }

    internal override void PutAt(long position, ReadOnlySpan<byte> data, bool zeroGap)
    {
        if (Error is not null || data.IsEmpty) return;
        Cursor c = _placed;
        long end = c.Base + c.Fill;
        if (c.Buffer is not null)
        {
            if (position == end)
            {
                // Continues the region.
            }
            else if (zeroGap && position > end && position < c.Base + _size)
            {
                // A short hole the caller says holds nothing: zeroes keep the request whole.
                int gap = (int)(position - end);
                c.Buffer.GetSpan().Slice(c.Fill, gap).Clear();
                c.Fill += gap;
            }
            else
            {
                HandOff(c);
            }
        }
        if (c.Buffer is null) c.Base = position;
        Append(c, data);
    }

    internal override void Drain()
    {
        HandOffPartial();
        lock (_lock)
        {
            while (_inFlightWrites.Count > 0) Monitor.Wait(_lock);
        }
        FreeAll();
    }

    internal override async Task DrainAsync()
    {
        HandOffPartial();
        Task wait;
        lock (_lock)
        {
            if (_inFlightWrites.Count == 0) wait = Task.CompletedTask;
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
            while (_inFlightWrites.Count > 0) Monitor.Wait(_lock);
        }
        FreeAll();
    }

    private void HandOffPartial()
    {
        if (_placed.Buffer is not null && _placed.Fill > 0) HandOff(_placed);
        if (_stream.Buffer is not null && _stream.Fill > 0) HandOff(_stream);
    }

    private void Append(Cursor c, ReadOnlySpan<byte> data)
    {
        while (!data.IsEmpty)
        {
            if (c.Buffer is null && !Acquire(c)) return;
            Span<byte> room = c.Buffer!.GetSpan()[c.Fill..];
            int n = Math.Min(room.Length, data.Length);
            data[..n].CopyTo(room);
            c.Fill += n;
            data = data[n..];
            if (c.Fill == _size) HandOff(c);
        }
    }

    /// <summary>Takes a buffer from the free list, allocates one while fewer than K exist, or waits for a write to complete.</summary>
    private bool Acquire(Cursor c)
    {
        lock (_lock)
        {
            while (true)
            {
                if (Error is not null) return false;
                if (_free.Count > 0)
                {
                    c.Buffer = _free.Pop();
                    return true;
                }
                // The other cursor's partly filled buffer does not count against K: it cannot be
                // handed off from here, and waiting for it would never end.
                Cursor other = ReferenceEquals(c, _stream) ? _placed : _stream;
                if (_all.Count < _count + (other.Buffer is null ? 0 : 1))
                {
                    c.Buffer = new AlignedBuffer(_size, _alignment);
                    _all.Add(c.Buffer);
                    return true;
                }
                Monitor.Wait(_lock);
            }
        }
    }

    /// <summary>Sends the cursor's buffer (full, a region's end, or the exact tail at close) to its fixed position.</summary>
    private void HandOff(Cursor c)
    {
        AlignedBuffer buffer = c.Buffer!;
        int length = c.Fill;
        long position = c.Base;
        c.Buffer = null;
        c.Fill = 0;
        c.Base += length;
        if (length == 0)
        {
            lock (_lock) _free.Push(buffer);
            return;
        }
        Pace(length);
        // Issued under the lock that completions take to record an error: once an error is
        // recorded no further write is issued.
        lock (_lock)
        {
            // A later write of the same bytes must land after the earlier one.
            while (Error is null && _inFlightWrites.Exists(p => p.Position < position + length && position < p.Position + p.Length))
                Monitor.Wait(_lock);
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
            var pending = new Pending(buffer, length, position);
            _inFlightWrites.Add(pending);
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
            _inFlightWrites.Remove(pending);
            _free.Push(pending.Buffer);
            Monitor.PulseAll(_lock);
            if (_inFlightWrites.Count == 0) _drained?.TrySetResult();
        }
    }

    private void FreeAll()
    {
        lock (_lock)
        {
            foreach (AlignedBuffer b in _all) b.Dispose();
            _all.Clear();
            _free.Clear();
            foreach (Cursor c in new[] { _stream, _placed })
            {
                c.Buffer = null;
                c.Fill = 0;
            }
        }
    }

    /// <summary>Where one run of puts goes: the buffer being filled and the position of its first byte.</summary>
    private sealed class Cursor
    {
        public AlignedBuffer? Buffer;
        public int Fill;
        public long Base;
    }

    private sealed class Pending(AlignedBuffer buffer, int length, long position)
    {
        public AlignedBuffer Buffer { get; } = buffer;
        public int Length { get; } = length;
        public long Position { get; } = position;
    }
}
