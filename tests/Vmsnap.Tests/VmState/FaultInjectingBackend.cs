using Vmsnap.Storage;
using Vmsnap.VmState;

namespace Vmsnap.Tests.VmState;

/// <summary>
/// Wraps a backend and misbehaves on purpose (tests): fails write k with EIO or ENOSPC
/// (synchronously or when its task completes), cuts write k short, adds latency, completes
/// asynchronous writes out of order; records every call so a test can check what a writer did.
/// </summary>
internal sealed class FaultInjectingBackend : VmStateBackend
{
    internal const int EIO = 5, ENOSPC = NativeFile.ENOSPC;

    /// <summary>One write call as the wrapper saw it.</summary>
    internal readonly record struct WriteCall(int Index, long Position, int Length, bool Vectored, bool MemoryAligned);

    private readonly VmStateBackend _inner;
    private readonly object _lock = new();
    private readonly List<WriteCall> _writes = new();
    private readonly List<int> _completions = new();
    private readonly Random _random;
    private bool _failed;
    private int _reads;

    internal FaultInjectingBackend(VmStateBackend inner, int seed = 0)
    {
        _inner = inner;
        _random = new Random(seed);
    }

    /// <summary>1-based index of the write call that fails; 0 = none.</summary>
    internal int FailAtWrite { get; init; }

    /// <summary>errno of the injected failure (EIO or ENOSPC), carried by the <see cref="StorageException"/>.</summary>
    internal int FailureErrno { get; init; } = EIO;

    /// <summary>Fail an asynchronous write through its task (after its latency) instead of throwing from the call.</summary>
    internal bool FailAsynchronously { get; init; }

    /// <summary>1-based index of the write call that writes only half its bytes and then reports the short write; 0 = none.</summary>
    internal int ShortWriteAt { get; init; }

    /// <summary>1-based index of the read call that fails with EIO; 0 = none.</summary>
    internal int FailAtRead { get; init; }

    /// <summary>Make <see cref="Flush"/> (the final sync) fail with EIO.</summary>
    internal bool FailFlush { get; init; }

    /// <summary>Fixed delay of every asynchronous write.</summary>
    internal TimeSpan Latency { get; init; }

    /// <summary>Extra random delay (0 to this many milliseconds) per asynchronous write, so they complete out of order.</summary>
    internal int MaxJitterMilliseconds { get; init; }

    /// <summary>Called at every write call; a call made while it returns true counts in <see cref="GuardViolations"/>.</summary>
    internal Func<bool>? IssueGuard { get; set; }

    /// <summary>The exception injected (the same instance a writer must report).</summary>
    internal Exception? InjectedError { get; private set; }

    /// <summary>Write calls made after the injected failure was raised.</summary>
    internal int CallsAfterFailure { get; private set; }

    /// <summary>Write calls made while <see cref="IssueGuard"/> returned true.</summary>
    internal int GuardViolations { get; private set; }

    /// <summary>Number of <see cref="Flush"/> calls.</summary>
    internal int Flushes { get; private set; }

    /// <summary>The write calls in the order they were made.</summary>
    internal IReadOnlyList<WriteCall> Writes { get { lock (_lock) return _writes.ToArray(); } }

    /// <summary>Indexes of completed asynchronous writes in completion order.</summary>
    internal IReadOnlyList<int> CompletionOrder { get { lock (_lock) return _completions.ToArray(); } }

    /// <summary>True when some asynchronous write completed before one issued earlier.</summary>
    internal bool CompletedOutOfOrder
    {
        get
        {
            IReadOnlyList<int> order = CompletionOrder;
            for (int i = 1; i < order.Count; i++)
                if (order[i] < order[i - 1]) return true;
            return false;
        }
    }

    public override bool PrefersBufferedMode => _inner.PrefersBufferedMode;

    public override int Alignment => _inner.Alignment;

    public override bool IsPositional => _inner.IsPositional;

