using Vmsnap.Storage;

namespace Vmsnap.Tests.Qcow2.Snapshots;

/// <summary>
/// An in-memory disk with a write-back cache, to test crash safety: writes, resizes and discards
/// are pending until <see cref="Flush"/> makes them durable (reads see them at once). The operation
/// numbered <see cref="CrashAt"/> (0-based; writes, resizes, discards and flushes count) crashes the
/// disk: it and everything after throw, and <see cref="AfterCrash"/> gives the bytes a disk could
/// hold afterwards: what was flushed plus any subset of the pending operations, as a real disk
/// may keep or lose unflushed writes.
/// </summary>
internal sealed class CrashDevice(byte[] initial) : IBlockDevice
{
    private sealed record Op(long Offset, byte[]? Data, long NewLength);   // Data null: a resize to NewLength

    private readonly object _lock = new();
    private readonly List<Op> _pending = [];
    private byte[] _durable = (byte[])initial.Clone();
    private int _ops;

    public int CrashAt { get; set; } = int.MaxValue;

    /// <summary>Called at the start of every write, before it counts or is recorded (a test can make other requests run there).</summary>
    public Action<byte[], long>? BeforeWrite { get; set; }

    public bool Crashed { get; private set; }

    /// <summary>Operations counted so far.</summary>
    public int Operations => _ops;

    public bool IsReadOnly => false;

    public int Alignment => 1;

    private void Tick()
    {
        if (Crashed) throw new StorageException("the disk crashed", 5);
        if (_ops++ == CrashAt)
        {
            Crashed = true;
            throw new StorageException("the disk crashed", 5);
        }
    }

    public long Length
    {
        get
        {
            lock (_lock) return LengthWith(_pending);
        }
    }

    private long LengthWith(IEnumerable<Op> ops)
    {
        long length = _durable.Length;
        foreach (Op op in ops) length = op.Data is null ? op.NewLength : Math.Max(length, op.Offset + op.Data.Length);
        return length;
    }

    public int Read(Span<byte> buffer, long offset)
    {
        lock (_lock)
        {
            long length = LengthWith(_pending);
            int n = (int)Math.Clamp(length - offset, 0, buffer.Length);
            Span<byte> b = buffer[..n];
            b.Clear();
            if (offset < _durable.Length) _durable.AsSpan((int)offset, (int)Math.Min(n, _durable.Length - offset)).CopyTo(b);
            foreach (Op op in _pending) Apply(op, b, offset);
            return n;
        }
    }

    private static void Apply(Op op, Span<byte> view, long viewOffset)
    {
        long end = viewOffset + view.Length;
        if (op.Data is null)
        {
            if (op.NewLength < end) view[(int)Math.Max(0, op.NewLength - viewOffset)..].Clear();
            return;
        }
        long from = Math.Max(viewOffset, op.Offset), to = Math.Min(end, op.Offset + op.Data.Length);
        if (from < to) op.Data.AsSpan((int)(from - op.Offset), (int)(to - from)).CopyTo(view[(int)(from - viewOffset)..]);
    }

    public ValueTask<int> ReadAsync(Memory<byte> buffer, long offset, CancellationToken cancellationToken = default) =>
        ValueTask.FromResult(Read(buffer.Span, offset));

    public void Write(ReadOnlySpan<byte> buffer, long offset)
    {
        BeforeWrite?.Invoke(buffer.ToArray(), offset);
        lock (_lock)
        {
            Tick();
            _pending.Add(new Op(offset, buffer.ToArray(), 0));
        }
    }

    public ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, long offset, CancellationToken cancellationToken = default)
    {
        try
        {
            Write(buffer.Span, offset);
            return ValueTask.CompletedTask;
        }
        catch (StorageException e)
        {
            return ValueTask.FromException(e);
        }
    }

    public void Flush()
    {
        lock (_lock)
        {
            Tick();
            _durable = Materialize(_pending);
            _pending.Clear();
        }
    }

    public void SetLength(long length)
    {
        lock (_lock)
        {
            Tick();
            _pending.Add(new Op(0, null, length));
        }
    }

    public void Discard(long offset, long length)
    {
        lock (_lock)
        {
            Tick();
            long end = Math.Min(offset + length, LengthWith(_pending));
            if (end > offset) _pending.Add(new Op(offset, new byte[end - offset], 0));
        }
    }

    private byte[] Materialize(IEnumerable<Op> ops)
    {
        Op[] list = ops.ToArray();
        byte[] bytes = new byte[LengthWith(list)];
        _durable.AsSpan(0, (int)Math.Min(_durable.Length, bytes.Length)).CopyTo(bytes);
        long length = _durable.Length;
        foreach (Op op in list)
        {
            if (op.Data is null)
            {
                int start = (int)Math.Min(op.NewLength, bytes.Length), stop = (int)Math.Min(length, bytes.Length);
                if (stop > start) bytes.AsSpan(start, stop - start).Clear();
                length = op.NewLength;
            }
            else
            {
                int n = (int)Math.Clamp(bytes.Length - op.Offset, 0, op.Data.Length);   // a later shrink may cut it
                op.Data.AsSpan(0, n).CopyTo(bytes.AsSpan((int)Math.Min(op.Offset, bytes.Length)));
                length = Math.Max(length, op.Offset + op.Data.Length);
            }
        }
        return bytes;
    }

    /// <summary>The disk after the crash: the durable bytes plus the pending operations <paramref name="keep"/> selects, in their order.</summary>
    public byte[] AfterCrash(Func<int, bool> keep)
    {
        lock (_lock) return Materialize(_pending.Where((_, i) => keep(i)));
    }

    /// <summary>Operations that were pending when the disk crashed.</summary>
    public int PendingCount
    {
        get
        {
            lock (_lock) return _pending.Count;
        }
    }

    public void Dispose() { }
}