    public override void WriteVectored(ReadOnlySpan<ReadOnlyMemory<byte>> segments, long position)
    {
        int length = 0;
        foreach (ReadOnlyMemory<byte> s in segments) length += s.Length;
        int index = Record(position, length, vectored: true, aligned: segments.Length == 1 && IsAligned(segments[0], position));
        if (index == FailAtWrite) throw Fail(position, length);
        if (index == ShortWriteAt)
        {
            ReadOnlyMemory<byte>[] all = segments.ToArray();
            byte[] joined = new byte[length];
            int at = 0;
            foreach (ReadOnlyMemory<byte> s in all) { s.Span.CopyTo(joined.AsSpan(at)); at += s.Length; }
            _inner.WriteVectored([joined.AsMemory(0, length / 2)], position);
            throw ShortWrite(position, length);
        }
        _inner.WriteVectored(segments, position);
    }

    public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, long position, CancellationToken cancellationToken = default)
    {
        int index = Record(position, buffer.Length, vectored: false, aligned: IsAligned(buffer, position));
        bool fail = index == FailAtWrite, cut = index == ShortWriteAt;
        if (fail && !FailAsynchronously) throw Fail(position, buffer.Length);
        int jitter;
        lock (_lock) jitter = MaxJitterMilliseconds > 0 ? _random.Next(MaxJitterMilliseconds + 1) : 0;
        TimeSpan delay = Latency + TimeSpan.FromMilliseconds(jitter);
        if (delay == TimeSpan.Zero && !fail && !cut && MaxJitterMilliseconds == 0)
        {
            _inner.WriteVectored([buffer], position);
            Completed(index);
            return ValueTask.CompletedTask;
        }
        return new ValueTask(Task.Run(async () =>
        {
            if (delay > TimeSpan.Zero) await Task.Delay(delay).ConfigureAwait(false);
            else await Task.Yield();
            if (fail) throw Fail(position, buffer.Length);
            if (cut)
            {
                _inner.WriteVectored([buffer[..(buffer.Length / 2)]], position);
                throw ShortWrite(position, buffer.Length);
            }
            _inner.WriteVectored([buffer], position);
            Completed(index);
        }, CancellationToken.None));
    }

    public override int Read(Span<byte> buffer, long position)
    {
        if (Interlocked.Increment(ref _reads) == FailAtRead)
            throw new StorageException($"injected read failure at stream offset {position}", EIO);
        return _inner.Read(buffer, position);
    }

    public override void Flush()
    {
        Flushes++;
        if (FailFlush)
        {
            lock (_lock) InjectedError = new StorageException("injected EIO on flush", EIO);
            throw InjectedError;
        }
        _inner.Flush();
    }

    private int Record(long position, int length, bool vectored, bool aligned)
    {
        lock (_lock)
        {
            int index = _writes.Count + 1;
            _writes.Add(new WriteCall(index, position, length, vectored, aligned));
            if (_failed) CallsAfterFailure++;
            if (IssueGuard?.Invoke() == true) GuardViolations++;
            return index;
        }
    }

    private void Completed(int index)
    {
        lock (_lock) _completions.Add(index);
    }

    private Exception Fail(long position, int length)
    {
        lock (_lock)
        {
            _failed = true;
            InjectedError = new StorageException(
                $"injected {(FailureErrno == ENOSPC ? "ENOSPC" : "EIO")} on write of {length} bytes at stream offset {position}", FailureErrno);
            return InjectedError;
        }
    }

    private Exception ShortWrite(long position, int length)
    {
        lock (_lock)
        {
            _failed = true;
            InjectedError = new VmStateException($"short write: {length / 2} of {length} bytes written at stream offset {position}");
            return InjectedError;
        }
    }

    private bool IsAligned(ReadOnlyMemory<byte> buffer, long position) => AlignedBuffer.IsAligned(buffer.Span, position, Alignment);

    protected override void Dispose(bool disposing)
    {
        if (disposing) _inner.Dispose();
    }
}

